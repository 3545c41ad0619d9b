"""Opening a dataset spec as a source, and `iterate_examples`, the example-level reader.

A source is either random access (`len(source)`, `source.load(i, stats) -> Record | None`:
synthetic, sa1b, coco) or a stream (tfds). A random-access source holds the whole dataset on every
host, in the same order; who reads what is decided above it (the training pipeline by batch
rows, `iterate_examples` by index i::process_count).
"""

from __future__ import annotations

import numpy as np

from sam_jax.data.coco import CocoSource
from sam_jax.data.nuclei import NucleiDataset
from sam_jax.data.records import DenseMasks, Record, count
from sam_jax.data.sa1b import SA1BSource
from sam_jax.data.spec import FRACTION_OPTIONS, DatasetSpec, parse_dataset_spec
from sam_jax.data.synthetic import SyntheticConfig, SyntheticDataset
from sam_jax.data.tfds_source import open_tfds, tfds_example_to_record


class SyntheticSource:
    """Random-access synthetic images."""

    def __init__(self, split: str, config: SyntheticConfig):
        self.dataset = SyntheticDataset(split, config)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int, stats: dict | None = None) -> Record:
        ex = self.dataset[i]
        count(stats, "decoded_images")
        return Record(ex["image_id"], ex["image"], DenseMasks(ex["masks"]))


class NucleiSource:
    """Random-access tiles of scikit-image's IHC slide with their nuclei (`data.nuclei`)."""

    def __init__(self, split: str):
        self.dataset = NucleiDataset("test" if split == "val" else split)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, i: int, stats: dict | None = None) -> Record:
        ex = self.dataset[i]
        count(stats, "decoded_images")
        return Record(ex["image_id"], ex["image"], DenseMasks(ex["masks"]))


def synthetic_config(spec: DatasetSpec, split: str) -> SyntheticConfig:
    """The SyntheticConfig of a `synthetic` spec's options (num_images sets `split`'s size)."""
    kwargs = {}
    size = spec.option("image_size")
    if size is not None:
        kwargs["image_size"] = tuple(int(v) for v in size.split("x")) if "x" in size else int(size)
    for key in ("seed", "min_objects", "max_objects"):
        if spec.option(key) is not None:
            kwargs[key] = int(spec.option(key))
    for key in FRACTION_OPTIONS:
        if spec.option(key) is not None:
            kwargs[key] = float(spec.option(key))
    if spec.option("num_images") is not None:
        kwargs[f"num_{split}"] = int(spec.option("num_images"))
    try:
        return SyntheticConfig(**kwargs)
    except ValueError as e:
        raise ValueError(f"dataset spec {spec.text!r}: {e}") from None


def check_process(process_index: int, process_count: int) -> None:
    if not (isinstance(process_count, (int, np.integer)) and process_count >= 1):
        raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not (isinstance(process_index, (int, np.integer)) and 0 <= process_index < process_count):
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")


def open_source(
    spec: str | DatasetSpec,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    *,
    index_dir: str | None = None,
    barrier=None,
):
    """Opens a spec as a source (the spec's split wins over `split`).

    Random-access sources hold the whole dataset; process_index/process_count only share the
    work of building the SA-1B tar index (cached in index_dir, `barrier()` syncs the processes
    after their share).
    """
    spec = parse_dataset_spec(spec)
    check_process(process_index, process_count)
    split = spec.split or split
    if spec.kind == "synthetic":
        return SyntheticSource(split, synthetic_config(spec, split))
    if spec.kind == "nuclei":
        return NucleiSource(split)
    if spec.kind == "sa1b":
        return SA1BSource(spec.path, index_dir, process_index, process_count, barrier)
    if spec.kind in ("coco", "lvis"):  # LVIS annotations have no crowd entries
        return CocoSource(spec.path, spec.images_dir, spec.option("include_crowd", "0") == "1")
    if spec.kind == "bsds":
        raise ValueError(
            f"dataset {spec.text!r}: BSDS500 has boundary maps, not instance masks (it serves "
            "the edges evaluation only)"
        )

    return open_tfds(spec.name, split, spec.option("data_dir"))


def is_stream(source) -> bool:
    return not hasattr(source, "load")


def iter_records(
    source,
    stats: dict | None = None,
    shuffle: bool = False,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
):
    """Yields Record | None (unusable image, already counted) over process_index's share of the
    source once: the indices process_index::process_count of a random-access source's (shuffled)
    order, or an even share of a stream."""
    if is_stream(source):
        examples = source.iter_examples(
            shuffle_seed=seed if shuffle else None, shard=(process_index, process_count)
        )
        return (tfds_example_to_record(ex, stats) for ex in examples)
    order = (
        np.random.default_rng([seed, 0x5EED]).permutation(len(source))
        if shuffle
        else range(len(source))
    )
    return (source.load(int(i), stats) for i in order[process_index::process_count])


def iterate_examples(
    spec: str | DatasetSpec,
    split: str = "val",
    max_images: int | None = None,
    seed: int = 0,
    stats: dict | None = None,
    *,
    shuffle: bool = False,
    process_index: int = 0,
    process_count: int = 1,
):
    """Iterates this host's share of a dataset once, in a fixed order (with several processes,
    the shares are disjoint and together the whole dataset; max_images caps each share).

    Yields {"image": uint8 (H, W, 3), "masks": bool (M, H, W) with M >= 1, "image_id": str}.
    Undecodable images/masks and zero-area masks are dropped and counted in `stats`
    ("skipped_images", "skipped_masks", "empty_masks", "crowd_masks"); images left with no mask
    are skipped ("images_without_masks"). max_images caps the number yielded; shuffle=True visits
    the images in a `seed`-determined order. Spec errors raise ValueError at call time.
    """
    if max_images is not None and (not isinstance(max_images, (int, np.integer)) or max_images < 0):
        raise ValueError(f"max_images must be None or an int >= 0, got {max_images!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    source = open_source(spec, split, process_index, process_count)
    return _examples(source, max_images, seed, stats, shuffle, (process_index, process_count))


def _examples(source, max_images, seed, stats, shuffle, shard):
    if max_images == 0:
        return
    yielded = 0
    for record in iter_records(source, stats, shuffle, seed, *shard):
        if record is None:
            continue
        if len(record.masks) == 0:
            count(stats, "images_without_masks")
            continue
        yield record.to_example()
        yielded += 1
        if max_images is not None and yielded >= max_images:
            return
