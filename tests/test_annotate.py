"""The data engine's automatic stage (`sam-jax-annotate auto`): SA-1B JSON per image, equal to
the single-image generator, every image exactly once over 2 processes, resumable after SIGTERM,
unreadable images reported, and the output read back as an `sa1b:` training source.

Random tiny weights keep no mask at the paper's thresholds, so the runs relax them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_multiprocess import _env, _finish, _launch

REPO = Path(__file__).resolve().parents[1]
RELAXED = {
    "points_per_side": 4,
    "points_per_batch": 8,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "stability_score_offset": 0.02,  # the small logits of a random tiny model
    "box_nms_thresh": 0.95,
    "crop_nms_thresh": 0.95,
    "crop_n_layers": 1,
    "crop_n_points_downscale_factor": 2,
    "min_mask_region_area": 20,
}
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in RELAXED.items()]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = np.full((72 + 8 * (i % 3), 96, 3), 30, np.uint8)
        y, x = rng.integers(5, 40, 2)
        img[y : y + 25, x : x + 30] = rng.integers(120, 255, 3)
        path = folder / (f"img_{i}.png" if i % 2 else f"sa_{100 + i}.jpg")
        Image.fromarray(img).save(path, quality=95)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sam_jax.checkpoints import save_converted
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official, state_dict_numpy

    config = tiny_config()
    params = state_dict_to_params(
        state_dict_numpy(build_official(config, seed=0, perturb=0.05)), config
    )
    path = tmp_path_factory.mktemp("annotate_ckpt") / "ckpt"
    save_converted(path, config, params)
    return path


def _read_outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_records_equal_the_single_image_generator(checkpoint, tmp_path):
    import sam_jax
    from sam_jax.amg import SamAutomaticMaskGenerator
    from sam_jax.annotate.auto import MAX_AREA_FRACTION, PAPER_SETTINGS, annotate_dataset
    from sam_jax.images import decode_image

    model, params = sam_jax.load(checkpoint)
    images = _images(tmp_path / "in", 4)
    result = annotate_dataset(model, params, str(tmp_path / "in"), str(tmp_path / "out"), RELAXED)
    assert (result.annotated, result.skipped, result.failed) == (4, 0, [])
    generator = SamAutomaticMaskGenerator(
        model, params, output_mode="coco_rle", **{**PAPER_SETTINGS, **RELAXED}
    )
    total = 0
    for path in images:
        stem = path.stem
        record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        image = decode_image(path.read_bytes())
        h, w = image.shape[:2]
        expected = [r for r in generator.generate(image) if r["area"] < MAX_AREA_FRACTION * h * w]
        position = sorted(p.name for p in images).index(path.name)
        expected_id = int(stem[3:]) if stem.startswith("sa_") else position + 1
        assert record["image"] == {
            "image_id": expected_id,
            "width": w,
            "height": h,
            "file_name": f"{stem}.jpg",
        }
        got = record["annotations"]
        assert len(got) == len(expected) > 0
        for a, e in zip(got, expected, strict=True):
            assert a["segmentation"] == e["segmentation"]
            for key in (
                "area",
                "bbox",
                "predicted_iou",
                "stability_score",
                "point_coords",
                "crop_box",
            ):
                assert a[key] == e[key], key
        assert len({a["id"] for a in got}) == len(got)
        # The copied image is the image the masks were made on.
        copied = decode_image((tmp_path / "out" / f"{stem}.jpg").read_bytes())
        assert copied.shape == image.shape
        if path.suffix == ".jpg":
            assert (tmp_path / "out" / f"{stem}.jpg").read_bytes() == path.read_bytes()
        total += len(got)
    assert result.masks == total
    # A second run skips every finished image and changes nothing.
    before = _read_outputs(tmp_path / "out")
    again = annotate_dataset(model, params, str(tmp_path / "in"), str(tmp_path / "out"), RELAXED)
    assert (again.annotated, again.skipped) == (0, 4)
    assert _read_outputs(tmp_path / "out") == before


def test_unreadable_images_are_reported_and_the_exit_status_is_1(checkpoint, tmp_path, capsys):
    from sam_jax.cli.annotate import main

    _images(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    argv = [
        "auto",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
        *FLAGS,
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "Could not annotate" in captured.out and "broken.png" in captured.out
    assert "2 images annotated" in captured.out and "1 failed" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".json") == [
        "img_1.json",
        "sa_100.json",
    ]


def _annotate_cmd(checkpoint, src, out, *extra):
    return [
        "-m",
        "sam_jax.annotate",
        "auto",
        f"--checkpoint={checkpoint}",
        f"--input={src}",
        f"--output={out}",
        "--no-progress",
        *FLAGS,
        *extra,
    ]


def _run(argv, processes, devices, cache_dir):
    """[(exit status, stdout, stderr)] of `argv` run as `processes` joined processes."""
    return _finish(_launch(argv, processes, devices, cache_dir))


@pytest.mark.slow
def test_two_processes_annotate_every_image_once_like_one(checkpoint, tmp_path):
    cache = str(tmp_path / "xla")
    _images(tmp_path / "in", 7)
    one = _run(_annotate_cmd(checkpoint, tmp_path / "in", tmp_path / "one"), 1, 2, cache)
    two = _run(_annotate_cmd(checkpoint, tmp_path / "in", tmp_path / "two"), 2, 2, cache)
    for rc, _, err in one + two:
        assert rc == 0, err
    assert "7 images annotated" in one[0][1] and "over 1 process(es)" in one[0][1]
    # Process 0 reports the sum over both processes: 7 means no image was done twice.
    assert "7 images annotated" in two[0][1] and "over 2 process(es)" in two[0][1]
    assert "Done" not in two[1][1] and "Loading" not in two[1][1]  # only process 0 prints
    assert _read_outputs(tmp_path / "two") == _read_outputs(tmp_path / "one")
    assert len(_read_outputs(tmp_path / "one")) == 14  # 7 JSONs + 7 images


@pytest.mark.slow
def test_sigterm_then_rerun_gives_the_files_of_an_uninterrupted_run(checkpoint, tmp_path):
    cache = str(tmp_path / "xla")
    _images(tmp_path / "in", 8)
    full = _run(_annotate_cmd(checkpoint, tmp_path / "in", tmp_path / "full"), 1, 1, cache)
    assert full[0][0] == 0, full[0][2]
    out = tmp_path / "cut"
    argv = _annotate_cmd(checkpoint, tmp_path / "in", out, "--workers-per-device=1")
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=_env(1, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and any(out.glob("*.json"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    done = sorted(p.name for p in out.glob("*.json"))
    assert proc.returncode == 130, err
    assert 1 <= len(done) < 8, "the run was not interrupted part-way"
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert leftovers == []
    again = _run(_annotate_cmd(checkpoint, tmp_path / "in", out), 1, 1, cache)
    assert again[0][0] == 0, again[0][2]
    assert f"{len(done)} already done" in again[0][1]
    assert _read_outputs(out) == _read_outputs(tmp_path / "full")


@pytest.mark.slow
def test_the_output_is_an_sa1b_training_source(checkpoint, tmp_path):
    import sam_jax
    from sam_jax.annotate.auto import annotate_dataset
    from sam_jax.data import make_train_iterator

    model, params = sam_jax.load(checkpoint)
    _images(tmp_path / "in", 4)
    annotate_dataset(model, params, str(tmp_path / "in"), str(tmp_path / "out"), RELAXED)
    batch = next(
        make_train_iterator(
            f"sa1b:{tmp_path / 'out'}",
            batch_size=4,
            image_size=64,
            mask_size=16,
            max_masks=4,
            backend="threads",
        )
    )
    assert batch["image"].shape == (4, 64, 64, 3) and batch["mask_valid"].any(1).all()
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"--config={REPO / 'tests' / 'tiny_train_config.py'}",
            f"--workdir={tmp_path / 'work'}",
            f"--config.data.train=sa1b:{tmp_path / 'out'}",
            "--config.total_steps=2",
            "--config.eval.dataset=",
            "--config.progress_bar=false",
            "--config.data.max_masks=4",
        ],
        cwd=REPO,
        env=_env(4, str(tmp_path / "xla")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "work" / "model").is_dir()
