"""Mask IoU and COCO mask AP against pycocotools and hand-computed answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam_jax.evaluation.metrics import (
    coco_mask_ap,
    dataset_average,
    encode_rle,
    mask_iou,
    mean_iou,
)


def test_mask_iou_by_hand():
    a = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b = np.zeros((4, 4), bool)
    b[1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    with pytest.raises(ValueError, match="sizes differ"):
        mask_iou(a, b[:3])


def test_mask_iou_on_jax_arrays_under_jit():
    """The training loss's IoU (binarised logits, inside jit): same function, float32 result."""
    gt = np.zeros((4, 4), np.float32)
    gt[:2, :2] = 1  # 4 cells
    logits = -np.ones((4, 4), np.float32)
    logits[:2, :3] = 1  # 6 cells, 4 shared
    iou = jax.jit(lambda lg, t: mask_iou(lg > 0, t > 0))(jnp.asarray(logits), jnp.asarray(gt))
    assert isinstance(iou, jax.Array) and iou.dtype == jnp.float32
    assert float(iou) == pytest.approx(4 / 6)
    assert float(mask_iou(-jnp.ones((4, 4)) > 0, jnp.zeros((4, 4)) > 0)) == 1.0


def test_mask_iou_matches_pycocotools_batched():
    rng = np.random.default_rng(0)
    pred = rng.random((5, 3, 17, 23)) < 0.4
    gt = rng.random((5, 17, 23)) < 0.5
    ours = mask_iou(pred, gt[:, None])
    assert ours.shape == (5, 3)
    for i in range(5):
        dt = [encode_rle(p) for p in pred[i]]
        ref = mask_utils.iou(dt, [encode_rle(gt[i])], [0])
        np.testing.assert_allclose(ours[i], ref[:, 0], rtol=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside pycocotools' decode
def test_encode_rle_roundtrip_and_json_safe():
    m = np.zeros((6, 7), bool)
    m[1:4, 2:6] = True
    rle = encode_rle(m)
    assert isinstance(rle["counts"], str) and rle["size"] == [6, 7]
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), m)


def test_mean_and_dataset_average():
    assert mean_iou([0.5, 1.0]) == 0.75
    assert mean_iou([]) is None
    assert dataset_average([0.2, None, 0.6]) == pytest.approx(0.4)
    assert dataset_average([None, None]) is None


def _coco_gt():
    from pycocotools.coco import COCO

    gt = np.zeros((20, 20), bool)
    gt[2:12, 3:13] = True  # 100 pixels: a "small" object
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "height": 20, "width": 20, "file_name": "a.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "segmentation": encode_rle(gt),
                "area": 100.0,
                "bbox": [3, 2, 10, 10],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }
    coco.createIndex()
    return coco, gt


def _result(mask, score):
    return {"image_id": 7, "category_id": 3, "segmentation": encode_rle(mask), "score": score}


def test_coco_mask_ap_perfect_and_partial():
    coco, gt = _coco_gt()
    ap = coco_mask_ap(coco, [_result(gt, 0.9)])
    assert ap["AP"] == pytest.approx(1.0) and ap["AP50"] == pytest.approx(1.0)
    assert ap["APs"] == pytest.approx(1.0) and ap["APm"] is None and ap["APl"] is None

    # 62 of the 100 ground-truth pixels: IoU 0.62, a match at thresholds .50, .55, .60 only.
    partial = np.zeros_like(gt)
    partial[2:8, 3:13] = True
    partial[8, 3:5] = True
    assert mask_iou(partial, gt) == pytest.approx(0.62)
    ap = coco_mask_ap(coco, [_result(partial, 0.9)])
    assert ap["AP"] == pytest.approx(0.3)
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP75"] == pytest.approx(0.0)


def test_coco_mask_ap_false_positive_ranked_first():
    coco, gt = _coco_gt()
    wrong = np.zeros_like(gt)
    wrong[15:19, 15:19] = True
    # Precision 1/2 at recall 1 for every recall level: AP 0.5.
    ap = coco_mask_ap(coco, [_result(gt, 0.5), _result(wrong, 0.9)])
    assert ap["AP"] == pytest.approx(0.5)
    # Ranked below the true positive, the false positive costs nothing.
    ap = coco_mask_ap(coco, [_result(gt, 0.9), _result(wrong, 0.5)])
    assert ap["AP"] == pytest.approx(1.0)


def test_coco_mask_ap_rejects_empty_results():
    coco, _ = _coco_gt()
    with pytest.raises(ValueError, match="no mask results"):
        coco_mask_ap(coco, [])
