"""The point/box protocol metrics on a tiny dataset against an independent computation with the
official PyTorch predictor (mask by mask, its own `predict`, RITM's clicker with cv2) on the same
random weights, converted to our params."""

import cv2
import numpy as np
import pytest

from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.config import tiny_config
from sam_jax.evaluation import evaluate_points
from sam_jax.evaluation.official import OfficialPredictor
from tests.torch_reference import build_official, state_dict_numpy

NUM_POINTS = (1, 2, 3)


def _dataset():
    rng = np.random.default_rng(0)
    examples = []
    for i, (h, w) in enumerate([(48, 64), (56, 40)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:h, :w]
        masks = []
        for _ in range(3):
            cx, cy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
            a, b = rng.uniform(4, 14, size=2)
            masks.append(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1)
        masks.append(np.zeros((h, w), bool))  # zero area: skipped and counted
        examples.append({"image": image, "masks": np.stack(masks), "image_id": f"im{i}"})
    return examples


def _dt(region):
    return cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 0)[1:-1, 1:-1]


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _independent(sam, examples, feed_mask):
    """Per-mask loop with the official SamPredictor.predict and RITM's clicker (cv2)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    ious, oracle, boxes = [], [], []
    for ex in examples:
        predictor.set_image(ex["image"])
        for gt in ex["masks"]:
            if not gt.any():
                continue
            dt = _dt(gt)
            ys, xs = np.where(dt == dt.max())
            clicks, labels = [[xs[0], ys[0]]], [1]
            row, low = [], None
            for t in range(max(NUM_POINTS)):
                masks, scores, lows = predictor.predict(
                    point_coords=np.array(clicks, float),
                    point_labels=np.array(labels),
                    mask_input=low if feed_mask and t else None,
                    multimask_output=t == 0,
                )
                best = int(np.argmax(scores))
                row.append(_iou(masks[best], gt))
                if t == 0:
                    oracle.append(max(_iou(m, gt) for m in masks))
                low = lows[best][None]
                not_clicked = np.ones(gt.shape, np.float32)
                for x, y in clicks:
                    not_clicked[y, x] = 0
                fn_dt = _dt(gt & ~masks[best]) * not_clicked
                fp_dt = _dt(~gt & masks[best]) * not_clicked
                assert max(fn_dt.max(), fp_dt.max()) > 0  # no perfect prediction in this data
                positive = fn_dt.max() > fp_dt.max()
                dt = fn_dt if positive else fp_dt
                ys, xs = np.where(dt == dt.max())
                clicks.append([xs[0], ys[0]])
                labels.append(int(positive))
            ious.append(row)
            y, x = np.nonzero(gt)
            box = np.array([x.min(), y.min(), x.max(), y.max()], float)
            boxes.append(_iou(predictor.predict(box=box, multimask_output=False)[0][0], gt))
    ious = np.array(ious)
    return {str(n): ious[:, n - 1].mean() for n in NUM_POINTS}, np.mean(oracle), np.mean(boxes)


@pytest.fixture(scope="module")
def official():
    return build_official(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def reference(official):
    return {feed: _independent(official, _dataset(), feed) for feed in (False, True)}


def _check(result, reference, tol):
    miou, oracle, box = reference
    assert result["num_masks"] == 6 and result["num_images"] == 2
    assert result["skipped_empty_masks"] == 2
    assert result["miou"] == pytest.approx(miou, abs=tol)
    assert result["oracle_miou_1"] == pytest.approx(oracle, abs=tol)
    assert result["box_miou"] == pytest.approx(box, abs=tol)


@pytest.mark.parametrize("feed_mask", [False, True])
def test_protocol_on_official_predictor_matches_independent_loop(official, reference, feed_mask):
    result = evaluate_points(
        OfficialPredictor(official),
        _dataset(),
        num_points=NUM_POINTS,
        feed_mask=feed_mask,
        gt_boxes=True,
        batch_size=2,
    )
    _check(result, reference[feed_mask], 1e-9)
    assert result["protocol"]["feed_mask"] is feed_mask


@pytest.mark.slow
def test_protocol_on_our_predictor_matches_official(official, reference):
    from sam_jax.modeling import build_sam
    from sam_jax.predictor import SamPredictor

    config = tiny_config()
    params = state_dict_to_params(state_dict_numpy(official), config)
    predictor = SamPredictor(build_sam(config), params)
    for feed_mask in (False, True):
        result = evaluate_points(
            predictor,
            _dataset(),
            num_points=NUM_POINTS,
            feed_mask=feed_mask,
            gt_boxes=True,
            batch_size=4,
        )
        # Same clicks and masks: logits agree to ~1e-6 and no pixel lies that close to 0 here.
        _check(result, reference[feed_mask], 1e-9)
