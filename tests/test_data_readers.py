"""SA-1B and COCO readers: decoded masks, skip-and-count of broken entries, host sharding."""

import numpy as np
import pytest

from sam_jax.data import iterate_examples
from tests.fixtures_data import synthetic_examples, write_coco_dataset, write_sa1b_dataset


def _read(spec, **kwargs):
    stats = {}
    exs = list(iterate_examples(spec, stats=stats, **kwargs))
    return exs, stats


def _check_stats(stats, expected):
    for key, value in expected.items():
        assert stats.get(key, 0) == value, (key, stats)


@pytest.mark.parametrize("layout", ["tar", "pairs", "both"])
def test_sa1b_returns_the_masks_written(tmp_path, layout):
    fx = write_sa1b_dataset(tmp_path / "sa1b", layout=layout)
    exs, stats = _read(fx.spec)
    assert sorted(e["image_id"] for e in exs) == sorted(fx.masks)
    for ex in exs:
        assert np.array_equal(ex["masks"], fx.masks[ex["image_id"]])
        original = fx.images[ex["image_id"]]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == original.shape
        assert np.abs(ex["image"].astype(int) - original).mean() < 8  # JPEG quality 95
    _check_stats(stats, fx.expected_stats)
    assert fx.expected_stats["skipped_images"] == 1 and fx.expected_stats["skipped_masks"] == 1


def test_sa1b_exact_pixels_single_tar_and_max_images(tmp_path):
    fx = write_sa1b_dataset(
        tmp_path / "sa1b", layout="tar", images_per_tar=10, broken=False, image_format="PNG"
    )
    tar = str(tmp_path / "sa1b" / "sa_000000.tar")
    exs, _ = _read(f"sa1b:{tar}")
    assert len(exs) == 6
    for ex in exs:
        assert np.array_equal(ex["image"], fx.images[ex["image_id"]])
    first, _ = _read(fx.spec, max_images=2)
    assert [e["image_id"] for e in first] == [e["image_id"] for e in exs[:2]]
    shuffled = [e["image_id"] for e in _read(fx.spec, shuffle=True, seed=3)[0]]
    assert shuffled == [e["image_id"] for e in _read(fx.spec, shuffle=True, seed=3)[0]]
    assert sorted(shuffled) == sorted(e["image_id"] for e in exs)


def test_coco_matches_pycocotools_ann_to_mask(tmp_path):
    fx = write_coco_dataset(tmp_path / "coco")
    exs, stats = _read(fx.spec)
    assert [e["image_id"] for e in exs] == sorted(fx.masks, key=int)
    for ex in exs:
        assert np.array_equal(ex["masks"], fx.masks[ex["image_id"]])
    _check_stats(stats, fx.expected_stats)
    assert fx.expected_stats["skipped_images"] == 2 and fx.expected_stats["skipped_masks"] == 2


def test_coco_include_crowd(tmp_path):
    fx = write_coco_dataset(tmp_path / "coco")
    default = {e["image_id"]: e for e in _read(fx.spec)[0]}
    crowd, stats = _read(fx.spec + "?include_crowd=1")
    assert stats.get("crowd_masks", 0) == 0
    with_crowd = {e["image_id"]: e for e in crowd}
    assert len(with_crowd["4"]["masks"]) == len(default["4"]["masks"]) + 1
    source_mask = synthetic_examples(6)[3]["masks"][0]  # the crowd RLE encodes it exactly
    assert np.array_equal(with_crowd["4"]["masks"][-1], source_mask)


@pytest.mark.parametrize("kind", ["sa1b_tars", "sa1b_one_tar", "sa1b_pairs", "coco", "synthetic"])
def test_host_shards_are_disjoint_and_cover_everything(tmp_path, kind):
    if kind == "coco":
        spec = write_coco_dataset(tmp_path / "d").spec
    elif kind == "synthetic":
        spec = "synthetic:val?image_size=16&num_images=7"
    else:
        layout = "pairs" if kind == "sa1b_pairs" else "tar"
        spec = write_sa1b_dataset(
            tmp_path / "d", layout=layout, images_per_tar=10 if kind == "sa1b_one_tar" else 3
        ).spec
    everything = [e["image_id"] for e in _read(spec)[0]]
    shares = [
        [e["image_id"] for e in _read(spec, process_index=i, process_count=2)[0]] for i in range(2)
    ]
    assert all(shares) and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)
    with pytest.raises(ValueError, match="process_index"):
        iterate_examples(spec, process_index=2, process_count=2)


def test_lvis_style_image_entries_use_coco_url(tmp_path):
    import json

    fx = write_coco_dataset(tmp_path / "coco", broken=False)
    data = json.loads(open(fx.path).read())
    for im in data["images"]:
        im["coco_url"] = "http://images.cocodataset.org/val2017/" + im.pop("file_name")
    lvis = tmp_path / "coco" / "lvis.json"
    lvis.write_text(json.dumps(data))
    exs, _ = _read(f"coco:{lvis}:{tmp_path / 'coco' / 'images'}")
    assert sorted(e["image_id"] for e in exs) == sorted(fx.masks)
    assert all(np.array_equal(e["masks"], fx.masks[e["image_id"]]) for e in exs)
