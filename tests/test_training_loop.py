"""Tests of the training loop on a fake dataset: logs, checkpoints, resume, SIGTERM, NaN stop."""

import glob
import json
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from training_fakes import fake_iterator, tiny_train_config

from sam_jax import errors
from sam_jax.training import train_loop, train_step
from sam_jax.training.metric_writer import read_jsonl


def _losses(workdir):
    return {
        r["step"]: r["loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "loss" in r
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache shared by the runs of this module (same program)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def _config(cache_dir):
    config = tiny_train_config()
    config.compilation_cache_dir = cache_dir
    return config


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_dir):
    """An uninterrupted 4-step run (shared by the tests below)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train_loop.train_and_evaluate(_config(cache_dir), workdir, fake_iterator)
    return workdir, result


@pytest.mark.slow
def test_logs_checkpoints_and_export(reference_run):
    workdir, result = reference_run
    assert result["step"] == 4 and not result["preempted"]
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "focal", "dice", "iou_mse", "lr", "images_per_s", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in rows), key
    for r in rows:  # the total is the weighted sum of its parts (summed over rounds)
        assert r["loss"] == pytest.approx(20 * r["focal"] + r["dice"] + r["iou_mse"], rel=1e-4)
    assert rows[0]["lr"] == pytest.approx(1e-3 / 2)  # warm-up 2 steps
    assert len(set(r["loss"] for r in rows)) == 4
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*"))
    assert steps == [2, 4]
    assert glob.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["total_steps"] == 4

    from sam_jax import load

    model, params = load(os.path.join(workdir, "model"))
    assert model.config.image_size == 64 and model.config.drop_path_rate == 0.0


@pytest.mark.slow
def test_tensorboard_events_are_readable(reference_run):
    import tensorflow as tf

    workdir, _ = reference_run
    path = glob.glob(f"{workdir}/tensorboard/events.out.tfevents.*")[0]
    from tensorflow.core.util import event_pb2

    tags = {}
    for record in tf.data.TFRecordDataset(path):
        event = event_pb2.Event.FromString(record.numpy())
        for v in event.summary.value:
            tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    assert [s for s, _ in tags["loss"]] == [1, 2, 3, 4]
    want = _losses(workdir)
    np.testing.assert_allclose(
        [v for _, v in tags["loss"]], [want[s] for s in (1, 2, 3, 4)], rtol=1e-6
    )


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(reference_run, tmp_path, cache_dir):
    ref_dir, _ = reference_run
    workdir = str(tmp_path / "preempted")

    def preempting_iterator(config, sam_config, start_batch, rows, index_dir):
        for i, batch in enumerate(fake_iterator(config, sam_config, start_batch, rows)):
            if start_batch == 0 and i == 1:  # during step 2 of the first run
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    first = train_loop.train_and_evaluate(_config(cache_dir), workdir, preempting_iterator)
    assert first["preempted"] and first["step"] == 2
    second = train_loop.train_and_evaluate(_config(cache_dir), workdir, preempting_iterator)
    assert not second["preempted"] and second["step"] == 4
    assert _losses(workdir) == _losses(ref_dir)  # bitwise equal at every step


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    original = train_step.simulate_and_loss

    def poisoned(model, params, emb, batch, key, tc, *lora):
        loss, metrics = original(model, params, emb, batch, key, tc, *lora)
        bad = batch["image"][0, 0, 0, 0] == 255  # the fake batch of step 3 carries the marker
        loss = jnp.where(bad, jnp.nan, loss)
        return loss, {**metrics, "loss": loss}

    def iterator(config, sam_config, start_batch, rows, index_dir):
        for i, batch in enumerate(fake_iterator(config, sam_config, start_batch, rows)):
            batch["image"][0, 0, 0, 0] = 255 if i == 2 else 0
            yield batch

    monkeypatch.setattr(train_step, "simulate_and_loss", poisoned)
    config = tiny_train_config()
    config.checkpoint.every_steps = 1
    with pytest.raises(errors.NonFiniteLossError, match="at step 3.*last good checkpoint: step 2"):
        train_loop.train_and_evaluate(config, str(tmp_path), iterator)
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{tmp_path}/checkpoints/*"))
    assert steps == [1, 2]
    assert read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["loss"] == "nan"


def test_bad_config_is_rejected(tmp_path):
    config = tiny_train_config()
    config.batch_size = 3
    config.mesh_shape = (1, 1)
    config.trainable = "everything"
    with pytest.raises(ValueError, match="trainable must be one of"):
        train_loop.train_and_evaluate(config, str(tmp_path), fake_iterator)


def _copy_of(reference_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(reference_run[0], workdir)
    return workdir


@pytest.mark.slow
def test_resume_restores_before_any_init_checkpoint_is_read(reference_run, tmp_path, monkeypatch):
    """big_vision's order: a workdir with a checkpoint resumes from it; the init checkpoint
    (here one that does not even exist) is never opened, the architecture comes from the saved
    checkpoint."""
    from sam_jax.training import initialization

    def never(*args, **kwargs):
        raise AssertionError("the init checkpoint was read on resume")

    monkeypatch.setattr(initialization, "initial_params", never)
    monkeypatch.setattr(initialization, "sam_config_from", never)
    workdir = _copy_of(reference_run, tmp_path)
    config = tiny_train_config()
    config.init.type, config.init.path = "sam", str(tmp_path / "no-such-checkpoint.pth")
    result = train_loop.train_and_evaluate(config, workdir, fake_iterator)
    assert result["step"] == 4 and not result["preempted"]
    assert os.path.isdir(os.path.join(workdir, "model"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, named",
    [
        (lambda c: setattr(c.model_overrides, "encoder_depth", 3), "encoder_depth"),
        (lambda c: setattr(c, "trainable", "mask_decoder"), "trainable"),
    ],
)
def test_workdir_of_another_experiment_is_refused(reference_run, tmp_path, change, named):
    workdir = _copy_of(reference_run, tmp_path)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    config = tiny_train_config()
    change(config)
    with pytest.raises(errors.WorkdirMismatchError, match=f"another experiment.*{named}"):
        train_loop.train_and_evaluate(config, workdir, fake_iterator)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
