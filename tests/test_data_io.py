"""Readers on gs:// paths, served by the GCS emulator on 127.0.0.1 (tests/gcs_emulator.py)."""

import os

import numpy as np
import pytest

from sam_jax.data import iterate_examples, make_train_iterator
from tests.fixtures_data import write_coco_dataset, write_sa1b_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _copy_tree(src, dst):
    from sam_jax import paths

    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                paths.write_bytes(f"{target}/{name}", f.read())


def test_sa1b_and_coco_from_bucket_paths(tmp_path, gcs, monkeypatch):
    monkeypatch.setenv("SAM_JAX_CACHE", str(tmp_path / "cache"))
    sa1b = write_sa1b_dataset(tmp_path / "sa1b", layout="both")
    coco = write_coco_dataset(tmp_path / "coco")
    bucket = gcs.url("io")
    _copy_tree(tmp_path / "sa1b", f"{bucket}/sa1b")
    _copy_tree(tmp_path / "coco", f"{bucket}/coco")
    for spec, fx in [
        (f"sa1b:{bucket}/sa1b", sa1b),
        (f"coco:{bucket}/coco/annotations.json:{bucket}/coco/images", coco),
    ]:
        stats = {}
        exs = list(iterate_examples(spec, stats=stats))
        assert sorted(e["image_id"] for e in exs) == sorted(fx.masks)
        assert all(np.array_equal(e["masks"], fx.masks[e["image_id"]]) for e in exs)
        assert all(stats.get(k, 0) == v for k, v in fx.expected_stats.items())
    batch = next(
        make_train_iterator(
            f"sa1b:{bucket}/sa1b",
            batch_size=2,
            image_size=32,
            mask_size=8,
            max_masks=2,
            backend="threads",
        )
    )
    assert batch["mask_valid"].any(1).all()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iterate_examples(f"sa1b:{bucket}/nowhere")
