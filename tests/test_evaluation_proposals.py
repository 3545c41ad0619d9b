"""Object proposals (paper 7.3, D.3): mask AR@N against an independent recall computation, the
ranking and truncation of the generator's masks, the LVIS layout and frequency groups."""

import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.data.sources import iterate_examples
from sam_jax.data.spec import parse_dataset_spec
from sam_jax.evaluation.detections import load_coco_gt
from sam_jax.evaluation.metrics import encode_rle, mask_iou
from sam_jax.evaluation.proposals import evaluate_proposals, mask_average_recall, rank_proposals

S = 200


def rect(y0, y1, x0, x1, h=S, w=S):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# Ground truth of image 1: a large, a medium and a small object, of a frequent, a common and a
# rare category; each has one proposal of a designed overlap.
GT = {1: rect(0, 120, 0, 120), 2: rect(130, 180, 130, 180), 3: rect(150, 170, 20, 40)}
PROPOSALS = {1: rect(0, 120, 12, 132), 2: rect(130, 180, 130, 180), 3: rect(154, 170, 20, 40)}
FREQ = {1: "f", 2: "c", 3: "r"}


def write_lvis(tmp_path, masks_by_image, polygons=False, folder="val2017"):
    """An LVIS v1 layout: images only under coco_url (IMAGES/val2017/<name>), categories with
    frequencies, federated image labels; annotations as RLE (or rectangles as polygons)."""
    (tmp_path / "coco" / folder).mkdir(parents=True)
    images, anns = [], []
    for image_id, masks in masks_by_image.items():
        name = f"{image_id:012d}.jpg"
        url = f"http://images.cocodataset.org/{folder}/{name}"
        images.append(
            {
                "id": image_id,
                "coco_url": url,
                "height": S,
                "width": S,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            }
        )
        Image.fromarray(np.full((S, S, 3), 40 * image_id, np.uint8)).save(
            tmp_path / "coco" / folder / name
        )
        for cat, m in masks.items():
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            seg = [[x0, y0, x1, y0, x1, y1, x0, y1]] if polygons else encode_rle(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": [[float(v) for v in seg[0]]] if polygons else seg,
                    "area": float(m.sum()),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                }
            )
    cats = [{"id": c, "name": f"cat{c}", "frequency": FREQ[c]} for c in FREQ]
    data = {"images": images, "annotations": anns, "categories": cats}
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    return str(tmp_path / "lvis.json"), str(tmp_path / "coco")


def independent_ar(gt_masks, proposals):
    """Recall averaged over IoU 0.5:0.05:0.95 with each object's best proposal (the objects are
    far apart, so any one-to-one matching pairs each with its own)."""
    best = [max(float(mask_iou(p, g)) for p in proposals) for g in gt_masks]
    thresholds = np.linspace(0.5, 0.95, 10)
    return float(np.mean([[b >= t - 1e-12 for t in thresholds] for b in best]))


def _results(image_id, masks, scores):
    return [
        {"image_id": image_id, "segmentation": encode_rle(m), "score": s}
        for m, s in zip(masks, scores, strict=True)
    ]


def test_average_recall_matches_an_independent_computation(tmp_path):
    ann, _ = write_lvis(tmp_path, {1: GT})
    coco = load_coco_gt(ann)
    props = list(PROPOSALS.values())
    ar = mask_average_recall(coco, _results(1, props, [0.9, 0.8, 0.7]), [1], lvis=True)
    gts = list(GT.values())
    assert ar["AR"] == pytest.approx(independent_ar(gts, props))
    # by area (large 14400 px, medium 2500, small 400) and by LVIS frequency: one object each
    for key, c in (("ARl", 1), ("ARm", 2), ("ARs", 3), ("ARf", 1), ("ARc", 2), ("ARr", 3)):
        assert ar[key] == pytest.approx(independent_ar([GT[c]], [PROPOSALS[c]])), key
    # IoUs 0.82, 1.0, 0.8: recall 7/10, 10/10 and 7/10 of the thresholds
    assert ar["AR"] == pytest.approx((0.7 + 1.0 + 0.7) / 3)


def test_only_the_best_proposals_count(tmp_path):
    ann, _ = write_lvis(tmp_path, {1: GT})
    coco = load_coco_gt(ann)
    props = list(PROPOSALS.values())
    ar = mask_average_recall(coco, _results(1, props, [0.1, 0.9, 0.2]), [1], max_proposals=1)
    assert ar["AR"] == pytest.approx(1 / 3)  # only the medium object's (exact) proposal counts
    none = mask_average_recall(coco, [], [1])
    assert none["AR"] == 0.0


def test_rank_proposals():
    recs = [
        {"predicted_iou": 0.9, "stability_score": 0.5, "id": "a"},  # 0.70
        {"predicted_iou": 0.6, "stability_score": 1.0, "id": "b"},  # 0.80
        {"predicted_iou": 0.2, "stability_score": 0.2, "id": "c"},  # 0.20
    ]
    ranked = rank_proposals(recs, max_proposals=2)
    assert [r["id"] for r in ranked] == ["b", "a"]
    assert [r["score"] for r in ranked] == pytest.approx([0.8, 0.7])


def test_lvis_layout_is_read_with_its_coco_url_folders(tmp_path):
    ann, images = write_lvis(tmp_path, {1: GT, 2: {1: rect(10, 60, 10, 60)}}, polygons=True)
    spec = parse_dataset_spec(f"lvis:{ann}:{images}")
    examples = list(iterate_examples(spec))
    assert [e["image_id"] for e in examples] == ["1", "2"]
    assert examples[0]["masks"].shape == (3, S, S) and examples[0]["image"][0, 0, 0] == 40
    # polygons rasterised as pycocotools does: the rectangle's pixels, within a pixel row/col
    assert abs(int(examples[1]["masks"][0].sum()) - 2500) <= 101


def test_lvis_images_folder_without_split_folders(tmp_path):
    ann, images = write_lvis(tmp_path, {1: GT}, folder="val2017")
    flat = tmp_path / "flat"
    (tmp_path / "coco" / "val2017").rename(flat)
    assert [e["image_id"] for e in iterate_examples(parse_dataset_spec(f"lvis:{ann}:{flat}"))] == [
        "1"
    ]


def test_evaluate_proposals_end_to_end(tmp_path):
    """A generator that proposes the designed masks (and junk) on image 1, nothing readable for
    image 2 (its file is broken): AR over image 1, image 2 skipped and counted."""
    ann, images = write_lvis(tmp_path, {1: GT, 2: {1: rect(10, 60, 10, 60)}})
    (tmp_path / "coco" / "val2017" / f"{2:012d}.jpg").write_bytes(b"broken")
    calls = []

    def generate(image):
        calls.append(image.shape)
        recs = [
            {"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.9}
            for m in PROPOSALS.values()
        ]
        junk = {"segmentation": rect(0, 5, 190, 200), "predicted_iou": 0.1, "stability_score": 0}
        return recs + [junk]

    out = evaluate_proposals(generate, ann, images, lvis=True, max_proposals=3)
    assert calls == [(S, S, 3)] and out["skipped_images"] == 1 and out["num_images"] == 1
    assert out["num_proposals"] == 3  # the junk mask is ranked last and cut
    assert out["proposals"]["AR"] == pytest.approx((0.7 + 1.0 + 0.7) / 3)
    with pytest.raises(ValueError, match="not an LVIS file"):
        data = json.loads((tmp_path / "lvis.json").read_text())
        del data["categories"][0]["frequency"]
        (tmp_path / "bad.json").write_text(json.dumps(data))
        evaluate_proposals(generate, str(tmp_path / "bad.json"), images, lvis=True)
