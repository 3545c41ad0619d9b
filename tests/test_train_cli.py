"""Tests of train.py: config overrides, a short real run, SIGTERM preemption + exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

CONFIG = f"""
import sys
sys.path.insert(0, {TESTS!r})
from training_fakes import tiny_train_config


def get_config():
    c = tiny_train_config()
    c.data.train = "synthetic:train?image_size=64&num_images=64"
    return c
"""


def _config_file(tmp_path):
    path = tmp_path / "tiny_config.py"
    path.write_text(CONFIG)
    return str(path)


def _cmd(config, workdir, *overrides):
    cache = os.path.join(os.path.dirname(config), "jax_cache")  # shared by a test's runs
    return [
        sys.executable,
        "train.py",
        "--config",
        config,
        "--workdir",
        str(workdir),
        f"--config.compilation_cache_dir={cache}",
        *overrides,
    ]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(config, workdir, *overrides, timeout=600):
    """Runs train.py to completion; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        _cmd(config, workdir, *overrides),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_cli_run_with_overrides(tmp_path):
    config = _config_file(tmp_path)
    workdir = tmp_path / "run"
    common = ("--config.total_steps=2", "--config.optimizer.lr=5e-4", "--config.train.num_rounds=2")
    proc = _run(config, workdir, *common, "--config.mesh_shape=(1,1)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.load(open(workdir / "config.json"))
    assert saved["total_steps"] == 2 and saved["optimizer"]["lr"] == 5e-4
    assert saved["train"]["num_rounds"] == 2
    assert sorted(_losses(workdir)) == [1, 2]
    assert (workdir / "model" / "config").is_dir()
    # Rerunning a finished run resumes at the end and does nothing more.
    again = _run(config, workdir, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stdout and sorted(_losses(workdir)) == [1, 2]


def test_cli_rejects_bad_values(tmp_path):
    config = _config_file(tmp_path)
    bad = _run(config, tmp_path / "bad", "--config.trainable=encoder", timeout=300)
    assert bad.returncode != 0 and "trainable must be one of" in bad.stderr
    unknown = _run(config, tmp_path / "bad2", "--config.no_such_field=1", timeout=300)
    assert unknown.returncode != 0 and "no_such_field" in unknown.stderr


@pytest.mark.slow
def test_sigterm_midway_then_resume_gives_identical_losses(tmp_path):
    config = _config_file(tmp_path)
    args = ("--config.total_steps=8", "--config.checkpoint.every_steps=5")
    reference = subprocess.Popen(
        _cmd(config, tmp_path / "ref", *args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    workdir = tmp_path / "preempted"
    run = subprocess.Popen(
        _cmd(config, workdir, *args),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert run.poll() is None, "the run ended before it could be preempted"
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    assert "preempted" in out
    stopped_at = max(_losses(workdir))
    assert 3 <= stopped_at < 8
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()  # saved off the 5-step interval

    resumed = _run(config, workdir, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {stopped_at}" in resumed.stdout
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    want, got = _losses(tmp_path / "ref"), _losses(workdir)
    assert sorted(got) == list(range(1, 9)) and sorted(want) == list(range(1, 9))
    assert got == want  # bitwise identical at every step, before and after the preemption
