"""Per-group mIoU with bootstrap confidence intervals (paper Table 2): field values lined up with
the masks the COCO reader yields, group means by hand, the interval against the normal
approximation, and seeding."""

import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.data.sources import iterate_examples
from sam_jax.data.spec import parse_dataset_spec
from sam_jax.evaluation.groups import bootstrap_ci, group_labels, group_miou
from sam_jax.evaluation.metrics import encode_rle


def rect(y0, y1, x0, x1, hw=(40, 48)):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def write_grouped_coco(tmp_path):
    """Two images; annotations carry a "gender" attribute; one crowd and one zero-area
    annotation, which the reader drops, sit between the kept ones."""
    (tmp_path / "images").mkdir()
    specs = [  # (image, mask, category, gender, iscrowd)
        (1, rect(2, 12, 2, 12), 1, "feminine", 0),
        (1, rect(0, 0, 0, 0), 1, "masculine", 0),  # zero area: dropped
        (1, rect(20, 30, 5, 20), 2, "masculine", 1),  # crowd: skipped
        (1, rect(20, 35, 25, 45), 2, "masculine", 0),
        (2, rect(5, 25, 5, 25), 1, "masculine", 0),
    ]
    anns = [
        {
            "id": k + 1,
            "image_id": i,
            "category_id": c,
            "segmentation": encode_rle(m),
            "iscrowd": crowd,
            "gender": g,
        }
        for k, (i, m, c, g, crowd) in enumerate(specs)
    ]
    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 48} for i in (1, 2)]
    for i in (1, 2):
        Image.fromarray(np.full((40, 48, 3), 50 * i, np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "rider"}]
    data = {"images": images, "annotations": anns, "categories": cats}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}"


def test_group_labels_line_up_with_the_readers_masks(tmp_path):
    spec = parse_dataset_spec(write_grouped_coco(tmp_path))
    labels = group_labels(spec, "gender")
    assert labels == {"1": ["feminine", "masculine"], "2": ["masculine"]}
    examples = {e["image_id"]: e["masks"] for e in iterate_examples(spec)}
    assert {k: len(v) for k, v in examples.items()} == {k: len(v) for k, v in labels.items()}
    # a category field when the annotation lacks it; the crowd one is read with include_crowd
    assert group_labels(spec, "name") == {"1": ["person", "rider"], "2": ["person"]}
    (tmp_path / "c").mkdir()
    crowd = parse_dataset_spec(write_grouped_coco(tmp_path / "c") + "?include_crowd=1")
    assert group_labels(crowd, "gender")["1"] == ["feminine", "masculine", "masculine"]
    assert group_labels(spec, "category_id")["1"] == ["1", "2"]
    with pytest.raises(ValueError, match="no field 'age'"):
        group_labels(spec, "age")
    with pytest.raises(ValueError, match="coco, lvis, sa1b"):
        group_labels(parse_dataset_spec("synthetic"), "gender")


def test_group_means_and_intervals():
    rng = np.random.default_rng(0)
    n = 400
    ious = np.stack([rng.uniform(0.2, 0.8, n), rng.uniform(0.6, 1.0, n), rng.uniform(0, 1, n)], 1)
    groups = np.where(np.arange(n) % 4 == 0, "a", "b")
    per_mask = {
        "image_id": [str(i // 2) for i in range(n)],
        "mask_index": np.arange(n) % 2,
        "ious": ious,
    }
    labels = {str(i): [groups[2 * i], groups[2 * i + 1]] for i in range(n // 2)}
    out = group_miou(per_mask, labels, (1, 2), "g", seed=3)
    assert out["field"] == "g" and "bootstrap" in out["interval"] and "95%" in out["interval"]
    for g in ("a", "b"):
        rows = groups == g
        e = out["groups"][g]
        assert e["num_masks"] == rows.sum()
        for n_pts in (1, 2):
            x = ious[rows, n_pts - 1]
            assert e["miou"][str(n_pts)] == pytest.approx(x.mean())
            lo, hi = e["ci"][str(n_pts)]
            half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))  # the normal approximation
            assert lo < x.mean() < hi
            assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert group_miou(per_mask, labels, (1, 2), "g", seed=3) == out  # seeded
    assert (
        group_miou(per_mask, labels, (1,), "g", seed=4)["groups"]["a"]["ci"]
        != out["groups"]["a"]["ci"]
    )


def test_bootstrap_of_a_constant_is_the_constant():
    assert bootstrap_ci(np.full(20, 0.7), seed=0) == pytest.approx((0.7, 0.7))


def test_misaligned_labels_are_refused():
    per_mask = {"image_id": ["1"], "mask_index": np.array([3]), "ious": np.ones((1, 1))}
    with pytest.raises(ValueError, match="do not line up"):
        group_miou(per_mask, {"1": ["a"]}, (1,), "g")
