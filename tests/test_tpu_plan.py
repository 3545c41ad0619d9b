"""The TPU compile plan: topology names, the HLO traffic count (loop trips), the Pallas attention
kernel (interpreted on the CPU, compiled by libtpu for a v5e chip), a refused plan, and
`sam-jax-train --compile-only` (per-chip memory that does not grow with the chip count).

libtpu (the `tpu` extra, installed by the `test` extra) compiles for TPU topologies on this CPU
host; nothing runs on a TPU.
"""

from __future__ import annotations

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import errors
from sam_jax.modeling import attention_kernels
from sam_jax.training import compile_plan, hlo_traffic, sharding


def test_topology_names():
    chip, name, kwargs = compile_plan.parse_topology("v5e:16x16")
    assert chip.generation == "v5e" and name == "v5e:16x16" and kwargs == {}
    chip, name, kwargs = compile_plan.parse_topology("v5p:4x4x8")
    assert name == "v5:4x4x8" and kwargs["chip_config_name"] == "megacore"
    assert compile_plan.parse_topology("v6e:1x1")[2]["chips_per_host_bounds"] == (1, 1, 1)
    for bad in ("v9:2x2", "v5e", "v5e:2x2x2", "v4:4x4", "tpu"):
        with pytest.raises(errors.TopologyError, match="topology"):
            compile_plan.parse_topology(bad)


def test_a_mesh_axis_that_splits_a_physical_axis():
    """vit_h's recipe mesh (-1, 8) on a 16 x 16 v6e: 8 is no product of the physical axes, so
    jax.make_mesh refuses; make_mesh splits the axis (every chip once)."""
    _, devices = compile_plan.topology_devices("v6e:16x16")
    mesh = sharding.make_mesh((-1, 8), devices)
    assert mesh.devices.shape == (32, 8)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_an_inference_plan_for_one_chip():
    """The decoder's program (vit_b's decoder = vit_h's) compiled for one v5e chip: it fits, and
    its FLOPs and bytes are counted."""
    plan = compile_plan.inference_plan("vit_b", "decoder", "v5e:1x1", 8).to_json()
    assert plan["fits"] and plan["chips"] == 1
    assert plan["flops_per_image"] > 0 and plan["hbm_bytes_per_image"] > 0
    assert 0 < plan["memory"]["total"] < 2**30


def test_tile_padding_and_slices():
    """Bytes as laid out in tiles: f32[8,64] in (8,128) tiles takes 8 x 128 x 4 bytes."""
    assert hlo_traffic.shape_bytes("f32[8,64]{1,0:T(8,128)}") == (4096.0, 0.0)
    assert hlo_traffic.shape_bytes("f32[8,64]{1,0:T(8,128)}", padded=False)[0] == 2048.0
    assert hlo_traffic.shape_bytes("bf16[3,256]{1,0:T(8,128)(2,1)S(1)}") == (4096.0, 4096.0)
    assert hlo_traffic.shape_bytes("(s32[], f32[4]{0})") == (20.0, 0.0)  # a tuple: its parts


def test_loops_are_counted_every_trip():
    """A scan of 7 matmuls counts 7 bodies, as its unrolled twin; XLA's own analysis counts the
    scan's body once."""
    w = jnp.ones((128, 128))

    def scanned(x, unroll):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, 7, unroll=unroll)[0]

    x = jnp.ones((256, 128))
    body = 2 * 256 * 128 * 128
    counts = {}
    for unroll in (1, 7):
        compiled = jax.jit(scanned, static_argnums=1).lower(x, unroll).compile()
        traffic = hlo_traffic.analyze(compiled.as_text())
        assert not traffic.unknown_loops
        counts[unroll] = traffic
        xla = compiled.cost_analysis()
        xla = xla[0] if isinstance(xla, (list, tuple)) else xla
        if unroll == 1:
            assert xla["flops"] < 2 * body  # XLA: the loop body once
    assert counts[1].flops == counts[7].flops == 7 * body
    # Every trip reads the carry and the weights and writes the carry: at least 7 x 3 arrays.
    assert counts[1].bytes >= 7 * 3 * 128 * 128 * 4


def _kernel_case(dtype, h=16, w=16, d=16, heads=2, seed=0):
    rng = np.random.default_rng(seed)
    t = h * w
    q, k, v = (jnp.asarray(rng.normal(size=(2, heads, t, d)), dtype) for _ in range(3))
    rel_h = jnp.asarray(rng.normal(size=(2, heads, t, h)), jnp.float32)
    rel_w = jnp.asarray(rng.normal(size=(2, heads, t, w)), jnp.float32)
    return q, k, v, rel_h, rel_w


def _dense(q, k, v, rel_h, rel_w):
    """The reference: logits q k^T + rel_h[q, kh] + rel_w[q, kw] written out, float32."""
    t = q.shape[-2]
    f32 = jnp.float32
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*q.shape[:-1], t)
    s = jnp.einsum("...qd,...kd->...qk", q.astype(f32), k.astype(f32)) + bias
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(s, axis=-1), v.astype(f32))


def test_attention_kernel_equals_dense_attention():
    """The flash kernel (interpreted: 4 query x 2 key blocks of whole key rows) gives the dense
    rel-pos attention and its gradients in all five inputs."""
    case = _kernel_case(jnp.float32)
    blocks = attention_kernels.block_sizes((16, 16), 64, 128)
    assert blocks == (64, 128)  # several blocks both ways: the online softmax is exercised

    def kernel(*xs):
        return attention_kernels.flash_rel_pos_attention(
            *xs, interpret=True, block_q=64, block_k=128
        )

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(kernel(*case), _dense(*case), rtol=2e-5, atol=2e-5)
        g = jnp.asarray(np.random.default_rng(1).normal(size=case[0].shape), jnp.float32)
        loss = lambda f: lambda *xs: jnp.sum(f(*xs) * g)  # noqa: E731
        got = jax.grad(loss(kernel), argnums=range(5))(*case)
        want = jax.grad(loss(_dense), argnums=range(5))(*case)
    for name, a, b in zip(("q", "k", "v", "rel_h", "rel_w"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_encoder_attention_takes_the_kernel_for_a_tpu():
    """Lowered for a TPU, the encoder's global attention is the Pallas kernel (forward and
    backward), compiled by libtpu's Mosaic; lowered for the CPU it is the XLA path."""
    from sam_jax.modeling.image_encoder import rel_pos_attention

    _, devices = compile_plan.topology_devices("v5e:1x1")
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    shape = (1, 2, 32 * 32, 64)  # 2 heads on a 32 x 32 grid
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for _ in range(3)]
    tables = [jax.ShapeDtypeStruct((63, 64), jnp.float32, sharding=sharding)] * 2

    def loss(q, k, v, th, tw):
        out = rel_pos_attention(q, k, v, th, tw, (32, 32), "auto")
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    with compile_plan.no_persistent_cache():
        text = grad.lower(*args, *tables).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3  # forward, dq, dkv
    cpu = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    table = jax.ShapeDtypeStruct((63, 64), jnp.float32)
    cpu_text = jax.jit(jax.grad(loss, argnums=(0,))).lower(cpu, cpu, cpu, table, table).as_text()
    assert "tpu_custom_call" not in cpu_text


def test_a_refused_plan_names_its_largest_buffers():
    """A program the compiler refuses (temporaries beyond a v5e's HBM) gives a plan that does not
    fit and one line naming the largest buffers."""
    _, devices = compile_plan.topology_devices("v5e:1x1")
    mesh = jax.sharding.Mesh(np.array(devices[:1]).reshape(1, 1), ("data", "fsdp"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def f(x):
        y = jnp.einsum("bij,bjk->bik", x, x)
        return jnp.sum(jnp.exp(y) @ x * y)

    x = jax.ShapeDtypeStruct((24, 8192, 8192), jnp.float32, sharding=spec)
    chip = compile_plan.CHIPS["v5e"]
    plan = compile_plan.compile_program(
        jax.jit(jax.grad(f)), (x,), "f", "v5e:1x1", 1, chip, mesh, 1
    )
    assert not plan.fits and plan.memory["temp"] > chip.hbm_bytes
    assert plan.largest_buffers and "f32[24,8192,8192]" in plan.largest_buffers[0]
    with pytest.raises(errors.PlanDoesNotFitError, match=r"largest buffers: .*f32\[24,8192"):
        compile_plan.check_fits(plan)


def _plan_config(tmp_path):
    """A small model whose global attention (a 32 x 32 grid, 4 heads) dominates the step."""
    path = tmp_path / "tiny_plan.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from training_fakes import tiny_train_config\n\n\n"
        "def get_config():\n"
        "    c = tiny_train_config()\n"
        "    c.dtype, c.remat_policy, c.attention_impl = 'bfloat16', 'full', 'auto'\n"
        "    c.model_overrides.image_size = 512\n"
        "    c.model_overrides.encoder_embed_dim = 64\n"
        "    c.model_overrides.encoder_num_heads = 4\n"
        "    c.model_overrides.encoder_depth = 1\n"
        "    c.model_overrides.encoder_global_attn_indexes = (0,)\n"
        "    c.data.max_masks = 2\n"
        "    c.train.num_rounds = 1\n"
        "    return c\n"
    )
    return str(path)


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1))


@pytest.mark.slow
def test_compile_only_plan_does_not_grow_with_the_chip_count(tmp_path, capsys):
    """`sam-jax-train --compile-only`, one image per chip on v5e 2x2 (mesh (4, 1)) and 4x4 (mesh
    (16, 1)): the plan on stdout, exit 0, nothing written, and the same temporaries and FLOPs per
    chip at 16 chips as at 4 (before, the encoder's attention blocks mixed the images of the
    whole batch and every chip computed them all: 4x the temporaries at 16 chips)."""
    from sam_jax.cli import train

    config = _plan_config(tmp_path)
    plans = {}
    for topology, chips in (("v5e:2x2", 4), ("v5e:4x4", 16)):
        argv = ["--config", config, "--compile-only", "--topology", topology]
        argv += [f"--config.batch_size={chips}", f"--config.mesh_shape=({chips},1)"]
        code = train.main(argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"train plan: {topology}, {chips} chips, mesh data={chips} x fsdp=1, 1 images" in out
        assert "(fits" in out and "images/s per chip" in out and "roofline" in out
        plans[chips] = {
            "temp": _number(r"temporaries ([\d.e+-]+) GiB", out),
            "flops": _number(r"loops counted\): ([\d.e+-]+) GFLOP", out),
        }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_plan.py"]
    small, large = plans[4], plans[16]
    assert 0 < large["temp"] <= 1.2 * small["temp"], plans
    assert 0 < large["flops"] <= 1.2 * small["flops"], plans


def test_compile_only_usage_errors(tmp_path, capsys, monkeypatch):
    """A bad topology is a usage error (exit 2, one line); without libtpu the command says what
    to install (exit 1, one line)."""
    from sam_jax.cli import train

    config = _plan_config(tmp_path)
    code = train.main(["--config", config, "--compile-only", "--topology", "v9:2x2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown topology 'v9:2x2'" in err[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    code = train.main(["--config", config, "--compile-only", "--topology", "v5e:2x2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "pip install 'sam_jax[tpu]'" in err[0]
