"""sam-jax-eval --task text beyond the synthetic shapes: `--clip` replaces the checkpoint's CLIP
(a width that does not fit, or --clip without --task text, is one line), and COCO / LVIS masks
named by their category through the template, checked against predict(text=) mask by mask.
The small random text SAM and CLIPs of tests/test_text_prompts.py."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from sam_jax import text as text_path
from sam_jax.checkpoints import clip as clip_ckpt
from sam_jax.checkpoints import load
from sam_jax.checkpoints.converted import save_converted
from sam_jax.cli.eval import main
from sam_jax.evaluation.checkpoint import EvalSettings, evaluate_checkpoint
from sam_jax.evaluation.metrics import encode_rle, mask_iou
from sam_jax.modeling import build_sam
from sam_jax.modeling.clip import Clip, ClipConfig
from sam_jax.predictor import SamPredictor
from sam_jax.training import clip_train
from tests.test_text_prompts import CLIP_CONFIG, SAM_CONFIG

SYNTHETIC = "synthetic:test?num_images=2&image_size=64"


def write_clip(folder, seed: int, embed_dim: int = CLIP_CONFIG["embed_dim"]):
    """A random CLIP (transformers layout) with the synthetic words' tokenizer."""
    words = sorted({w for n in clip_train.synthetic_names() for w in n.split()})
    vocab = clip_train.write_bpe_vocab(str(folder), words, CLIP_CONFIG["context_length"])
    config = ClipConfig(vocab_size=vocab, **{**CLIP_CONFIG, "embed_dim": embed_dim})
    clip_ckpt.save_hf_clip(folder, config, jax.device_get(Clip(config).init_params(
        jax.random.key(seed))))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two CLIPs of the model's width (a: the one the checkpoint names, b), one too narrow, and
    the text SAM as a converted checkpoint."""
    root = tmp_path_factory.mktemp("eval_text")
    a, b = write_clip(root / "clip_a", 0), write_clip(root / "clip_b", 5)
    narrow = write_clip(root / "clip_8", 0, embed_dim=8)
    model = build_sam(SAM_CONFIG)
    ckpt = root / "ckpt"
    config = SAM_CONFIG.replace(text_encoder=str(a))
    save_converted(ckpt, config, jax.device_get(model.init_params(jax.random.key(1))))
    return {"a": a, "b": b, "narrow": narrow, "ckpt": ckpt}


def run(capsys, *argv):
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, code, *fragments):
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for f in fragments:
        assert f in lines[0], lines[0]


def test_clip_flag_replaces_the_checkpoints_clip(files, tmp_path, capsys):
    base = ["--checkpoint", files["ckpt"], "--task", "text", "--dataset", SYNTHETIC,
            "--no-progress"]  # fmt: skip
    rc, _, err = run(capsys, *base, "--output", tmp_path / "b", "--clip", files["b"])
    assert rc == 0, err
    got = json.loads((tmp_path / "b" / "results.json").read_text())
    assert got["protocol"]["clip"] == str(files["b"])
    entry = got["datasets"][SYNTHETIC]
    assert entry["protocol"]["clip"] == str(files["b"])
    model, params = load(str(files["ckpt"]))
    for clip, want_equal in ((files["b"], True), (files["a"], False)):
        predictor = SamPredictor(model, params, text_encoder=text_path.load_text_encoder(clip))
        want = evaluate_checkpoint(predictor, [SYNTHETIC], EvalSettings(task="text"))
        same = want["datasets"][SYNTHETIC]["text_miou"] == entry["text_miou"]
        assert same == want_equal, (clip, want["datasets"][SYNTHETIC]["text_miou"])

    # A CLIP of another width: one line before any work, no output.
    rc, _, err = run(capsys, *base, "--output", tmp_path / "n", "--clip", files["narrow"])
    one_line(rc, err, 2, "8-wide", "takes 16")
    assert not (tmp_path / "n").exists()
    # A CLIP that is not there: one line, exit 1.
    rc, _, err = run(capsys, *base, "--output", tmp_path / "n", "--clip", tmp_path / "no_clip")
    one_line(rc, err, 1, "no_clip")
    assert not (tmp_path / "n").exists()
    # --clip or --text-template without --task text; a template without its {}.
    for extra, fragment in (
        (["--clip", files["b"]], "--clip is for --task text"),
        (["--text-template", "a {}"], "--text-template is for --task text"),
    ):
        rc, _, err = run(capsys, "--checkpoint", files["ckpt"], "--dataset", SYNTHETIC,
                         "--output", tmp_path / "p", *extra)  # fmt: skip
        one_line(rc, err, 2, fragment)
    rc, _, err = run(capsys, *base, "--output", tmp_path / "p", "--text-template", "a photo")
    one_line(rc, err, 2, "text_template must hold one {}")
    assert not (tmp_path / "p").exists()


def rect(y0, y1, x0, x1, hw=(64, 64)):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def write_named_coco(root):
    """Two images; categories with an LVIS-style underscore; image 1 holds two "cat"s (one name
    twice: skipped), a crowd and a zero-area annotation between the kept ones."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = [  # (image, mask, category, iscrowd)
        (1, rect(2, 20, 2, 20), 1, 0),
        (1, rect(0, 0, 0, 0), 2, 0),  # zero area: dropped by the reader
        (1, rect(30, 60, 30, 60), 2, 1),  # crowd: skipped
        (1, rect(25, 50, 5, 30), 2, 0),
        (1, rect(40, 60, 40, 62), 2, 0),  # a second "cat" in image 1: both skipped
        (1, rect(5, 15, 40, 60), 3, 0),
        (2, rect(10, 40, 10, 50), 2, 0),
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "segmentation": encode_rle(m),
         "iscrowd": crowd, "area": int(m.sum())}
        for k, (i, m, c, crowd) in enumerate(specs)
    ]  # fmt: skip
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    for i in (1, 2):
        image = rng.integers(0, 256, (64, 64, 3), np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
    cats = [{"id": 1, "name": "traffic_light"}, {"id": 2, "name": "cat"},
            {"id": 3, "name": "red ring"}]  # fmt: skip
    (root / "ann.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    kept = {  # image -> (phrase, mask) of each uniquely named mask
        "1": [
            ("a photo of a traffic light.", specs[0][1]),
            ("a photo of a red ring.", specs[5][1]),
        ],
        "2": [("a photo of a cat.", specs[6][1])],
    }
    return f"coco:{root / 'ann.json'}:{root / 'images'}", kept


def test_text_task_on_a_coco_layout(files, tmp_path, capsys):
    """Each mask named by its category in CLIP's template; names shared in an image skipped;
    the text mIoU equal to predict(text=phrase) mask by mask; the same report as synthetic's."""
    spec, kept = write_named_coco(tmp_path / "coco")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "--checkpoint", files["ckpt"], "--task", "text", "--dataset",
                          spec, "--output", out, "--no-progress")  # fmt: skip
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    entry = results["datasets"][spec]
    assert entry["num_images"] == 2 and entry["num_masks"] == 3 and entry["skipped_masks"] == 2
    assert entry["protocol"]["template"] == "a photo of a {}."
    assert entry["data_stats"]["crowd_masks"] == 1 and entry["data_stats"]["empty_masks"] == 1
    model, params = load(str(files["ckpt"]))
    predictor = SamPredictor(model, params, text_encoder=text_path.load_text_encoder(files["a"]))
    ious, per_name = [], {}
    for image_id, masks in kept.items():
        predictor.set_image(
            np.asarray(Image.open(tmp_path / "coco" / "images" / f"{image_id}.png"))
        )
        for name, gt in masks:
            m, iou, _ = predictor.predict(text=name)
            ious.append(float(mask_iou(m[np.argmax(iou)], gt)))
            per_name[name] = ious[-1]
    assert entry["text_miou"]["text"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert entry["per_name"] == pytest.approx(per_name, abs=1e-6)
    md = (out / "results.md").read_text()
    assert md in stdout and (out / "results.csv").exists()

    # Another template, through the library; a synthetic dataset keeps its bare names.
    custom = evaluate_checkpoint(
        predictor, [spec], EvalSettings(task="text", text_template="{}, seen from above")
    )["datasets"][spec]
    assert set(custom["per_name"]) == {"traffic light, seen from above", "cat, seen from above",
                                       "red ring, seen from above"}  # fmt: skip
    syn = evaluate_checkpoint(predictor, [SYNTHETIC], EvalSettings(task="text", max_images=1))
    assert all(len(n.split()) == 2 for n in syn["datasets"][SYNTHETIC]["per_name"])
