"""Masks from detector boxes (paper 7.4, D.4) scored as COCO mask AP or LVIS's federated AP, with
fake predictors: one fills each box, one checks D.4's refinement pass."""

import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.detections import box_masks, evaluate_detections, load_coco_gt
from sam_jax.evaluation.lvis_metrics import lvis_mask_ap
from sam_jax.evaluation.metrics import encode_rle


class BoxFiller:
    """Predicts each box filled (inclusive max) in every output: known masks for known boxes."""

    def __init__(self):
        self.set_calls = 0

    def set_image(self, image):
        self.shape = image.shape[:2]
        self.set_calls += 1

    def predict_batch(self, boxes=None, multimask_output=True, mask_input=None, **kwargs):
        assert boxes.shape[1] == 4
        c = 3 if multimask_output else 1
        masks = np.zeros((len(boxes), c, *self.shape), bool)
        for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[i, :, y0 : y1 + 1, x0 : x1 + 1] = True
        return masks, np.ones((len(boxes), c)), np.zeros((len(boxes), c, 4, 4))


class RefineChecker:
    """Pass 1 (3 outputs, no mask prompt): masks 0, 1, 2 with predicted IoU .2, .9, .5 and low-res
    logits filled with 10, 20, 30. Pass 2 must get the box and the most confident (20) logits and
    a single output; its mask is the box's left half, so the final mask tells the passes apart."""

    def __init__(self):
        self.calls = []

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_batch(self, boxes=None, multimask_output=True, mask_input=None, **kwargs):
        b = len(boxes)
        self.calls.append((multimask_output, None if mask_input is None else mask_input.copy()))
        if mask_input is None:
            assert multimask_output
            masks = np.zeros((b, 3, *self.shape), bool)
            masks[:, 1] = True
            low = np.stack([np.full((b, 4, 4), v, np.float32) for v in (10, 20, 30)], axis=1)
            return masks, np.tile([0.2, 0.9, 0.5], (b, 1)), low
        assert not multimask_output and mask_input.shape == (b, 1, 4, 4)
        masks = np.zeros((b, 1, *self.shape), bool)
        for i, (x0, y0, x1, y1) in enumerate(np.round(boxes).astype(int)):
            masks[i, 0, y0 : y1 + 1, x0 : (x0 + x1) // 2] = True
        return masks, np.ones((b, 1)), np.zeros((b, 1, 4, 4))


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


def test_refinement_pass_feeds_the_most_confident_mask_back_with_the_box():
    p = RefineChecker()
    p.set_image(np.zeros((32, 32, 3), np.uint8))
    boxes = np.array([[2, 2, 21, 9], [4, 4, 11, 11]], np.float32)
    masks = box_masks(p, boxes, refine=True)
    assert [c[0] for c in p.calls] == [True, False]
    assert np.all(p.calls[1][1] == 20)  # the logits of the most confident pass-1 mask
    assert masks.shape == (2, 32, 32) and masks[0, 2:10, 2:11].all() and not masks[0, :, 11:].any()
    filler = BoxFiller()
    filler.set_image(np.zeros((32, 32, 3), np.uint8))
    assert box_masks(filler, boxes, refine=False)[1].sum() == 64  # one single-output pass


def _lvis_gt(tmp_path, images, anns, cats):
    data = {"images": images, "annotations": anns, "categories": cats}
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    return load_coco_gt(str(tmp_path / "lvis.json"))


def _box(y0, y1, x0, x1):
    m = np.zeros((32, 32), bool)
    m[y0:y1, x0:x1] = True
    return m


def _ann(i, image_id, cat, m):
    seg, area = encode_rle(m), float(m.sum())
    return {"id": i, "image_id": image_id, "category_id": cat, "segmentation": seg, "area": area}


def _det(image_id, cat, m, score):
    return {"image_id": image_id, "category_id": cat, "segmentation": encode_rle(m), "score": score}


def _image(i, neg=(), not_exhaustive=()):
    return {
        "id": i,
        "file_name": f"{i}.png",
        "height": 32,
        "width": 32,
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(not_exhaustive),
    }


def test_lvis_federated_rules(tmp_path):
    a, b, c = _box(2, 12, 2, 12), _box(15, 25, 15, 25), _box(20, 30, 0, 10)
    cats = [{"id": 1, "name": "f1", "frequency": "f"}, {"id": 4, "name": "r4", "frequency": "r"}]
    anns = [_ann(1, 1, 1, a), _ann(2, 2, 4, b)]
    tp = [_det(1, 1, a, 0.5), _det(2, 4, b, 0.5)]

    def ap(images, extra, **kw):
        gt = _lvis_gt(tmp_path, images, anns, cats)
        return lvis_mask_ap(gt, tp + extra, [1, 2], **kw)

    plain = [_image(1), _image(2)]
    assert ap(plain, [])["AP"] == pytest.approx(1.0)
    # A better-scored false positive of a category with ground truth in the image: precision
    # 1/2 at recall 1 for category 1 (AP 1/2), category 4 untouched: AP = (0.5 + 1) / 2.
    fp1 = [_det(1, 1, c, 0.9)]
    r = ap(plain, fp1)
    assert r["AP"] == pytest.approx(0.75) and r["APf"] == pytest.approx(0.5)
    assert r["APr"] == pytest.approx(1.0) and r["APc"] is None
    # Rule 3: category 1 not exhaustively annotated in image 1: the unmatched one is ignored.
    assert ap([_image(1, not_exhaustive=[1]), _image(2)], fp1)["AP"] == pytest.approx(1.0)
    # Rule 2: a category-4 detection in image 1, where 4 is neither present nor verified absent,
    # is dropped; verified absent (neg_category_ids), it is a false positive.
    fp4 = [_det(1, 4, c, 0.9)]
    assert ap(plain, fp4)["AP"] == pytest.approx(1.0)
    assert ap([_image(1, neg=[4]), _image(2)], fp4)["APr"] == pytest.approx(0.5)
    # Rule 1: at most max_dets per image by score: the true positive falls out.
    assert ap(plain, fp1, max_dets=1)["APf"] == pytest.approx(0.0)


def test_lvis_instances_end_to_end(tmp_path):
    """An LVIS file (images under coco_url, no file_name) through evaluate_detections."""
    a = _box(2, 12, 3, 11)
    img = _image(1)
    del img["file_name"]
    img["coco_url"] = "http://images.cocodataset.org/val2017/000000000001.jpg"
    cats = [{"id": 1, "name": "f1", "frequency": "f"}]
    _lvis_gt(tmp_path, [img], [_ann(1, 1, 1, a)], cats)
    (tmp_path / "val2017").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "val2017" / "000000000001.jpg")
    dets = [{"image_id": 1, "category_id": 1, "bbox": [3, 2, 7, 9], "score": 0.9}]
    res = evaluate_detections(
        BoxFiller(), str(tmp_path / "lvis.json"), str(tmp_path), dets, lvis=True
    )
    assert res["mask_ap"]["AP"] == pytest.approx(1.0) and res["mask_ap"]["APf"] == pytest.approx(
        1.0
    )
    with pytest.raises(ValueError, match="not an LVIS file"):
        (tmp_path / "c").mkdir()
        ann, img_dir, _ = _write_dataset(tmp_path / "c")
        evaluate_detections(BoxFiller(), ann, img_dir, dets, lvis=True)
