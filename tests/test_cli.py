"""The commands sam-jax-amg and sam-jax-predict (sam_jax.cli.amg / .predict), run in-process;
the exit-status convention (0 ok, 1 failed, 2 usage) and one-line errors."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax import outputs
from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.checkpoints import save_converted, save_pth
from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.cli import amg, common, predict
from sam_jax.config import tiny_config
from sam_jax.modeling import build_sam
from sam_jax.predictor import SamPredictor
from tests.torch_reference import build_official, state_dict_numpy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
AMG_FLAGS = [
    "--points-per-side", "4", "--points-per-batch", "8",
    "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
]  # fmt: skip
AMG_KWARGS = dict(
    points_per_side=4, points_per_batch=8, pred_iou_thresh=0, stability_score_thresh=0
)


def _image(seed, h=72, w=96):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 50, np.uint8)
    img[10 : h // 2, 15 : w // 2] = [210, 40, 40]
    return (img + rng.integers(0, 30, img.shape)).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = tiny_config()
    state_dict = state_dict_numpy(build_official(config, seed=0))
    params = state_dict_to_params(state_dict, config)
    ckpt = root / "tiny_ckpt"
    save_converted(ckpt, config, params)
    save_pth(root / "tiny.pth", state_dict)
    images = root / "images"
    images.mkdir()
    Image.fromarray(_image(0)).save(images / "a.png")
    Image.fromarray(_image(1)).save(images / "b.png")
    (images / "broken.jpg").write_bytes(b"this is not an image")
    (images / "subdir").mkdir()
    return {
        "ckpt": str(ckpt),
        "pth": str(root / "tiny.pth"),
        "images": images,
        "model": build_sam(config),
        "params": params,
    }


def _expected(setup, name, **kw):
    image = np.asarray(Image.open(setup["images"] / name).convert("RGB"))
    gen = SamAutomaticMaskGenerator(setup["model"], setup["params"], **AMG_KWARGS, **kw)
    return gen.generate(image)


def test_amg_folder_of_pngs_and_failures(setup, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--checkpoint", setup["ckpt"], "--input", str(setup["images"]), "--output", str(out)]
    assert amg.main(argv + AMG_FLAGS) == 1  # one unreadable file
    printed = capsys.readouterr()
    assert (
        "Could not load" in printed.out + printed.err and "broken.jpg" in printed.out + printed.err
    )
    assert "2 of 3 images processed, 1 failed" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    for name in ("a", "b"):
        expected = _expected(setup, f"{name}.png")
        assert len(expected) > 0
        with open(out / name / "metadata.csv") as f:
            rows = list(csv.reader(f))
        assert ",".join(rows[0]) == outputs.METADATA_HEADER
        assert len(rows) == len(expected) + 1
        assert len(list((out / name).glob("*.png"))) == len(expected)
        for rec, row in zip(expected, rows[1:], strict=True):
            i = int(row[0])
            png = np.asarray(Image.open(out / name / f"{i}.png"))
            assert set(np.unique(png)) <= {0, 255}
            np.testing.assert_array_equal(png == 255, rec["segmentation"])
            assert int(row[1]) == rec["area"]
            assert [int(v) for v in row[2:6]] == rec["bbox"]
            assert [float(v) for v in row[6:8]] == rec["point_coords"][0]
            assert float(row[8]) == pytest.approx(rec["predicted_iou"])
            assert [int(v) for v in row[10:14]] == rec["crop_box"]


def test_amg_single_image_rle_json(setup, tmp_path):
    out = tmp_path / "out"
    image = str(setup["images"] / "b.png")
    argv = ["--checkpoint", setup["ckpt"], "--input", image, "--output", str(out)]
    assert amg.main(argv + AMG_FLAGS + ["--convert-to-rle", "--box-nms-thresh", "0.8"]) == 0
    with open(out / "b.json") as f:
        records = json.load(f)
    expected = _expected(setup, "b.png", box_nms_thresh=0.8)
    assert len(records) == len(expected) > 0
    for rec, exp in zip(records, expected, strict=True):
        np.testing.assert_array_equal(
            mask_utils.decode(rec["segmentation"]).astype(bool), exp["segmentation"]
        )
        assert rec["area"] == exp["area"] and rec["bbox"] == exp["bbox"]


def _one_line_error(err, prog, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_amg_bad_arguments(setup, tmp_path, capsys):
    base = ["--checkpoint", setup["ckpt"], "--output", str(tmp_path / "o")]
    # Usage errors (2): a bad flag value, checked before any model is loaded.
    assert amg.main(base + ["--input", str(setup["images"]), "--points-per-side", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "points_per_side must be >= 1")
    assert amg.main(base + ["--input", "x", "--points-per-side", "two"]) == 2
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "--points-per-side")
    assert amg.main(base + ["--input", "x", "--model-type", "vit_q"]) == 2
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "--model-type")
    # The work failed (1): missing input, unreadable images, a missing or mismatched checkpoint.
    assert amg.main(base + ["--input", str(tmp_path / "missing")]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "missing", "does not exist")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x89PNG broken")
    assert amg.main(base + ["--input", str(only_bad)]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "0 of 1 images processed, 1 failed")
    assert not (tmp_path / "o").exists()  # nothing written: no empty output folder
    missing_ckpt = ["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    assert amg.main(missing_ckpt + ["--input", str(setup["images"] / "a.png")]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "nope", "does not exist")
    wrong_type = ["--checkpoint", setup["pth"], "--model-type", "vit_b", "--output", str(tmp_path)]
    assert amg.main(wrong_type + ["--input", str(setup["images"] / "a.png")]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-amg", "vit_b")


def test_predict_points_and_box(setup, tmp_path, capsys):
    out = tmp_path / "pred"
    image_path = str(setup["images"] / "a.png")
    argv = ["--checkpoint", setup["ckpt"], "--image", image_path, "--output", str(out)]
    assert (
        predict.main(argv + ["--point", "30,20", "--point", "70,50,0", "--box", "10,5,60,40"]) == 0
    )
    summary = json.loads((out / "scores.json").read_text())
    assert summary["multimask_output"] is False and len(summary["masks"]) == 1
    assert summary["labels"] == [1, 0] and summary["box"] == [10, 5, 60, 40]

    image = np.asarray(Image.open(image_path).convert("RGB"))
    predictor = SamPredictor(setup["model"], setup["params"])
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=np.array([[30, 20], [70, 50]]),
        point_labels=np.array([1, 0]),
        box=np.array([10, 5, 60, 40]),
        multimask_output=False,
    )
    png = np.asarray(Image.open(out / "mask_0.png"))
    np.testing.assert_array_equal(png == 255, masks[0])
    assert summary["masks"][0]["predicted_iou"] == pytest.approx(float(scores[0]))
    over = np.asarray(Image.open(out / "overlay.png"))
    assert over.shape == image.shape and not np.array_equal(over, image)
    assert "mask_0.png: predicted_iou=" in capsys.readouterr().out

    out1 = tmp_path / "single"
    argv1 = ["--checkpoint", setup["ckpt"], "--image", image_path, "--output", str(out1)]
    assert predict.main(argv1 + ["--point", "30,20"]) == 0
    summary = json.loads((out1 / "scores.json").read_text())
    assert summary["multimask_output"] is True and len(summary["masks"]) == 3
    assert summary["best"] == int(np.argmax([m["predicted_iou"] for m in summary["masks"]]))
    assert len(list(out1.glob("mask_*.png"))) == 3


def test_predict_bad_input(setup, tmp_path, capsys):
    base = ["--checkpoint", setup["ckpt"], "--output", str(tmp_path / "p")]
    broken = str(setup["images"] / "broken.jpg")
    assert predict.main(base + ["--image", broken, "--point", "3,4"]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-predict", "could not load", "broken.jpg")
    good = str(setup["images"] / "a.png")
    missing = ["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "p")]
    assert predict.main(missing + ["--image", good, "--point", "3,4"]) == 1
    _one_line_error(capsys.readouterr().err, "sam-jax-predict", "does not exist")
    for bad, fragment in (
        (["--point", "3"], "bad point"),
        (["--point", "3,4,2"], "label must be 0 or 1"),
        (["--box", "5,5,1,1"], "X0 <= X1"),
        (["--point", "a,b"], "bad point"),
        ([], "give at least one --point, a --box or a --text"),
    ):
        assert predict.main(base + ["--image", good] + bad) == 2
        _one_line_error(capsys.readouterr().err, "sam-jax-predict", fragment)
    assert not (tmp_path / "p").exists()


def test_module_entry_points():
    for module in ("sam_jax.amg", "sam_jax.cli.amg", "sam_jax.cli.predict"):
        res = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0 and "--checkpoint" in res.stdout and "exit status" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "sam_jax.amg", "--help"], capture_output=True, text=True, timeout=60
    )
    for flag in ("--convert-to-rle", "--min-mask-region-area", "--crop-n-layers", "--model-type"):
        assert flag in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "sam_jax.cli.predict", "--image", "x", "--output", "y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    _one_line_error(res.stderr, "python -m sam_jax.cli.predict", "--checkpoint")


def test_commands_skip_an_absent_tpu(monkeypatch):
    """libtpu installed (the tpu extra) without TPU chips: the commands run on the CPU instead of
    probing the TPU; JAX_PLATFORMS, a TPU VM's chips or a GPU plugin leave jax's choice alone."""
    calls = []
    monkeypatch.setattr(common.jax.config, "update", lambda *a: calls.append(a))
    monkeypatch.setattr(common.glob, "glob", lambda pattern: [])
    specs = {"libtpu": object()}
    monkeypatch.setattr(common.importlib.util, "find_spec", lambda name: specs.get(name))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not common.skip_absent_tpu() and calls == []  # the user's choice wins
    monkeypatch.delenv("JAX_PLATFORMS")
    assert common.skip_absent_tpu() and calls == [("jax_platforms", "cpu")]
    specs["jax_cuda12_plugin"] = object()
    assert not common.skip_absent_tpu() and len(calls) == 1  # a GPU machine: jax decides
    del specs["jax_cuda12_plugin"]
    monkeypatch.setattr(common.glob, "glob", lambda pattern: ["/dev/accel0"])
    assert not common.skip_absent_tpu() and len(calls) == 1  # a TPU VM
    monkeypatch.setattr(common.glob, "glob", lambda pattern: [])
    del specs["libtpu"]
    assert not common.skip_absent_tpu() and len(calls) == 1  # no libtpu: nothing to skip
