"""Tests of the mesh / sharding rules, and 8-device vs 1-device training equality."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sam_jax.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_spec_rules():
    assert sharding.spec_for("a/kernel", (64, 256), 2, min_fsdp_size=1) == P(None, "fsdp")
    assert sharding.spec_for("a/kernel", (256, 64), 4, min_fsdp_size=1) == P("fsdp", None)
    # Largest dimension not divisible: the next one is used; none divisible: replicated.
    assert sharding.spec_for("a/kernel", (9, 6), 2, min_fsdp_size=1) == P(None, "fsdp")
    assert sharding.spec_for("a/kernel", (9, 7), 2, min_fsdp_size=1) == P()
    assert sharding.spec_for("a/bias", (64,), 2, min_fsdp_size=1000) == P()
    assert sharding.spec_for("a/bias", (64,), 1, min_fsdp_size=1) == P()
    assert sharding.spec_for("x/pos_embed", (1, 8, 8, 64), 2, rules=[("pos_embed$", ())]) == P()
    rule = [("qkv/kernel", (None, "fsdp"))]
    assert sharding.spec_for("b/qkv/kernel", (64, 192), 2, rules=rule) == P(None, "fsdp")


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh((-1, 1))
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.devices.size == len(jax.devices())
    with pytest.raises(ValueError, match="2 entries"):
        sharding.make_mesh((1,))
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh((len(jax.devices()) + 1, 1))


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from training_fakes import fake_iterator, tiny_train_config
    from sam_jax.training.train_loop import train_and_evaluate
    from sam_jax.training import sharding

    c = tiny_train_config()
    c.mesh_shape = {mesh}
    c.min_fsdp_size = 256
    c.total_steps = 3
    c.batch_size = 8
    out = train_and_evaluate(c, {workdir!r}, make_iterator=fake_iterator)
    rows = [json.loads(l) for l in open({workdir!r} + "/metrics.jsonl")]
    print("RESULT", json.dumps({{"devices": len(jax.devices()),
                                 "losses": [r["loss"] for r in rows if "loss" in r]}}))
    """
)


def _run(tmp_path, name, mesh, devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    script = _SCRIPT.format(
        tests=os.path.join(REPO, "tests"), mesh=mesh, workdir=str(tmp_path / name)
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _result(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_8_devices_fsdp_match_1_device(tmp_path):
    """Mesh (data=4, fsdp=2) on 8 virtual CPU devices vs 1 device: same losses (rel 1e-4)."""
    multi = _run(tmp_path, "multi", (4, 2), 8)
    single = _run(tmp_path, "single", (1, 1), 1)
    a, b = _result(multi), _result(single)
    assert a["devices"] == 8 and b["devices"] == 1
    assert len(a["losses"]) == len(b["losses"]) == 3
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-4)
    # Training moved: the losses are not all equal (the comparison is not vacuous).
    assert len(set(np.round(b["losses"], 6))) > 1
