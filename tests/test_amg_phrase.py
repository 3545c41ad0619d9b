"""sam-jax-amg --text: all instances of a phrase from the command line. What it keeps and writes
is what `find_phrase` returns (PNG folders and COCO RLE json, whole files, in order of
similarity); bad input is one line. A random tiny SAM (no text path: any SAM serves) and the
random CLIP of the text tests."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sam_jax import text as text_path
from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.amg.phrase import find_phrase
from sam_jax.checkpoints.converted import save_converted
from sam_jax.cli.amg import main
from sam_jax.config import tiny_config
from sam_jax.data.synthetic import SyntheticConfig, synthetic_example
from sam_jax.modeling import build_sam
from tests.test_eval_text import write_clip

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
# No filters and no NMS: the random tiny SAM gives 48 masks an image to choose from.
AMG_KWARGS = dict(
    points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
)
AMG_FLAGS = [
    "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
    "--box-nms-thresh", "1",
]  # fmt: skip
PHRASE = "red ring"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("amg_phrase")
    clip = write_clip(root / "clip", 0)
    model = build_sam(tiny_config())
    params = jax.device_get(model.init_params(jax.random.key(0)))
    save_converted(root / "ckpt", tiny_config(), params)
    save_converted(root / "named", tiny_config(text_encoder=str(clip)), params)
    images = root / "images"
    images.mkdir()
    config = SyntheticConfig(image_size=64, num_test=2)
    for i in range(2):
        Image.fromarray(synthetic_example(i, "test", config)["image"]).save(images / f"{i}.png")
    generator = SamAutomaticMaskGenerator(model, params, **AMG_KWARGS)
    encoder = text_path.load_text_encoder(clip)

    def expected(name, **kw):
        image = np.asarray(Image.open(images / name).convert("RGB"))
        return find_phrase(generator, encoder, image, PHRASE, **kw)

    return {"root": root, "clip": clip, "images": images, "expected": expected}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_amg_text_writes_what_find_phrase_keeps(setup, tmp_path, capsys):
    out = tmp_path / "png"
    rc, stdout, err = run(
        capsys, "--checkpoint", setup["root"] / "ckpt", "--input", setup["images"], "--output",
        out, "--text", PHRASE, "--clip", setup["clip"], "--margin", "0.02", "--no-progress",
        *AMG_FLAGS,
    )  # fmt: skip
    assert rc == 0, err
    assert "2 of 2 images processed, 0 failed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]  # no temporary left beside them
    for name in ("0.png", "1.png"):
        want = setup["expected"](name, margin=0.02)
        every = setup["expected"](name, min_similarity=-2.0)
        assert 1 <= len(want) < len(every)  # the margin keeps some masks, not all
        folder = out / name[:-4]
        rows = list(csv.reader((folder / "metadata.csv").read_text().splitlines()))
        assert len(rows) == len(want) + 1 and len(list(folder.glob("*.png"))) == len(want)
        for i, r in enumerate(want):  # best first, as find_phrase orders them
            png = np.asarray(Image.open(folder / f"{i}.png")) > 0
            np.testing.assert_array_equal(png, r["segmentation"])
            assert float(rows[i + 1][8]) == pytest.approx(r["predicted_iou"])

    # RLE json, the CLIP the checkpoint names, --min-similarity with --top-k.
    out = tmp_path / "rle"
    rc, _, err = run(
        capsys, "--checkpoint", setup["root"] / "named", "--input", setup["images"] / "1.png",
        "--output", out, "--text", PHRASE, "--min-similarity", "-1", "--top-k", "3",
        "--convert-to-rle", "--no-progress", *AMG_FLAGS,
    )  # fmt: skip
    assert rc == 0, err
    assert [p.name for p in out.iterdir()] == ["1.json"]
    records = json.loads((out / "1.json").read_text())
    want = setup["expected"]("1.png", min_similarity=-1.0)[:3]
    assert len(records) == 3
    for got, r in zip(records, want, strict=True):
        assert got["text_similarity"] == pytest.approx(r["text_similarity"], abs=1e-6)
        rle = {**got["segmentation"], "counts": got["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), r["segmentation"])
        assert got["area"] == r["area"] and got["bbox"] == r["bbox"]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--margin", "0.1"], "--margin is for --text"),
        (["--clip", "x"], "--clip is for --text"),
        (["--text", "  "], "--text must be a non-empty phrase"),
        (["--text", "a", "--margin", "-1"], "--margin must be >= 0"),
        (["--text", "a", "--min-similarity", "2"], "--min-similarity must be in [-1, 1]"),
        (["--text", "a", "--margin", "0.1", "--min-similarity", "0"], "not allowed with"),
        (["--text", "a", "--top-k", "0"], "--top-k"),
        (["--text", "a"], "--text needs a CLIP: give --clip"),  # the checkpoint names none
        (["--text", "a", "--clip", "/nonexistent/clip"], "/nonexistent/clip"),
    ],
)
def test_amg_text_bad_input_is_one_line(setup, tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    rc, _, err = run(
        capsys, "--checkpoint", setup["root"] / "ckpt", "--input", setup["images"], "--output",
        out, "--no-progress", *AMG_FLAGS, *extra,
    )  # fmt: skip
    lines = err.strip().splitlines()
    assert rc in (1, 2) and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert rc == (1 if "nonexistent" in fragment else 2)
    assert not out.exists()
