"""Masks from detector boxes scored as COCO mask AP, with a box-filling fake predictor."""

import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.detections import evaluate_detections, load_coco_gt
from sam_jax.evaluation.metrics import encode_rle


class BoxFiller:
    """Predicts each box filled (inclusive max): known masks for known boxes."""

    def __init__(self):
        self.set_calls = 0

    def set_image(self, image):
        self.shape = image.shape[:2]
        self.set_calls += 1

    def predict_batch(self, boxes=None, multimask_output=True, **kwargs):
        assert not multimask_output and boxes.shape[1] == 4
        masks = np.zeros((len(boxes), 1, *self.shape), bool)
        for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[i, 0, y0 : y1 + 1, x0 : x1 + 1] = True
        return masks, np.ones((len(boxes), 1)), np.zeros((len(boxes), 1, 4, 4))


def _write_dataset(tmp_path, broken_image=False):
    rect = np.zeros((32, 32), bool)
    rect[2:12, 3:11] = True  # box [3, 2, 8, 10] in XYWH
    tri = np.zeros((32, 32), bool)
    tri[15:21, 20:26] = np.tril(np.ones((6, 6), bool))  # 21 of 36 box pixels: IoU 0.583
    other = np.zeros((32, 32), bool)
    other[5:15, 5:15] = True
    anns = []
    for i, (image_id, m) in enumerate([(1, rect), (1, tri), (2, other)]):
        rle = encode_rle(m)
        anns.append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle,
                "iscrowd": 0,
                "area": float(m.sum()),
            }
        )
    images = [
        {"id": 1, "file_name": "a.png", "height": 32, "width": 32},
        {"id": 2, "file_name": "b.png", "height": 32, "width": 32},
    ]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    if broken_image:
        (tmp_path / "img" / "b.png").write_bytes(b"not an image")
    else:
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img" / "b.png")  # grey
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [3, 2, 7, 9], "score": 0.9},  # XYWH, incl. max
        {"image_id": 1, "category_id": 1, "bbox": [20, 15, 5, 5], "score": 0.8},
    ]
    return str(tmp_path / "ann.json"), str(tmp_path / "img"), dets


def test_mask_ap_by_hand(tmp_path):
    ann, img, dets = _write_dataset(tmp_path)
    dets.append({"image_id": 2, "category_id": 1, "bbox": [5, 5, 9, 9], "score": 0.7})
    p = BoxFiller()
    res = evaluate_detections(p, ann, img, dets)
    # IoU thresholds .50 and .55: all 3 found. From .60 on, the triangle (IoU .583, ranked
    # second) is a false positive: recall 2/3, precision 1 up to recall 1/3, then 2/3.
    # 101-point interpolated precision at recall r: 1 for r <= 1/3 (34 points),
    # 2/3 for 1/3 < r <= 2/3 (33 points), 0 above (34 points).
    high = (34 * 1 + 33 * 2 / 3) / 101
    assert res["mask_ap"]["AP"] == pytest.approx((2 * 1 + 8 * high) / 10)
    assert res["mask_ap"]["AP50"] == pytest.approx(1.0)
    assert res["num_images"] == 2 and res["num_detections"] == 3 and p.set_calls == 2


def test_images_without_detections_count_as_misses(tmp_path):
    ann, img, dets = _write_dataset(tmp_path)
    p = BoxFiller()
    res = evaluate_detections(p, ann, img, dets[:1])
    # One of 3 objects found (first-ranked): precision 1 up to recall 1/3 -> 34/101.
    assert res["mask_ap"]["AP"] == pytest.approx(34 / 101)
    assert p.set_calls == 1  # no detections on image 2: no encoder run


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    ann, img, dets = _write_dataset(tmp_path, broken_image=True)
    dets.append({"image_id": 2, "category_id": 1, "bbox": [5, 5, 9, 9], "score": 0.7})
    res = evaluate_detections(BoxFiller(), ann, img, dets, max_images=5)
    assert res["skipped_images"] == 1 and res["num_images"] == 1
    assert res["mask_ap"]["AP50"] == pytest.approx(1.0)  # image 2's object is not counted


def test_bad_annotation_files(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO annotation file"):
        load_coco_gt(str(tmp_path / "list.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_coco_gt(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="does not exist"):
        load_coco_gt(str(tmp_path / "missing.json"))
    bad = {"images": [{"id": 1}], "annotations": [], "categories": []}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not a COCO instance file"):
        load_coco_gt(str(tmp_path / "bad.json"))


def test_bad_detections(tmp_path):
    ann, img, dets = _write_dataset(tmp_path)
    with pytest.raises(ValueError, match="not in the annotation file"):
        evaluate_detections(BoxFiller(), ann, img, [{**dets[0], "image_id": 99}])
    with pytest.raises(ValueError, match="COCO results"):
        evaluate_detections(BoxFiller(), ann, img, [{"image_id": 1, "bbox": [1, 2, 3]}])
    with pytest.raises(ValueError, match="non-empty"):
        evaluate_detections(BoxFiller(), ann, img, [])
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    res = evaluate_detections(BoxFiller(), ann, img, str(tmp_path / "dets.json"))
    assert res["num_detections"] == 2
