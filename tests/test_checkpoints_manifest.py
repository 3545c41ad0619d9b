"""Checkpoint manifests (sam_jax.checkpoints.manifest): every checkpoint written carries the
checksums of its files and arrays, and a damaged, truncated or incomplete one is refused in one
line naming the file (or the array); non-finite params are refused unless asked for; checkpoints
without a manifest still load, with a warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from PIL import Image

import sam_jax
from sam_jax import checkpoints, paths
from sam_jax.checkpoints import manifest
from sam_jax.checkpoints import training as checkpointing
from sam_jax.checkpoints.mapping import expected_leaves, flatten_params
from sam_jax.config import tiny_config
from sam_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
CONFIG = tiny_config()
NAN_ARRAY = "mask_decoder/iou_token/embedding"


def _params(seed=0, nan_in=None):
    rng = np.random.default_rng(seed)
    flat = {
        leaf.flax_path: (0.02 * rng.standard_normal(leaf.flax_shape)).astype(np.float32)
        for leaf in expected_leaves(CONFIG).values()
    }
    if nan_in is not None:
        flat[tuple(nan_in.split("/"))].flat[1] = np.nan
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path of a pristine converted checkpoint, its params)."""
    params = _params()
    path = tmp_path_factory.mktemp("manifest") / "ckpt"
    checkpoints.save_converted(path, CONFIG, params)
    return path, params


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the pristine checkpoint, to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(saved[0], path)
    return path


def _largest_params_file(path: Path) -> Path:
    files = [p for p in (path / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _rel(path: Path, file: Path) -> str:
    return file.relative_to(path).as_posix()


def _damage(file: Path, nbytes=4096) -> None:
    """Overwrites `nbytes` in the middle of `file` with other bytes."""
    size = file.stat().st_size
    start = max(0, size // 2 - nbytes // 2)
    with open(file, "r+b") as f:
        f.seek(start)
        old = f.read(nbytes)
        f.seek(start)
        f.write(bytes((b + 1) % 256 for b in old))


def _one_line(e: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def _assert_equal(params, got):
    flat, flat2 = flatten_params(params), flatten_params(got)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(flat2[k], flat[k], err_msg="/".join(k))


def test_the_manifest_lists_every_file_and_array(saved):
    path, params = saved
    doc = json.loads((path / manifest.MANIFEST_NAME).read_text())
    assert doc["format"] == manifest.FORMAT and doc["kind"] == "converted"
    on_disk = {
        _rel(path, p): p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and p.name != manifest.MANIFEST_NAME
    }
    assert {rel: e["size"] for rel, e in doc["files"].items()} == on_disk
    assert all(len(e[manifest.DEFAULT_ALGORITHM]) == 8 for e in doc["files"].values())
    names = {"/".join(k) for k in flatten_params(params)}
    assert set(doc["arrays"]) == names
    config, got = checkpoints.load_converted(path)  # a whole checkpoint loads, silently
    assert config == CONFIG
    _assert_equal(params, got)


def test_damaged_params_file_is_refused_naming_the_file(ckpt):
    file = _largest_params_file(ckpt)
    _damage(file)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(ckpt)
    _one_line(e, str(ckpt), "is damaged", _rel(ckpt, file), "does not match its checksum")
    with pytest.raises(CheckpointError, match="is damaged"):
        sam_jax.load(ckpt)


def test_truncated_file_is_refused(ckpt):
    file = _largest_params_file(ckpt)
    size = file.stat().st_size
    os.truncate(file, size // 2)
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(ckpt)
    _one_line(e, _rel(ckpt, file), f"has {size // 2} bytes, expected {size} (truncated)")


def test_missing_file_is_refused(ckpt):
    file = _largest_params_file(ckpt)
    file.unlink()
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(ckpt)
    _one_line(e, _rel(ckpt, file), "is missing")
    (ckpt / "config" / "metadata").unlink()  # not even a checkpoint any more
    with pytest.raises(CheckpointError, match="not a converted sam_jax checkpoint"):
        checkpoints.load_converted(ckpt)


def test_a_changed_array_is_named(ckpt, saved):
    """Files that match their checksums but arrays that do not (a file checksum recorded over
    damaged bytes, or a bad read): the array is named."""
    doc = json.loads((ckpt / manifest.MANIFEST_NAME).read_text())
    name = "image_encoder/blocks_1/attn/qkv/kernel"
    entry = doc["arrays"][name]
    algorithm = next(a for a in ("crc32c", "crc32") if a in entry)
    entry[algorithm] = f"{int(entry[algorithm], 16) ^ 1:08x}"
    (ckpt / manifest.MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(ckpt)
    _one_line(e, str(ckpt), "is damaged", name, "differs from what was saved")
    _, got = checkpoints.load_converted(ckpt, verify=False)  # unchecked, on request
    _assert_equal(saved[1], got)


def test_damage_names_the_array_when_orbax_still_reads_it(tmp_path):
    """Damage inside stored bytes that the storage format does not notice (incompressible
    values are stored raw): the file and the array are named."""
    params = _params(seed=1)
    name = "image_encoder/patch_embed/proj/kernel"
    kernel = params["image_encoder"]["patch_embed"]["proj"]
    bits = np.random.default_rng(1).integers(0, 2**32, kernel["kernel"].shape, dtype=np.uint32)
    bits[(bits & 0x7F800000) == 0x7F800000] ^= 0x40000000  # no NaN or infinity
    kernel["kernel"] = bits.view(np.float32)  # incompressible
    path = tmp_path / "ckpt"
    checkpoints.save_converted(path, CONFIG, params)
    needle = kernel["kernel"].tobytes()[256:512]
    for file in (path / "params").rglob("*"):
        data = file.read_bytes() if file.is_file() else b""
        at = data.find(needle)
        if at >= 0:
            file.write_bytes(data[:at] + needle[::-1] + data[at + len(needle) :])
            break
    else:
        raise AssertionError("the kernel's bytes are not stored raw")
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(path)
    _one_line(e, _rel(path, file), "does not match its checksum", "the arrays that differ", name)


def test_checkpoint_without_manifest_loads_with_a_warning(ckpt, saved, caplog):
    (ckpt / manifest.MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="sam_jax.checkpoints"):
        config, got = checkpoints.load_converted(ckpt)
    assert config == CONFIG
    _assert_equal(saved[1], got)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(ckpt) in warnings[0], warnings
    assert "cannot be verified (written before manifests" in warnings[0]


def test_a_damaged_manifest_is_refused(ckpt):
    (ckpt / manifest.MANIFEST_NAME).write_text('{"format": "sam_jax checkpoint man')
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(ckpt)
    _one_line(e, manifest.MANIFEST_NAME, "is damaged")


def test_nonfinite_params_are_refused_naming_the_array(tmp_path):
    params = _params(nan_in=NAN_ARRAY)
    path = tmp_path / "nan"
    checkpoints.save_converted(path, CONFIG, params)
    with pytest.raises(CheckpointError) as e:
        checkpoints.read_checkpoint(path)
    _one_line(e, str(path), "non-finite", NAN_ARRAY, "1 NaN or infinite values of 32")
    with pytest.raises(CheckpointError, match=NAN_ARRAY):
        sam_jax.load(path)
    _, got = checkpoints.read_checkpoint(path, allow_nonfinite=True)
    assert np.isnan(got["mask_decoder"]["iou_token"]["embedding"]).sum() == 1
    model, got = sam_jax.load(path, allow_nonfinite=True)
    assert model.config == CONFIG
    # A .pth as well (it has no manifest, but its values are checked the same way).
    checkpoints.save_pth(tmp_path / "nan.pth", checkpoints.params_to_state_dict(params, CONFIG))
    with pytest.raises(CheckpointError, match=NAN_ARRAY):
        sam_jax.load(tmp_path / "nan.pth", decoder_num_heads=CONFIG.decoder_num_heads)
    sam_jax.load(tmp_path / "nan.pth", allow_nonfinite=True)


def _predict(checkpoint, tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(image)
    argv = [sys.executable, "-m", "sam_jax.cli.predict", "--checkpoint", str(checkpoint)]
    argv += ["--image", str(image), "--output", str(tmp_path / "out"), "--point", "10,10"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_predict_command_refuses_a_damaged_checkpoint_in_one_line(ckpt, tmp_path):
    file = _largest_params_file(ckpt)
    _damage(file)
    res = _predict(ckpt, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Event loop" not in res.stderr
    assert lines[0].startswith("python -m sam_jax.cli.predict: error: ")
    assert "is damaged" in lines[0] and _rel(ckpt, file) in lines[0]
    assert not (tmp_path / "out").exists()


def test_orbax_failure_without_manifest_is_one_line_and_quiet(ckpt, tmp_path):
    """No manifest to name the file: orbax's own failure, on one line, without its asyncio
    tracebacks (the warning that the checkpoint cannot be verified comes first)."""
    (ckpt / manifest.MANIFEST_NAME).unlink()
    _largest_params_file(ckpt).unlink()
    res = _predict(ckpt, tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and "Event loop" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 2 and "cannot be verified" in lines[0], res.stderr[-3000:]
    assert "cannot read the params of" in lines[1] and str(ckpt) in lines[1]


# ----------------------------------------------------------------------------------------------
# Training checkpoints.


def _state(seed=0):
    from sam_jax.training.train_state import create_train_state

    params = {"a": {"kernel": jnp.arange(12.0).reshape(3, 4) + seed}, "b": jnp.ones((5,)) * seed}
    return create_train_state(params, optax.adam(1e-3), seed)


def _target():
    from sam_jax.training import sharding

    mesh = sharding.make_mesh((1, 1))
    abstract = jax.eval_shape(lambda: _state())
    return checkpointing.abstract_with_shardings(abstract, sharding.tree_shardings(mesh, abstract))


def _train_checkpoints(directory, steps=(1, 2)):
    ckpt = checkpointing.Checkpointer(str(directory), max_to_keep=3, async_save=True)
    for step in steps:
        assert ckpt.save(step, _state(seed=step), {"batches_consumed": step}, force=True)
    ckpt.close()


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_training_steps_carry_manifests(tmp_path):
    directory = tmp_path / "ckpt"
    _train_checkpoints(directory, steps=(1, 2, 3))
    for step in ("1", "2", "3"):
        doc = json.loads((directory / step / manifest.MANIFEST_NAME).read_text())
        assert doc["kind"] == "training"
        on_disk = {
            _rel(directory / step, p)
            for p in (directory / step).rglob("*")
            if p.is_file() and p.name != manifest.MANIFEST_NAME
        }
        assert set(doc["files"]) == on_disk and any(f.startswith("state/") for f in on_disk)
    state, meta = checkpointing.Checkpointer(str(directory)).restore(_target())
    assert meta == {"batches_consumed": 3} and int(state.step) == 0
    np.testing.assert_array_equal(state.params["b"], np.full(5, 3.0))


def test_damaged_training_step_is_refused_naming_the_file(tmp_path):
    directory = tmp_path / "ckpt"
    _train_checkpoints(directory)
    file = _largest_file(directory / "2" / "state")
    _damage(file, 64)
    ckpt = checkpointing.Checkpointer(str(directory))
    assert ckpt.latest_step() == 2
    for restore in (lambda: ckpt.restore(_target()), lambda: ckpt.restore_meta()):
        with pytest.raises(CheckpointError) as e:
            restore()
        _one_line(e, f"step 2 of {directory} is damaged", _rel(directory / "2", file))
        _one_line(e, f"delete {directory / '2'} to resume from step 1")
    ckpt.close()
    shutil.rmtree(directory / "2")  # as the message says: resume from the step before
    state, meta = checkpointing.Checkpointer(str(directory)).restore(_target())
    assert meta == {"batches_consumed": 1}
    np.testing.assert_array_equal(state.params["b"], np.full(5, 1.0))


def test_training_step_with_a_missing_file_is_refused(tmp_path):
    directory = tmp_path / "ckpt"
    _train_checkpoints(directory, steps=(1,))
    file = _largest_file(directory / "1" / "state")
    file.unlink()
    with pytest.raises(CheckpointError) as e:
        checkpointing.Checkpointer(str(directory)).restore(_target())
    _one_line(e, "step 1 of", _rel(directory / "1", file), "is missing")


def test_training_step_without_manifest_restores_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    _train_checkpoints(directory, steps=(1,))
    (directory / "1" / manifest.MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="sam_jax.checkpoints"):
        state, meta = checkpointing.Checkpointer(str(directory)).restore(_target())
    assert meta == {"batches_consumed": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 1" in warnings[0] and "cannot be verified" in warnings[0]


# ----------------------------------------------------------------------------------------------
# On a bucket (the GCS emulator): the checksums come from the object listing.


def test_converted_checkpoint_on_gcs_round_trips_and_damage_is_found(gcs):
    params = _params(seed=2)
    url = gcs.url("manifest", "tiny")
    checkpoints.save_converted(url, CONFIG, params)
    doc = json.loads(paths.read_text(f"{url}/{manifest.MANIFEST_NAME}"))
    assert "commit_success.txt" in doc["files"] and all(
        "crc32c" in e for e in doc["files"].values()
    )
    config, got = checkpoints.load_converted(url)
    assert config == CONFIG
    _assert_equal(params, got)
    # The CRC-32C of each object as GCS reports it equals the one computed over its bytes.
    some = next(rel for rel in doc["files"] if rel.startswith("params/ocdbt"))
    assert manifest._file_checksum(f"{url}/{some}", "crc32c") == doc["files"][some]["crc32c"]
    # An object replaced by damaged bytes (same size), then one removed.
    largest = max(doc["files"], key=lambda rel: doc["files"][rel]["size"])
    data = bytearray(paths.read_bytes(f"{url}/{largest}"))
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    paths.write_bytes(f"{url}/{largest}", bytes(data))
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(url)
    _one_line(e, url, "is damaged", largest, "does not match its checksum")
    paths.remove(f"{url}/{largest}")
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_converted(url)
    _one_line(e, largest, "is missing")
    # Saved again over it: a new manifest, a whole checkpoint.
    checkpoints.save_converted(url, CONFIG, params, overwrite=True)
    _assert_equal(params, checkpoints.load_converted(url)[1])


def test_training_checkpoint_on_gcs_damage_is_found(gcs):
    directory = gcs.url("manifest", "train")
    ckpt = checkpointing.Checkpointer(directory, max_to_keep=3, async_save=True)
    for step in (1, 2):
        assert ckpt.save(step, _state(seed=step), {"batches_consumed": step}, force=True)
    ckpt.close()
    doc = json.loads(paths.read_text(f"{directory}/2/{manifest.MANIFEST_NAME}"))
    assert all("crc32c" in e for e in doc["files"].values())
    state, meta = checkpointing.Checkpointer(directory).restore(_target())
    assert meta == {"batches_consumed": 2}
    victim = next(rel for rel in doc["files"] if rel.startswith("state/ocdbt"))
    data = bytearray(paths.read_bytes(f"{directory}/2/{victim}"))
    data[0] ^= 0xFF
    paths.write_bytes(f"{directory}/2/{victim}", bytes(data))
    with pytest.raises(CheckpointError) as e:
        checkpointing.Checkpointer(directory).restore(_target())
    _one_line(e, f"step 2 of {directory} is damaged", victim, "resume from step 1")
