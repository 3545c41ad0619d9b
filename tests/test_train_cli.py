"""Tests of train.py (sam-jax-train): config overrides, usage errors (exit 2, one line), a short
real run, SIGTERM preemption + exact resume."""

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


def _one_line(proc, code, *fragments):
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_cli_rejects_bad_values(tmp_path):
    config = _config_file(tmp_path)
    # A value out of the field's range: a usage error (2), checked before the workdir is made.
    bad = _run(config, tmp_path / "bad", "--config.trainable=encoder", timeout=300)
    _one_line(bad, 2, "trainable must be one of")
    # Usage errors (2): an unknown field (the closest one named), a value of the wrong type.
    unknown = _run(config, tmp_path / "bad2", "--config.optimizer.learnig_rate=1", timeout=300)
    _one_line(unknown, 2, "learnig_rate", "did you mean --config.optimizer.lr")
    typed = _run(config, tmp_path / "bad3", "--config.total_steps=many", timeout=300)
    _one_line(typed, 2, "--config.total_steps", "expected an integer")
    for name in ("bad", "bad2", "bad3"):
        assert not (tmp_path / name).exists()


def test_cli_usage_errors_and_shipped_configs(tmp_path):
    """--config by name (a shipped config), bad flags: one line, status 2, before any work."""
    env = _env()

    def run(*argv):
        return subprocess.run(
            [sys.executable, "train.py", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    w = f"--workdir={tmp_path / 'w'}"
    # The shipped config loads by name: its fields are what the error suggests.
    _one_line(run("--config", "demo", w, "--config.train.num_round=3"), 2, "train.num_rounds")
    _one_line(run("--config=sam_vit_b_sa1b", w, "--config.mesh=1"), 2, "--config.mesh_shape")
    _one_line(run("--config", "dmeo", w), 2, "did you mean 'demo'")
    _one_line(run("--config", "demo"), 2, "required: --workdir")
    _one_line(run("--config", "demo", w, "--num_processes=2"), 2, "missing: JAX_COORDINATOR")
    _one_line(run("--config", "demo", w, "--initialization_timeout=x"), 2, "timeout")
    assert not (tmp_path / "w").exists()
    helped = run("--help")
    assert helped.returncode == 0 and "--config.FIELD=VALUE" in helped.stdout
    assert "sam_vit_b_sa1b" in helped.stdout and "--coordinator_address" in helped.stdout


def test_config_overrides_are_typed_by_the_field():
    from sam_jax.cli import config_overrides as co
    from sam_jax.cli.common import UsageError

    config = co.load_config("demo_synthetic")
    overrides, rest = co.split_overrides(
        [
            "--config.total_steps=2",
            "--workdir",
            "w",
            "--config.mesh_shape=(2,2)",
            "--config.eval.num_points=1,5",
            "--config.optimizer.lr",
            "5e-4",
            "--noconfig.progress_bar",
            "--config.seed",
            "-3",
            "--config.data.large_scale_jitter=(0.1,2.0)",
            "--config.data.train=sa1b:gs://bucket/sa1b",
            "--config.train.supervise_all_iou=false",
            "--config.model_overrides.encoder_global_attn_indexes=(1,)",
        ]
    )
    assert rest == ["--workdir", "w"]
    co.apply_overrides(config, overrides)
    assert config.total_steps == 2 and config.mesh_shape == (2, 2)
    assert config.eval.num_points == (1, 5) and config.optimizer.lr == 5e-4
    assert config.progress_bar is False and config.seed == -3
    assert config.data.large_scale_jitter == (0.1, 2.0)
    assert config.data.train == "sa1b:gs://bucket/sa1b"
    assert config.train.supervise_all_iou is False
    assert config.model_overrides.encoder_global_attn_indexes == (1,)
    for argv, fragment in [
        (["--config.optimizer.learning_rate=1"], "did you mean --config.optimizer.lr"),
        (["--config.lr=1"], "did you mean --config.optimizer.lr"),
        (["--config.total_steps=1.5"], "expected an integer"),
        (["--config.optimizer.lr=fast"], "expected a number"),
        (["--config.progress_bar=maybe"], "expected true or false"),
        (["--config.total_steps"], "needs a value"),
        (["--config.eval.num_points=3", "--config.eval={}"], "would overwrite it"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            co.apply_overrides(co.load_config("demo_synthetic"), co.split_overrides(argv)[0])
    with pytest.raises(UsageError, match="neither a file nor a shipped config"):
        co.load_config("no_such_config")


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
