"""Executes every notebook in notebooks/ top to bottom (nbclient, offline) and checks its outputs.

Each notebook runs in its own temporary working directory with SAM_JAX_OFFLINE=1, so the
checkpoint download is skipped and the notebook falls back to a tiny SAM it makes itself. The
notebooks write their figures and a JSON summary under outputs/ in that directory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ipykernel  # noqa: F401 - the kernel the notebooks run in (the test extra)
import nbclient
import nbformat
import pytest

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


def _execute(name: str, cwd: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAM_JAX_OFFLINE", "1")
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
    assert "FALLBACK" in streams or name == "tpu_training", (
        "the notebook did not say it uses the offline fallback"
    )


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


@pytest.mark.slow
def test_predictor_example(tmp_path, monkeypatch):
    _execute("predictor_example", tmp_path, monkeypatch)
    s = _summary(tmp_path, "predictor")
    assert s["fallback"] is True
    keys = {"point", "points_negative", "box", "box_point", "boxes_batch"}
    assert set(s["figures"]) == keys and set(s["predictions"]) == keys
    for rel in s["figures"].values():
        _check_png(tmp_path / rel)
    p = s["predictions"]
    assert p["point"]["masks_shape"] == [3, 512, 512] and len(p["point"]["scores"]) == 3
    for k in ("points_negative", "box", "box_point"):
        assert p[k]["masks_shape"] == [1, 512, 512]
    assert p["boxes_batch"]["masks_shape"] == [4, 1, 512, 512]
    assert len(p["boxes_batch"]["scores"]) == 4


@pytest.mark.slow
def test_automatic_mask_generator_example(tmp_path, monkeypatch):
    _execute("automatic_mask_generator_example", tmp_path, monkeypatch)
    s = _summary(tmp_path, "amg")
    _check_png(tmp_path / s["figures"]["masks"])
    assert {"default", "tuned"} <= set(s["runs"])
    tuned = s["runs"]["tuned"]
    assert tuned["num_masks"] >= 1, "the tuned thresholds kept no mask"
    assert tuned["segmentation_shape"] == [256, 256]
    assert {"segmentation", "area", "bbox", "predicted_iou", "stability_score"} <= set(
        tuned["keys"]
    )
    assert all(a >= 20 for a in tuned["areas"])  # min_mask_region_area=20
    assert s["runs"]["default"]["seconds"] > 0 and tuned["seconds"] > 0


@pytest.mark.slow
def test_tpu_training(tmp_path, monkeypatch):
    _execute("tpu_training", tmp_path, monkeypatch)
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
    _execute("finetune_example", tmp_path, monkeypatch)
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
    # LoRA: the adapters merged into the encoder change it; the decoder trains beside them.
    lora = s["lora"]
    assert lora["rank"] == 4 and lora["targets"] == ["qkv"] and lora["trainable"] == "mask_decoder"
    assert lora["changed_parts"] == {
        "image_encoder": True,
        "prompt_encoder": False,
        "mask_decoder": True,
    }
    assert lora["miou"]["1pt"] > before["1pt"], (before, lora)
