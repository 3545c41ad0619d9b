"""The whole chain on a bucket: train.py with a gs:// workdir (checkpoints, metrics.jsonl,
config.json, TensorBoard events written straight to the bucket by orbax/tensorstore and the path
layer), SIGTERM, resume from the bucket, export of model/ to the bucket, then eval.py reading the
model from the bucket and writing its reports there. The bucket is a real GCS JSON API server on
127.0.0.1 (tests/gcs_emulator.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sam_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "tiny_train_config.py")
FLAGS = ["--config.mesh_shape=(1,1)", "--config.total_steps=8", "--config.checkpoint.every_steps=4"]


def _env(gcs, tmp_path):
    env = gcs.child_env()
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=REPO,
    )
    return env


def _train(workdir, env):
    argv = [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={workdir}", *FLAGS]
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _read_losses(gcs, path):
    gcs.activate()
    try:
        rows = [json.loads(line) for line in paths.read_text(path).splitlines()]
    finally:
        gcs.deactivate()
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_train_resume_export_eval_on_a_bucket(gcs_server, tmp_path):
    gcs = gcs_server
    env = _env(gcs, tmp_path)
    workdir = gcs.url("chain", "runs", "tiny")
    metrics = f"{workdir}/metrics.jsonl"

    # 1. Train, SIGTERM after the first logged steps: a checkpoint lands in the bucket.
    proc = _train(workdir, env)
    deadline = time.time() + 600
    while time.time() < deadline and _logged_steps(gcs, metrics) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved a checkpoint at step" in out
    assert not os.path.exists(os.path.join(REPO, "gs:")), "the URL became a local folder"

    # 2. The same command resumes from the bucket, finishes and exports model/ there.
    proc = _train(workdir, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {workdir}/checkpoints at step" in out
    assert f"exported the trained model to {workdir}/model" in out
    losses = _read_losses(gcs, metrics)
    assert list(losses) == list(range(1, 9))

    # 3. eval.py reads the model from the bucket and writes its reports to the bucket.
    report = gcs.url("chain", "eval", "tiny")
    argv = [sys.executable, "eval.py", "--checkpoint", f"{workdir}/model", "--output", report]
    argv += ["--dataset", "synthetic:val?image_size=64&num_images=3", "--no-progress"]
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    gcs.activate()
    try:
        names = paths.listdir(workdir)
        assert {"checkpoints", "config.json", "metrics.jsonl", "model", "tensorboard"} <= set(names)
        steps = paths.listdir(f"{workdir}/checkpoints")
        assert "8" in steps and len(steps) >= 2
        assert json.loads(paths.read_text(f"{workdir}/config.json"))["total_steps"] == 8
        assert [n for n in paths.listdir(f"{workdir}/tensorboard") if "tfevents" in n]
        result = json.loads(paths.read_text(f"{report}/results.json"))
        entry = result["datasets"]["synthetic:val?image_size=64&num_images=3"]
        assert entry["num_masks"] > 0 and 0.0 <= entry["miou"]["1"] <= 1.0
        assert {"results.md", "results.csv", "miou_vs_points.png"} <= set(paths.listdir(report))
        import sam_jax

        model, params = sam_jax.load(f"{workdir}/model")
        assert model.config.encoder_depth == 2
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    finally:
        gcs.deactivate()


def _logged_steps(gcs, path) -> int:
    gcs.activate()
    try:
        exists = paths.exists(path)
    finally:
        gcs.deactivate()
    return len(_read_losses(gcs, path)) if exists else 0


def test_bucket_workdir_without_credentials_is_a_one_line_error(tmp_path):
    """No emulator, no credentials, no metadata server: train.py stops at once with one line
    naming the bucket path (and eval.py likewise for its output), before any training."""
    from tests.gcs_emulator import no_credentials_env

    (tmp_path / "gcloud").mkdir()
    env = no_credentials_env(str(tmp_path / "gcloud"))
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    workdir = "gs://no-such-bucket-sam-jax/run"
    argv = [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={workdir}", *FLAGS]
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot write to {workdir}" in lines[0], res.stderr[-2000:]
    assert "credentials" in lines[0]
    assert "compiled" not in res.stdout
