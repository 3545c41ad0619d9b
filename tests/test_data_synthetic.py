"""The built-in synthetic dataset: determinism, disjoint splits, occlusion and part/whole masks."""

import hashlib

import numpy as np
import pytest

from sam_jax.data import SyntheticConfig, SyntheticDataset, iterate_examples, synthetic_example


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_deterministic_from_seed_split_index():
    a = synthetic_example(5, "train")
    b = synthetic_example(5, "train")
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["masks"], b["masks"])
    other_seed = synthetic_example(5, "train", SyntheticConfig(seed=1))
    assert not np.array_equal(a["image"], other_seed["image"])
    assert not np.array_equal(a["image"], synthetic_example(6, "train")["image"])


def test_splits_do_not_overlap():
    config = SyntheticConfig(image_size=32)
    digests = {
        s: {_digest(synthetic_example(i, s, config)["image"]) for i in range(40)}
        for s in ("train", "val", "test")
    }
    assert all(len(d) == 40 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_example_format_and_mask_properties():
    config = SyntheticConfig(image_size=(48, 64))
    n_parts = 0
    for i in range(30):
        ex = synthetic_example(i, "val", config)
        image, masks, parents = ex["image"], ex["masks"], ex["parents"]
        assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
        assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (48, 64)
        assert len(masks) >= 1 and masks.reshape(len(masks), -1).any(-1).all()
        assert ex["image_id"] == f"synthetic-0-val-{i}"
        assert masks.mean((1, 2)).max() <= 0.45
        for j in range(len(masks)):
            for k in range(j + 1, len(masks)):
                if parents[k] == j:  # a part lies inside its whole
                    n_parts += 1
                    assert not (masks[k] & ~masks[j]).any()
                    assert masks[j].sum() > masks[k].sum()
                elif parents[j] != k:  # otherwise visible parts never overlap (occlusion)
                    assert not (masks[j] & masks[k]).any()
    assert n_parts >= 3


def test_objects_stand_out_from_background():
    diffs = []
    for i in range(20):
        ex = synthetic_example(i, "test")
        image = ex["image"].astype(np.float32)
        background = ~ex["masks"].any(0)
        for m in ex["masks"]:
            diffs.append(np.abs(image[m].mean(0) - image[background].mean(0)).max())
    assert np.median(diffs) > 40


def test_dataset_sizes_and_spec_options():
    ds = SyntheticDataset("val")
    assert len(ds) == 64 and len(SyntheticDataset("train")) == 2000
    with pytest.raises(IndexError):
        ds[64]
    exs = list(iterate_examples("synthetic:test?image_size=24x40&num_images=3&seed=2"))
    assert [e["image_id"] for e in exs] == [f"synthetic-2-test-{i}" for i in range(3)]
    assert exs[0]["image"].shape == (24, 40, 3)
    ref = synthetic_example(1, "test", SyntheticConfig(image_size=(24, 40), seed=2))
    assert np.array_equal(exs[1]["masks"], ref["masks"])


def _exclusive_stds(ex):
    """Per-mask pixel std over the pixels that belong to that mask only (not to its part)."""
    image, masks = ex["image"].astype(np.float32), ex["masks"]
    out = []
    for j, m in enumerate(masks):
        own = m & ~np.any([masks[k] for k in range(len(masks)) if k != j], axis=0)
        if own.sum() > 20:
            out.append(image[own].std(0).max())
    return np.array(out)


def test_texture_strength_keeps_layouts_and_scales_contrast():
    stds = {}
    for strength in (1.0, 0.5, 0.0):
        config = SyntheticConfig(texture_strength=strength)
        exs = [synthetic_example(i, "val", config) for i in range(12)]
        if strength != 1.0:  # same random stream: same layouts and masks
            for a, b in zip(exs, [synthetic_example(i, "val") for i in range(12)], strict=True):
                assert np.array_equal(a["masks"], b["masks"])
        stds[strength] = np.concatenate([_exclusive_stds(e) for e in exs])
    # Flat colours (a few masks keep a dropped, too-small part of another colour).
    assert np.mean(stds[0.0] == 0.0) > 0.8 and np.mean(stds[1.0] == 0.0) < 0.6
    textured = stds[1.0] > 5
    assert 0.3 < np.median(stds[0.5][textured] / stds[1.0][textured]) < 0.7


def test_part_prob_and_texture_strength():
    no_parts = SyntheticConfig(part_prob=0.0)
    assert all((synthetic_example(i, "val", no_parts)["parents"] == -1).all() for i in range(20))
    all_parts = SyntheticConfig(part_prob=1.0)
    assert (
        sum((synthetic_example(i, "val", all_parts)["parents"] >= 0).sum() for i in range(20)) >= 8
    )
    exs = list(iterate_examples("synthetic:test?num_images=3&part_prob=0.5&texture_strength=0.25"))
    config = SyntheticConfig(part_prob=0.5, texture_strength=0.25)
    for i, ex in enumerate(exs):
        assert np.array_equal(ex["image"], synthetic_example(i, "test", config)["image"])
    # Object-size options reach the generator: every visible mask covers at least min_visible.
    exs = list(
        iterate_examples("synthetic:val?num_images=8&min_area=0.1&max_area=0.2&min_visible=0.05")
    )
    config = SyntheticConfig(min_area=0.1, max_area=0.2, min_visible=0.05)
    for i, ex in enumerate(exs):
        assert np.array_equal(ex["masks"], synthetic_example(i, "val", config)["masks"])
        assert ex["masks"].reshape(len(ex["masks"]), -1).mean(axis=1).min() >= 0.05
    for bad, match in [
        ("texture_strength=2", "texture_strength must be in"),
        ("part_prob=x", "number"),
        ("min_area=0.5&max_area=0.2", "min_area <= max_area"),
    ]:
        with pytest.raises(ValueError, match=match):
            list(iterate_examples(f"synthetic:test?num_images=1&{bad}"))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="split"):
        synthetic_example(0, "validation")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=4)
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticConfig(min_objects=3, max_objects=2)
