"""eval.py (sam-jax-eval): reports end to end on a tiny checkpoint, and one-line errors with the
commands' exit status (1 the work failed, 2 usage error) for bad input."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.metrics import encode_rle

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic:val?image_size=64&num_images=2"


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments, code=1):
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sam_jax.checkpoints import save_converted
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official, state_dict_numpy

    config = tiny_config()
    params = state_dict_to_params(state_dict_numpy(build_official(config, seed=1)), config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_converted(path, config, params)
    return path


def _coco(tmp_path, broken=True):
    """Two readable images (one with a zero-area annotation) and one unreadable image."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(3):
        name = f"{i}.png"
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64})
        if i == 2 and broken:
            (tmp_path / "images" / name).write_bytes(b"\x89PNG broken")
        else:
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / name)
        for k, box in enumerate([(5, 5, 20, 18), (22, 10, 40, 35)]):
            m = np.zeros((64, 64), bool)
            if not (i == 0 and k == 1):  # image 1's second object has zero area
                m[box[1] : box[3], box[0] : box[2]] = True
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": encode_rle(m),
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in anns
        if a["area"] > 0
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}", tmp_path / "dets.json"


@pytest.mark.slow
def test_end_to_end(tmp_path, checkpoint, capsys):
    coco, dets = _coco(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--dataset",
        SYNTHETIC,
        "--dataset",
        coco,
        "--output",
        out,
        "--num-points",
        "1,2,3",
        "--detections",
        dets,
        "--no-progress",
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    syn, cc = results["datasets"][SYNTHETIC], results["datasets"][coco]
    assert syn["num_images"] == 2 and syn["num_masks"] == 4  # see the synthetic val split
    assert set(syn["miou"]) == {"1", "2", "3"}
    assert all(0 <= v <= 1 for v in syn["miou"].values())
    assert 0 <= syn["oracle_miou_1"] <= 1 and syn["oracle_miou_1"] >= syn["miou"]["1"] - 1e-12
    assert syn["box_miou"] is not None and syn["mask_ap"] is None
    assert cc["num_images"] == 2 and cc["num_masks"] == 3
    assert cc["skipped_images"] == 1 and cc["skipped_masks"] == 1
    assert cc["mask_ap"] is not None and 0 <= cc["mask_ap"]["AP"] <= 1
    assert cc["detections"]["skipped_images"] == 1
    assert results["protocol"]["feed_mask"] is False and results["seed"] == 0
    assert results["checkpoint"] == str(checkpoint)
    for key in ("images_per_s", "masks_per_s"):
        assert syn["timing"][key] > 0
    avg = results["average"]["miou"]["1"]
    assert avg == pytest.approx((syn["miou"]["1"] + cc["miou"]["1"]) / 2)
    md = (out / "results.md").read_text()
    assert md in stdout and "average (2 datasets)" in md
    assert (out / "results.csv").exists()
    with Image.open(out / "miou_vs_points.png") as im:
        assert im.format == "PNG"
    assert "images/s" in err and "masks/s" in err

    # Subsampling and the random first point are recorded and change what is evaluated.
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--dataset",
        SYNTHETIC,
        "--output",
        out,
        "--num-points",
        "1",
        "--max-masks",
        "3",
        "--first-point",
        "random",
        "--feed-mask",
        "--no-boxes",
        "--no-progress",
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    syn = results["datasets"][SYNTHETIC]
    assert syn["num_masks"] == 3 and syn["num_masks_available"] == 4
    assert syn["box_miou"] is None
    assert (
        results["protocol"] | {"max_masks": 3, "first_point": "random", "feed_mask": True}
        == results["protocol"]
    )


@pytest.mark.parametrize(
    "argv, fragments, code",
    [
        (["--checkpoint", "c", "--output", "o"], ["--dataset"], 2),
        (["--checkpoint", "c", "--output", "o", "--dataset", "bogus:1"], ["unknown kind"], 2),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "coco:only_one"],
            ["coco:ANN_JSON"],
            2,
        ),
        (  # a path the spec names that does not exist: the work fails (1), before any work
            ["--checkpoint", "c", "--output", "o", "--dataset", "coco:/no/ann.json:/tmp"],
            ["does not exist"],
            1,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--num-points", "1,x"],
            ["--num-points"],
            2,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--max-masks", "0"],
            ["--max-masks"],
            2,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--bogus"],
            ["unrecognized arguments: --bogus"],
            2,
        ),
        (
            ["--checkpoint", "/no/ckpt", "--output", "o", "--dataset", "synthetic"],
            ["checkpoint", "does not exist"],
            1,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--detections", "d"],
            ["exactly one coco"],
            2,
        ),
    ],
)
def test_bad_arguments(capsys, tmp_path, argv, fragments, code):
    argv = [str(tmp_path / a) if a in ("o",) else a for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, *fragments, code=code)


def test_annotation_file_not_coco(capsys, tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"not": "coco"}]))
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        "c",
        "--output",
        tmp_path / "o",
        "--dataset",
        f"coco:{tmp_path / 'ann.json'}:{tmp_path}",
    )
    assert_one_line_error(rc, err, "ann.json", code=2)


def test_checkpoint_that_does_not_load(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    rc, _, err = run_cli(
        capsys, "--checkpoint", bad, "--output", tmp_path / "o", "--dataset", SYNTHETIC
    )
    assert_one_line_error(rc, err, "bad.pth", "is not a PyTorch checkpoint")
    (tmp_path / "dir").mkdir()
    rc, _, err = run_cli(
        capsys, "--checkpoint", tmp_path / "dir", "--output", tmp_path / "o", "--dataset", SYNTHETIC
    )
    assert_one_line_error(rc, err, "is not a checkpoint folder")


def test_dataset_without_readable_images_is_an_error(capsys, tmp_path, checkpoint):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"broken")
    m = np.ones((8, 8), bool)
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": encode_rle(m),
                "area": 64.0,
                "bbox": [0, 0, 8, 8],
            }
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    spec = f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}"
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--output",
        tmp_path / "o",
        "--dataset",
        spec,
        "--no-progress",
    )
    assert_one_line_error(rc, err, "no masks to evaluate", spec)


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "--checkpoint",
            "c",
            "--output",
            str(tmp_path),
            "--dataset",
            "sa1b:/does/not/exist",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "does not exist", code=1)
