"""The path layer (sam_jax/paths.py), locally and on gs:// against a GCS emulator on 127.0.0.1
(tests/gcs_emulator.py), and the checkpoint, metrics and report writers on gs://: orbax through
etils.epath/gcsfs and tensorstore."""

import glob
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sam_jax import paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exercise_files(root):
    """The file operations on `root` (a folder that does not exist yet), local or remote."""
    assert not paths.exists(root) and not paths.isdir(root)
    paths.makedirs(paths.join(root, "a", "b"))
    f = paths.join(root, "a", "b", "data.bin")
    paths.write_bytes(f, b"0123456789")
    paths.write_text(paths.join(root, "a", "note.txt"), "héllo\n")
    paths.write_text(paths.join(root, "top.txt"), "x")
    assert paths.exists(f) and paths.isfile(f) and not paths.isdir(f)
    assert paths.isdir(paths.join(root, "a")) and not paths.isfile(paths.join(root, "a"))
    assert paths.read_bytes(f) == b"0123456789"
    assert paths.read_bytes(f, offset=3, size=4) == b"3456"
    assert paths.read_bytes(f, offset=8) == b"89"
    assert paths.read_text(paths.join(root, "a", "note.txt")) == "héllo\n"
    assert paths.listdir(root) == ["a", "top.txt"]
    assert paths.listdir(paths.join(root, "a")) == ["b", "note.txt"]
    with pytest.raises(FileNotFoundError):
        paths.listdir(paths.join(root, "missing"))
    walked = list(paths.walk(root))
    assert [(d, ds, fs) for d, ds, fs in walked] == [
        (paths.resolve(root) if paths.is_remote(root) else root, ["a"], ["top.txt"]),
        (paths.join(root, "a"), ["b"], ["note.txt"]),
        (paths.join(root, "a", "b"), [], ["data.bin"]),
    ]
    # Atomic writes: a rewrite changes the signature (same size), leaves no temporary file.
    sig = paths.file_signature(f)
    time.sleep(0.01)
    paths.write_bytes(f, b"9876543210")
    assert paths.file_signature(f) != sig and paths.read_bytes(f) == b"9876543210"
    assert paths.listdir(paths.join(root, "a", "b")) == ["data.bin"]
    # open: text and binary; a failed `with` block publishes nothing (remote) / a partial file
    # is the caller's (local), so only check the remote rule there.
    with paths.open(paths.join(root, "t.txt"), "w") as fh:
        fh.write("line 1\nline 2\n")
    with paths.open(paths.join(root, "t.txt"), "r") as fh:
        assert fh.read().splitlines() == ["line 1", "line 2"]
    with paths.open(f, "rb") as fh:
        fh.seek(2)
        assert fh.read(3) == b"765"
    # Appender: a log that readers see whole after every write.
    log = paths.join(root, "log.jsonl")
    with paths.Appender(log, initial=b"0\n") as app:
        app.write("1\n")
        assert paths.read_text(log) == "0\n1\n"
        app.write(b"2\n")
        assert paths.read_text(log) == "0\n1\n2\n"
    with paths.Appender(log) as app:  # initial=None keeps the content
        app.write("3\n")
    assert paths.read_text(log) == "0\n1\n2\n3\n"
    paths.remove(paths.join(root, "top.txt"))
    assert not paths.exists(paths.join(root, "top.txt"))
    paths.rmtree(paths.join(root, "a"))
    assert not paths.exists(paths.join(root, "a")) and not paths.exists(f)
    paths.rmtree(root)
    assert not paths.exists(root)
    with pytest.raises(FileNotFoundError):
        paths.rmtree(root)


def test_local_files(tmp_path):
    _exercise_files(str(tmp_path / "root"))
    assert paths.resolve("x/../y") == os.path.join(os.getcwd(), "y")
    assert paths.parent(str(tmp_path / "a")) == str(tmp_path)
    assert paths.basename(str(tmp_path / "a") + "/") == "a"


def test_gcs_files(gcs):
    root = gcs.url("files")
    _exercise_files(root)
    assert paths.is_remote(root) and not paths.is_remote("/x/y")
    assert paths.resolve(root + "/") == root
    assert paths.join("gs://b/", "x", "y") == "gs://b/x/y"
    assert paths.parent("gs://b/x/y") == "gs://b/x" and paths.parent("gs://b") == "gs://b"
    assert paths.basename("gs://b/x/y/") == "y"
    assert str(paths.epath(root + "/")) == root
    # A remote write that fails inside its `with` block publishes nothing.
    part = paths.join(root, "partial.bin")
    with pytest.raises(KeyboardInterrupt), paths.open(part, "wb") as fh:
        fh.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), paths.open(part, "w") as fh:
        fh.write("half")
        raise RuntimeError
    assert not paths.exists(part)
    with pytest.raises(ValueError, match="do not append"):
        paths.open(part, "ab")


def test_check_writable_local(tmp_path):
    target = tmp_path / "new" / "nested"
    paths.check_writable(str(target))
    assert target.is_dir() and not list(target.iterdir())  # the probe is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(paths.PathError, match=r"file$|not a folder") as e:
        paths.check_writable(str(tmp_path / "file"))
    assert str(tmp_path / "file") in str(e.value) and "\n" not in str(e.value)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(paths.PathError, match="permission denied"):
            paths.check_writable(str(ro / "sub"))


def test_check_writable_gcs(gcs):
    paths.check_writable(gcs.url("run", "1"))
    assert not paths.exists(gcs.url("run"))  # object stores have no empty folders
    with pytest.raises(paths.PathError, match=r"gs://no-such-bucket/x: bucket 'no-such-bucket'"):
        paths.check_writable("gs://no-such-bucket/x")
    paths.write_text(gcs.url("afile"), "x")
    with pytest.raises(paths.PathError, match="not a folder"):
        paths.check_writable(gcs.url("afile"))
    gcs.create_bucket("other-bucket")
    paths.check_writable("gs://other-bucket/x")


@pytest.mark.parametrize("credentials", ["none", "unusable"])
def test_check_writable_without_credentials_fails_fast(tmp_path, credentials):
    """No emulator, no (usable) credentials, no metadata server: a one-line PathError in
    seconds. "unusable": a service-account key whose token endpoint is loopback port 9."""
    from tests.gcs_emulator import no_credentials_env

    (tmp_path / "gcloud").mkdir()
    code = textwrap.dedent(
        """
        import time
        from sam_jax import paths
        t = time.monotonic()
        try:
            paths.check_writable("gs://some-bucket/run")
        except paths.PathError as e:
            print(f"{time.monotonic() - t:.2f}")
            print(e)
        """
    )
    env = no_credentials_env(str(tmp_path / "gcloud"))
    expected = "no Google Cloud credentials"
    if credentials == "unusable":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        account = {  # (an authorized-user file would ignore its token_uri: Google's is used)
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "1",
            "private_key": key.decode(),
            "client_email": "nobody@p.iam.gserviceaccount.com",
            "client_id": "1",
            "token_uri": "http://127.0.0.1:9/token",
        }
        (tmp_path / "account.json").write_text(json.dumps(account))
        env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "account.json")
        expected = "the Google Cloud credentials do not work"
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    seconds, message = out.stdout.strip().split("\n")
    assert float(seconds) < 10 and time.monotonic() - t < 30
    assert message.startswith(f"cannot write to gs://some-bucket/run: {expected}"), message
    assert "Traceback" not in out.stderr


def _state(seed):
    return {
        "w": jnp.arange(24.0).reshape(8, 3) + seed,
        "nested": {"b": jnp.full((5,), seed, jnp.int32), "s": jnp.asarray(seed, jnp.float32)},
    }


def test_orbax_checkpoints_on_gcs(gcs):
    """Async CheckpointManager saves (metadata via epath/gcsfs, arrays via tensorstore), keep
    the last 2, restore into NamedSharding targets from a fresh manager."""
    from sam_jax.checkpoints import training as checkpointing

    directory = gcs.url("workdir", "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, max_to_keep=2, async_save=True)
    assert ckpt.directory == directory and ckpt.latest_step() is None
    for step in (1, 2, 3):
        assert ckpt.save(step, _state(step), {"batches_consumed": step})
    ckpt.close()
    assert paths.listdir(directory) == ["2", "3"]
    files = {d[len(directory) :] + "/" + f for d, _, fs in paths.walk(directory) for f in fs}
    assert "/3/commit_success.txt" in files and "/3/meta/metadata" in files
    assert "/3/state/manifest.ocdbt" in files  # tensorstore's OCDBT database
    assert any(f.startswith("/3/state/ocdbt.process_0/d/") for f in files)

    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    shardings = {
        "w": NamedSharding(mesh, P("data")),
        "nested": {"b": NamedSharding(mesh, P()), "s": NamedSharding(mesh, P())},
    }
    abstract = jax.eval_shape(lambda: _state(0))
    target = checkpointing.abstract_with_shardings(abstract, shardings)
    fresh = checkpointing.Checkpointer(directory, max_to_keep=2)
    assert fresh.latest_step() == 3
    state, meta = fresh.restore(target)
    assert meta == {"batches_consumed": 3}
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert state["w"].sharding == shardings["w"]
    older, _ = fresh.restore(target, step=2)
    np.testing.assert_array_equal(older["nested"]["b"], np.full(5, 2))
    fresh.close()
    # A step without its commit file (a save cut short) is not a checkpoint; saving that step
    # again (a resumed run) replaces it.
    paths.remove(paths.join(directory, "3", "commit_success.txt"))
    again = checkpointing.Checkpointer(directory, max_to_keep=2)
    assert again.latest_step() == 2
    assert again.save(3, _state(30), {"batches_consumed": 30}, force=True)
    again.wait()
    state, meta = again.restore(target)
    assert meta == {"batches_consumed": 30} and int(state["nested"]["s"]) == 30
    again.close()


def test_child_process_uses_the_emulator(gcs):
    """child_env() is all a subprocess needs: a tensorstore + gcsfs write read back here."""
    code = textwrap.dedent(
        """
        import sys
        import jax.numpy as jnp
        import orbax.checkpoint as ocp
        from sam_jax import paths
        url = sys.argv[1]
        paths.write_text(url + "/hello.txt", "from the child")
        with ocp.StandardCheckpointer() as c:
            c.save(paths.epath(url + "/ckpt"), {"x": jnp.arange(4)})
        """
    )
    url = gcs.url("child")
    out = subprocess.run(
        [sys.executable, "-c", code, url],
        cwd=REPO,
        env=gcs.child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert paths.read_text(url + "/hello.txt") == "from the child"
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        got = c.restore(paths.epath(url + "/ckpt"))
    np.testing.assert_array_equal(got["x"], np.arange(4))


def test_converted_checkpoints_on_gcs(gcs):
    import torch

    from sam_jax import checkpoints
    from sam_jax.checkpoints.mapping import flatten_params, state_dict_to_params
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official, state_dict_numpy

    config = tiny_config()
    sd = state_dict_numpy(build_official(config, seed=3))
    params = state_dict_to_params(sd, config)
    url = gcs.url("models", "tiny")
    checkpoints.save_converted(url, config, params)
    assert paths.isfile(paths.join(url, "commit_success.txt"))
    assert json.loads(paths.read_text(paths.join(url, "config", "metadata"))) == config.to_dict()
    assert checkpoints.read_converted_config(url) == config
    got_config, got = checkpoints.load_converted(url)
    flat, flat2 = flatten_params(params), flatten_params(got)
    assert got_config == config and all(np.array_equal(flat[k], flat2[k]) for k in flat)
    with pytest.raises(FileExistsError, match="exists already"):
        checkpoints.save_converted(url, config, params)
    checkpoints.save_converted(url, config, params, overwrite=True)
    model, _ = checkpoints.load(url)
    assert model.config == config
    with pytest.raises(ValueError, match="params do not match"):
        checkpoints.save_converted(gcs.url("models", "bad"), tiny_config(decoder_depth=1), params)
    assert not paths.exists(gcs.url("models", "bad"))
    # A .pth on gs://: written whole, read through paths.open (and its SHA-256 checked).
    pth = gcs.url("models", "tiny.pth")
    checkpoints.save_pth(pth, sd)
    with pytest.raises(FileExistsError):
        checkpoints.save_pth(pth, sd)
    buf = io.BytesIO(paths.read_bytes(pth))
    assert set(torch.load(buf, weights_only=True)) == set(sd)
    import hashlib

    digest = hashlib.sha256(paths.read_bytes(pth)).hexdigest()
    got_config, got = checkpoints.load_pth(
        pth, decoder_num_heads=config.decoder_num_heads, sha256=digest
    )
    assert got_config == config
    # An unfinished directory (no commit file) is refused.
    paths.remove(paths.join(url, "commit_success.txt"))
    with pytest.raises(ValueError, match="incomplete"):
        checkpoints.read_converted_config(url)


def _events(data: bytes):
    """(step, {tag: value}) of an event file's bytes, parsed by tensorflow (CRCs checked)."""
    import tempfile

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    with tempfile.NamedTemporaryFile(suffix=".tfevents") as f:
        f.write(data)
        f.flush()
        events = [
            event_pb2.Event.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(f.name)  # fails on a bad length or data CRC
        ]
    assert events[0].file_version == "brain.Event:2"
    return [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_metric_writer(where, tmp_path, request):
    from sam_jax.training import metric_writer

    workdir = str(tmp_path / "w") if where == "local" else request.getfixturevalue("gcs").url("w")
    writer = metric_writer.MetricWriter(workdir)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "lr": np.float32(0.5), "bad": float("nan")})
        assert len(metric_writer.read_jsonl(paths.join(workdir, "metrics.jsonl"))) == step
    writer.close()
    rows = metric_writer.read_jsonl(paths.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["bad"] == "nan"
    (event_file,) = paths.listdir(paths.join(workdir, "tensorboard"))
    assert event_file.startswith("events.out.tfevents.")
    events = _events(paths.read_bytes(paths.join(workdir, "tensorboard", event_file)))
    assert [s for s, _ in events] == [1, 2, 3]
    assert events[1][1] == {"loss": 0.5, "lr": 0.5}  # NaN is not a scalar event
    resumed = metric_writer.MetricWriter(workdir, resume_step=2)  # steps after 2 are redone
    resumed.write(3, {"loss": 9.0})
    resumed.close()
    rows = metric_writer.read_jsonl(paths.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 9.0)]
    assert len(paths.listdir(paths.join(workdir, "tensorboard"))) == 2


def test_reports_and_inputs_on_gcs(gcs, tmp_path):
    from PIL import Image

    from sam_jax.evaluation import detections, report

    results = {
        "checkpoint": "x",
        "datasets": {
            "a": {"num_images": 2, "num_masks": 3, "miou": {"1": 0.5, "3": 0.7}},
            "b": {"num_images": 1, "num_masks": 1, "miou": {"1": 0.25, "3": 0.5}},
        },
    }
    out = gcs.url("eval")
    written = report.write_reports(results, out)
    assert sorted(written) == ["csv", "json", "markdown", "plot"]
    assert paths.listdir(out) == ["miou_vs_points.png", "results.csv", "results.json", "results.md"]
    assert json.loads(paths.read_text(written["json"]))["average"]["num_datasets"] == 2
    assert paths.read_text(written["markdown"]) == report.markdown_table(results)
    assert paths.read_bytes(written["plot"])[:8] == b"\x89PNG\r\n\x1a\n"
    local = report.write_reports(results, str(tmp_path / "eval"))
    assert open(local["csv"]).read() == paths.read_text(written["csv"])
    # Detections and images are read through paths too.
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), 200, np.uint8)).save(buf, format="PNG")
    paths.write_bytes(gcs.url("images", "1.png"), buf.getvalue())
    image = detections.read_image_at(gcs.url("images"), {"file_name": "1.png"})
    assert image.shape == (4, 6, 3) and image[0, 0, 0] == 200
    assert detections.read_image_at(gcs.url("images"), {"file_name": "missing.png"}) is None
    gt = types.SimpleNamespace(imgs={1: {}})
    with pytest.raises(ValueError, match="does not exist"):
        detections.load_detections(gcs.url("missing.json"), gt)
    det = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}
    paths.write_text(gcs.url("dets.json"), json.dumps([det]))
    assert detections.load_detections(gcs.url("dets.json"), gt) == {1: [det]}


def test_emulator_helper_settings(gcs):
    """What the helper exports (the chain tests pass it to train.py / eval.py)."""
    env = gcs.env
    assert env["STORAGE_EMULATOR_HOST"] == env["TENSORSTORE_GCS_HTTP_URL"] == gcs.endpoint
    assert gcs.endpoint.startswith("http://127.0.0.1:")
    assert env["EPATH_USE_TF"] == "false" and env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    child = gcs.child_env({"PATH": "/bin", "GOOGLE_APPLICATION_CREDENTIALS": "/x.json"})
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in child and child["PATH"] == "/bin"
    assert gcs.url("a", "/b/") == "gs://test-bucket/a/b"
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs.endpoint  # activated for this test
    assert glob.glob(os.path.join(env["CLOUDSDK_CONFIG"], "*")) == []


def test_no_empty_leftovers_removes_only_new_empty_folders(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("x")
    with pytest.raises(RuntimeError):
        with paths.no_empty_leftovers(tmp_path / "kept", tmp_path / "new" / "deep" / "out"):
            (tmp_path / "kept" / "empty" / "checkpoints").mkdir(parents=True)
            (tmp_path / "kept" / "with_file").mkdir()
            (tmp_path / "kept" / "with_file" / "f").write_text("y")
            (tmp_path / "new" / "deep" / "out" / "sub").mkdir(parents=True)
            raise RuntimeError("the command failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["old.txt", "with_file"]
    with paths.no_empty_leftovers(tmp_path / "fine"):  # success: nothing removed
        (tmp_path / "fine").mkdir()
    assert (tmp_path / "fine").is_dir()
