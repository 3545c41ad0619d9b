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


# ------------------------------------------------------------------ SA-1B fields, binned numbers

SA1B_HW = (120, 120)
SA1B_MASKS = {  # image -> [(mask or None for an unreadable / empty one, predicted_iou, crop)]
    "sa_1": [
        (rect(0, 20, 0, 20, SA1B_HW), 0.70, 0),  # area 400: small
        ("bad", 0.5, 0),  # undecodable RLE: dropped by the reader
        (rect(30, 70, 0, 40, SA1B_HW), 0.80, 0),  # 1600: medium
        (rect(0, 0, 0, 0, SA1B_HW), 0.5, 0),  # zero area: dropped
        (rect(10, 110, 15, 115, SA1B_HW), 0.95, 1),  # 10000: large
    ],
    "sa_2": [(rect(5, 45, 60, 100, SA1B_HW), 0.85, 1), (rect(90, 110, 0, 20, SA1B_HW), 0.60, 0)],
    "sa_3": [(rect(20, 118, 20, 118, SA1B_HW), 0.99, 0)],
}


def write_grouped_sa1b(root):
    """sa_1 and sa_2 in one tar, sa_3 as a jpg + json pair; annotations with their own
    predicted_iou and crop_box (two crops), a bad RLE and an empty mask between kept ones."""
    import io
    import tarfile

    from tests.fixtures_data import bad_rle, encode_image, encode_rle, sa1b_json

    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {}
    for n, (stem, anns) in enumerate(SA1B_MASKS.items(), start=1):
        segs = [bad_rle(SA1B_HW) if isinstance(m, str) else encode_rle(m) for m, _, _ in anns]
        meta = sa1b_json(n, stem + ".jpg", SA1B_HW, segs)
        for a, (_, iou, crop) in zip(meta["annotations"], anns, strict=True):
            a["predicted_iou"] = iou
            a["crop_box"] = [0, 0, 120, 120] if crop == 0 else [0, 0, 80, 80]
        image = rng.integers(0, 256, (*SA1B_HW, 3), np.uint8)
        files[stem] = (encode_image(image, "PNG"), json.dumps(meta).encode())
    with tarfile.open(root / "sa_000000.tar", "w") as tar:
        for stem in ("sa_1", "sa_2"):
            for ext, data in zip(("jpg", "json"), files[stem], strict=True):
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "sa_3.jpg").write_bytes(files["sa_3"][0])
    (root / "sa_3.json").write_bytes(files["sa_3"][1])
    return f"sa1b:{root}"


def _kept_sa1b():
    """(image, mask index, area, predicted_iou) of every mask the reader keeps."""
    out = []
    for stem, anns in SA1B_MASKS.items():
        kept = [(m, iou) for m, iou, _ in anns if not isinstance(m, str) and m.any()]
        out += [(stem, j, int(m.sum()), iou) for j, (m, iou) in enumerate(kept)]
    return out


def test_sa1b_fields_line_up_with_the_readers_masks(tmp_path):
    from sam_jax.evaluation.groups import group_values

    spec = parse_dataset_spec(write_grouped_sa1b(tmp_path / "sa1b"))
    values = group_values(spec, "predicted_iou")
    assert values == {"sa_1": [0.70, 0.80, 0.95], "sa_2": [0.85, 0.60], "sa_3": [0.99]}
    examples = {e["image_id"]: e["masks"] for e in iterate_examples(spec)}
    assert {k: len(v) for k, v in examples.items()} == {k: len(v) for k, v in values.items()}
    for stem, j, area, _ in _kept_sa1b():
        assert examples[stem][j].sum() == area
    assert group_values(spec, "area", image_ids=["sa_3"]) == {"sa_3": [98 * 98]}
    crops = group_labels(spec, "crop_box")
    assert crops["sa_2"] == ["[0, 0, 80, 80]", "[0, 0, 120, 120]"]
    with pytest.raises(ValueError, match="has no field 'gender'"):
        group_values(spec, "gender")
    with pytest.raises(ValueError, match="no image 'sa_9'"):
        group_values(spec, "area", image_ids=["sa_9"])


def test_numeric_bins():
    from sam_jax.evaluation.groups import bin_values, parse_group_by

    labels, order, edges = bin_values([400, 1024, 1600, 9216, 10000, 0], "coco", "area")
    assert labels == ["small [0, 1024)", "medium [1024, 9216)", "medium [1024, 9216)",
                      "large [9216, inf)", "large [9216, inf)", "small [0, 1024)"]  # fmt: skip
    assert order[0].startswith("small") and edges == [0.0, 1024.0, 9216.0, np.inf]
    labels, order, edges = bin_values([0.1, 0.2, 0.3, 0.4], "q2")
    assert labels == ["q1 [0.1, 0.25)"] * 2 + ["q2 [0.25, 0.4]"] * 2
    labels, _, _ = bin_values([0.7, 0.7, 0.7], "q4")  # equal quantiles merge into one bin
    assert labels == ["q1 [0.7, 0.7]"] * 3
    labels, order, _ = bin_values([0.5, 0.9, 0.95], "0.9")
    assert labels == ["[-inf, 0.9)", "[0.9, inf)", "[0.9, inf)"] and len(order) == 2
    with pytest.raises(ValueError, match="bins numbers, but a value is 'x'"):
        bin_values([1, "x"], "q2", "f")
    assert parse_group_by("area") == ("area", "coco")
    assert parse_group_by("predicted_iou") == ("predicted_iou", "q4")
    assert parse_group_by("area:values") == ("area", None)
    assert parse_group_by("gender") == ("gender", None)
    assert parse_group_by("stability_score:0.9,0.95") == ("stability_score", "0.9,0.95")
    for bad in ("area:q1", "area:q99", "area:0.9,0.8", "area:small", ":q2"):
        with pytest.raises(ValueError):
            parse_group_by(bad)


def test_points_grouped_by_sa1b_area_and_score_bins(tmp_path):
    """--group-by area on SA-1B: COCO's area ranges; predicted_iou:0.9 two bins; each group's
    mIoU the mean of its masks' own IoUs (from the per-mask protocol run by hand)."""
    import jax

    from sam_jax.config import tiny_config
    from sam_jax.evaluation.checkpoint import EvalSettings, evaluate_checkpoint
    from sam_jax.evaluation.protocol import evaluate_points
    from sam_jax.modeling import build_sam
    from sam_jax.predictor import SamPredictor

    model = build_sam(tiny_config())
    predictor = SamPredictor(model, model.init_params(jax.random.key(0)))
    text = write_grouped_sa1b(tmp_path / "sa1b")
    spec = parse_dataset_spec(text)
    per = evaluate_points(
        predictor, lambda: iterate_examples(spec), num_points=(1, 3), return_per_mask=True
    )["per_mask"]
    iou = {
        (i, int(j)): v
        for i, j, v in zip(per["image_id"], per["mask_index"], per["ious"], strict=True)
    }
    kept = _kept_sa1b()
    for group_by, rule, want_groups in (
        ("area", lambda a, s: ["small", "medium", "large"][(a >= 1024) + (a >= 9216)],
         ["small [0, 1024)", "medium [1024, 9216)", "large [9216, inf)"]),
        ("predicted_iou:0.9", lambda a, s: "[-inf, 0.9)" if s < 0.9 else "[0.9, inf)",
         ["[-inf, 0.9)", "[0.9, inf)"]),
    ):  # fmt: skip
        settings = EvalSettings(group_by=group_by, num_points=(1, 3), gt_boxes=False)
        entry = evaluate_checkpoint(predictor, [text], settings)["datasets"][text]
        g = entry["groups"]
        assert list(g["groups"]) == want_groups and g["field"] == group_by.split(":")[0]
        for label, e in g["groups"].items():
            rows = [iou[(s, j)] for s, j, a, p in kept if label.startswith(rule(a, p))]
            assert e["num_masks"] == len(rows)
            for n in (1, 3):
                assert e["miou"][str(n)] == pytest.approx(np.mean([r[n - 1] for r in rows]))
    assert g["bins"] == {"bins": "0.9", "edges": [-np.inf, 0.9, np.inf]}
