"""Readers on tf.io.gfile paths (the in-memory ram:// filesystem stands in for gs://)."""

import os

import numpy as np
import pytest

from sam_jax.data import iterate_examples, make_train_iterator
from tests.fixtures_data import write_coco_dataset, write_sa1b_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _copy_tree(src, dst):
    import tensorflow as tf

    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)


def test_sa1b_and_coco_from_gfile_paths(tmp_path):
    sa1b = write_sa1b_dataset(tmp_path / "sa1b", layout="both")
    coco = write_coco_dataset(tmp_path / "coco")
    _copy_tree(tmp_path / "sa1b", "ram://bucket/sa1b")
    _copy_tree(tmp_path / "coco", "ram://bucket/coco")
    for spec, fx in [
        ("sa1b:ram://bucket/sa1b", sa1b),
        ("coco:ram://bucket/coco/annotations.json:ram://bucket/coco/images", coco),
    ]:
        stats = {}
        exs = list(iterate_examples(spec, stats=stats))
        assert sorted(e["image_id"] for e in exs) == sorted(fx.masks)
        assert all(np.array_equal(e["masks"], fx.masks[e["image_id"]]) for e in exs)
        assert all(stats.get(k, 0) == v for k, v in fx.expected_stats.items())
    batch = next(
        make_train_iterator(
            "sa1b:ram://bucket/sa1b",
            batch_size=2,
            image_size=32,
            mask_size=8,
            max_masks=2,
            backend="threads",
        )
    )
    assert batch["mask_valid"].any(1).all()
    with pytest.raises(ValueError, match="does not exist"):
        iterate_examples("sa1b:ram://bucket/nowhere")
