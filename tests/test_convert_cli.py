"""`python -m convert_weights` (sam-jax-convert): conversions both ways, one-line errors without
leftovers, exit status 1 for a failed conversion and 2 for a usage error."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_weights import main
from sam_jax import checkpoints
from sam_jax.config import get_config, tiny_config
from tests.torch_reference import build_official, state_dict_numpy

REPO = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(decoder_num_heads=8)  # 8 = the default when inferring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path of a tiny official .pth, its state_dict as numpy)."""
    official = build_official(CONFIG, seed=11)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(official.state_dict(), path)
    return path, state_dict_numpy(official)


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_failed(rc, err, *fragments):
    assert rc == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m convert_weights: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _save(sd, path):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return path


def test_pth_to_jax_and_back(tiny, tmp_path, capsys):
    pth, sd = tiny
    rc, out, err = _run(["--checkpoint", pth, "--output", tmp_path / "a" / "ckpt"], capsys)
    assert rc == 0, err
    assert "wrote" in out
    stored = json.loads((tmp_path / "a" / "ckpt" / "config" / "metadata").read_text())
    assert stored == CONFIG.to_dict()
    rc, _, err = _run(
        ["--to-pytorch", "--checkpoint", tmp_path / "a" / "ckpt", "--output", tmp_path / "b.pth"],
        capsys,
    )
    assert rc == 0, err
    back = torch.load(tmp_path / "b.pth", map_location="cpu", weights_only=True)
    assert list(back) == list(sd)
    for k, v in back.items():
        assert v.dtype == torch.float32 and np.array_equal(v.numpy(), sd[k]), k
    build_official(CONFIG, seed=12).load_state_dict(back, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.pth"]


@pytest.mark.slow  # about 1.5 GB of file I/O
def test_vit_b_with_model_type_and_sha256(tmp_path, capsys):
    official = build_official(get_config("vit_b"), seed=13, perturb=0.05)
    sd = state_dict_numpy(official)
    pth = _save(sd, tmp_path / "sam_vit_b.pth")
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    argv = ["--checkpoint", pth, "--output", tmp_path / "ckpt" / "sam_vit_b"]
    rc, _, err = _run([*argv, "--model-type", "vit_b", "--sha256", digest], capsys)
    assert rc == 0, err
    config, _ = checkpoints.load_converted(tmp_path / "ckpt" / "sam_vit_b")
    assert config == get_config("vit_b")
    out = tmp_path / "back.pth"
    rc, _, err = _run(
        ["--to-pytorch", "--checkpoint", tmp_path / "ckpt" / "sam_vit_b", "--output", out], capsys
    )
    assert rc == 0, err
    back = torch.load(out, map_location="cpu", weights_only=True)
    assert list(back) == list(sd)
    assert all(np.array_equal(back[k].numpy(), sd[k]) for k in sd)
    official.load_state_dict(back, strict=True)


def _bad_state_dict(kind, sd):
    sd = dict(sd)
    if kind == "missing":
        del sd["mask_decoder.iou_prediction_head.layers.1.bias"]
        return sd, ["missing key", "mask_decoder.iou_prediction_head.layers.1.bias"]
    if kind == "unexpected":
        sd["image_encoder.blocks.0.attn.extra"] = np.zeros(2, np.float32)
        return sd, ["unexpected key", "image_encoder.blocks.0.attn.extra"]
    sd["prompt_encoder.not_a_point_embed.weight"] = np.zeros((1, 31), np.float32)
    return sd, ["mis-shaped key", "prompt_encoder.not_a_point_embed.weight (1, 31)"]


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped"])
def test_bad_keys_fail_with_one_line_naming_the_key(tiny, tmp_path, capsys, kind):
    bad, fragments = _bad_state_dict(kind, tiny[1])
    pth = _save(bad, tmp_path / "bad.pth")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, _, err = _run(["--checkpoint", pth, "--output", out_dir / "ckpt"], capsys)
    _assert_failed(rc, err, *fragments)
    assert list(out_dir.iterdir()) == []


def test_wrong_model_type(tiny, tmp_path, capsys):
    rc, _, err = _run(
        ["--checkpoint", tiny[0], "--output", tmp_path / "o" / "ckpt", "--model-type", "vit_h"],
        capsys,
    )
    _assert_failed(rc, err, "does not match model type vit_h", "image_encoder.pos_embed")
    assert list(tmp_path.iterdir()) == []  # the parent "o" was not left behind either


def test_not_a_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, _, err = _run(["--checkpoint", junk, "--output", tmp_path / "ckpt"], capsys)
    _assert_failed(rc, err, "is not a PyTorch checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    rc, _, err = _run(["--checkpoint", tmp_path / "list.pth", "--output", tmp_path / "c"], capsys)
    _assert_failed(rc, err, "is not a state_dict")
    rc, _, err = _run(["--checkpoint", tmp_path / "nope.pth", "--output", tmp_path / "c"], capsys)
    _assert_failed(rc, err, "does not exist")
    (tmp_path / "plain").mkdir()
    rc, _, err = _run(
        ["--to-pytorch", "--checkpoint", tmp_path / "plain", "--output", tmp_path / "c"], capsys
    )
    _assert_failed(rc, err, "is not a checkpoint folder", "config/metadata", "config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth", "list.pth", "plain"]


def test_unwritable_output(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = _run(["--checkpoint", tiny[0], "--output", blocker / "ckpt"], capsys)
    _assert_failed(rc, err, "cannot write to", "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failure_while_writing_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    def broken_checkpointer():
        class Broken:
            def save(self, path, args):
                Path(path).mkdir()
                (Path(path) / "partial").write_bytes(b"x")
                raise OSError("disk full")

        import orbax.checkpoint as ocp

        return ocp, Broken()

    monkeypatch.setattr(checkpoints.converted, "_checkpointer", broken_checkpointer)
    rc, _, err = _run(["--checkpoint", tiny[0], "--output", tmp_path / "d" / "ckpt"], capsys)
    _assert_failed(rc, err, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch(tiny, tmp_path, capsys):
    argv = ["--checkpoint", tiny[0], "--output", tmp_path / "ckpt", "--sha256", "0" * 64]
    rc, _, err = _run(argv, capsys)
    _assert_failed(rc, err, "SHA-256 mismatch", "expected " + "0" * 64)
    rc, _, err = _run([*argv[:-1], "xyz"], capsys)
    _assert_failed(rc, err, "SHA-256 must be 8 to 64 hex digits")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("old")
    rc, _, err = _run(["--checkpoint", tiny[0], "--output", out], capsys)
    _assert_failed(rc, err, "exists already", "--force")
    assert (out / "keep").read_text() == "old"
    rc, _, err = _run(["--checkpoint", tiny[0], "--output", out, "--force"], capsys)
    assert rc == 0, err
    assert not (out / "keep").exists()
    assert checkpoints.load_converted(out)[0] == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_decoder_num_heads_option(tiny, tmp_path, capsys):
    argv = ["--checkpoint", tiny[0], "--output", tmp_path / "ckpt", "--decoder-num-heads"]
    rc, _, err = _run([*argv, "3"], capsys)
    _assert_failed(rc, err, "decoder_num_heads 3 does not divide")
    rc, _, err = _run([*argv, "4"], capsys)
    assert rc == 0, err
    assert checkpoints.load_converted(tmp_path / "ckpt")[0] == CONFIG.replace(decoder_num_heads=4)


def test_subprocess_success_and_error(tiny, tmp_path):
    """The real entry point: exit codes and a one-line stderr without a traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "convert_weights", "--checkpoint", str(tiny[0])]
    ok = subprocess.run(
        [*cmd, "--output", str(tmp_path / "ok")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert checkpoints.load_converted(tmp_path / "ok")[0] == CONFIG
    bad = subprocess.run(
        [*cmd, "--output", str(tmp_path / "bad"), "--model-type", "vit_b"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not match model type vit_b" in lines[0], bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_usage_errors_exit_2_with_one_line(tiny, tmp_path, capsys):
    """Bad flags or flag combinations: status 2, one line, nothing read or written."""
    cases = [
        (["--checkpoint", tiny[0]], "the following arguments are required: --output"),
        (["--checkpoint", tiny[0], "--output", tmp_path / "c", "--model-type", "vit_x"], "vit_x"),
        (["--checkpoint", tiny[0], "--output", tmp_path / "c", "--decoder-num-heads", "0"], ">= 1"),
        (
            ["--to-pytorch", "--checkpoint", tmp_path, "--output", tmp_path / "c.pth", "--sha256"]
            + ["0" * 64],
            "apply to .pth input only",
        ),
        (["--checkpoint", tmp_path, "--output", tmp_path / "c"], "needs --to-pytorch"),
    ]
    for argv, fragment in cases:
        rc, out, err = _run(argv, capsys)
        assert rc == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m convert_weights: error: "), err
        assert fragment in lines[0] and "Traceback" not in err, (fragment, err)
    assert list(tmp_path.iterdir()) == []


def test_console_command_name(tiny, tmp_path, capsys):
    from sam_jax.cli import convert

    rc = convert.main(["--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("sam-jax-convert: error: ") and "does not exist" in err
    assert convert.main(["--help"]) == 0
    assert "exit status" in capsys.readouterr().out


def test_a_nonfinite_pth_is_refused_at_conversion(tiny, tmp_path, capsys):
    """A NaN in a .pth: the conversion fails in one line and writes nothing (before, it wrote a
    checkpoint that sam_jax.load then refused); --allow-nonfinite converts it, and load needs
    the same permission."""
    _, sd = tiny
    bad = {k: np.array(v) for k, v in sd.items()}
    key = "mask_decoder.iou_token.weight"
    bad[key].flat[3] = np.nan
    pth = tmp_path / "nan.pth"
    torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, pth)
    rc, _, err = _run(["--checkpoint", pth, "--output", tmp_path / "c"], capsys)
    _assert_failed(rc, err, "non-finite", "--allow-nonfinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]
    argv = ["--checkpoint", pth, "--output", tmp_path / "c", "--allow-nonfinite"]
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    with pytest.raises(checkpoints.CheckpointError, match="non-finite"):
        checkpoints.read_checkpoint(tmp_path / "c")
    _, params = checkpoints.read_checkpoint(tmp_path / "c", allow_nonfinite=True)
    assert np.isnan(params["mask_decoder"]["iou_token"]["embedding"]).sum() == 1
