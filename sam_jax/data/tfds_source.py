"""Reader for the tensorflow-datasets `segment_anything` builder (or any builder with its features).

Features used: image {content, file_name, image_id, height, width} and annotations {segmentation
{counts (COCO RLE string), size [h, w]}}. The dataset must have been prepared (tfds build); its
builder downloads the SA-1B tars itself, so for tars you already have use `sa1b:PATH` instead.
"""

from __future__ import annotations

import posixpath

import numpy as np

from sam_jax.data.records import (
    Record,
    count,
    decode_image,
    rle_masks_from_segmentations,
    skip_image,
)


def tfds_example_to_record(example: dict, stats: dict | None = None) -> Record | None:
    """Converts one numpy tfds example of `segment_anything` to a Record (None if unusable).

    `example["image"]["content"]` may be encoded bytes (tfds.decode.SkipDecoding) or uint8 (H,W,3).
    """
    image_meta = example["image"]
    name = image_meta.get("file_name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    image_id = posixpath.splitext(name)[0] if name else str(int(image_meta.get("image_id", -1)))
    try:
        content = image_meta["content"]
        if isinstance(content, (bytes, np.bytes_)):
            image = decode_image(bytes(content))
        else:
            image = np.asarray(content)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image content has dtype {image.dtype} and shape {image.shape}")
        seg = example["annotations"]["segmentation"]
        counts, sizes = list(seg["counts"]), np.asarray(seg["size"]).reshape(-1, 2)
        if len(counts) != len(sizes):
            raise ValueError("annotations have mismatched counts and sizes")
    except Exception as e:  # noqa: BLE001 - any decode failure skips the image
        skip_image(stats, image_id, e)
        return None
    segmentations = [
        {"size": [int(s[0]), int(s[1])], "counts": c} for c, s in zip(counts, sizes, strict=True)
    ]
    masks = rle_masks_from_segmentations(segmentations, image.shape[:2], image_id, stats)
    count(stats, "decoded_images")
    return Record(image_id, image, masks)


def _prepared_builder(name: str, split: str, data_dir: str | None):
    """The tfds builder of a prepared dataset that has `split` (one-line ValueError otherwise)."""
    import tensorflow_datasets as tfds  # lazy

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - DatasetNotFoundError and friends
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"tfds:{name}: cannot load the builder ({first})") from None
    if not builder.is_prepared():
        raise ValueError(
            f"tfds:{name}: dataset is not prepared in {builder.data_dir} (run `tfds build "
            f"{name}` or builder.download_and_prepare(); to read SA-1B tars you already have, "
            "use sa1b:PATH)"
        )
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise ValueError(
            f"tfds:{name}: no split {base!r} (available: {', '.join(builder.info.splits)})"
        )
    return builder


def open_tfds(name: str, split: str, data_dir: str | None = None):
    """A prepared tfds split: a `TfdsIndexedSource` (random access) when it was built as
    array_record (`tfds build --file_format=array_record`, the layout to use at SA-1B scale),
    else a `TfdsSource` stream (tfrecord builds have no random access)."""
    builder = _prepared_builder(name, split, data_dir)
    try:
        data = builder.as_data_source(split=split, decoders=_skip_image_decoding())
    except NotImplementedError:  # tfrecord: only sequential reading
        return TfdsSource(name, split, data_dir, builder=builder)
    return TfdsIndexedSource(name, split, data)


def _skip_image_decoding() -> dict:
    """tfds decoders that leave the image bytes encoded (we decode them ourselves)."""
    import tensorflow_datasets as tfds  # lazy

    return {"image": {"content": tfds.decode.SkipDecoding()}}


class TfdsIndexedSource:
    """A prepared tfds split with random access (a tfds data source over array_record files):
    example i is read directly, so the training pipeline resumes at step k in O(1) reads."""

    def __init__(self, name: str, split: str, data):
        self.name, self.split, self._data = name, split, data

    def __len__(self) -> int:
        return len(self._data)

    def load(self, i: int, stats: dict | None = None) -> Record | None:
        return tfds_example_to_record(self._data[int(i)], stats)


class TfdsSource:
    """A prepared tfds split, read as a stream (whole, or one host's even share)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, builder=None):
        self.builder = builder if builder is not None else _prepared_builder(name, split, data_dir)
        self.name = name
        self.split = split

    def dataset(
        self,
        shuffle_seed: int | None = None,
        repeat: bool = False,
        skip: int = 0,
        shuffle_buffer: int = 1024,
        shard: tuple[int, int] = (0, 1),
    ):
        """The raw tf.data stream (image content left encoded), optionally repeated, shuffled
        (deterministically, seeded) and advanced by `skip` examples; shard=(i, n): the i-th of n
        even shares of the split."""
        import tensorflow_datasets as tfds  # lazy

        shuffle = shuffle_seed is not None
        split = self.split if shard[1] == 1 else tfds.even_splits(self.split, n=shard[1])[shard[0]]
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed) if shuffle else None,
            decoders=_skip_image_decoding(),
        )
        if repeat:
            ds = ds.repeat()
        if shuffle_seed is not None:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.skip(skip) if skip else ds

    def iter_examples(self, **kwargs):
        """Yields numpy tfds examples from `dataset(**kwargs)`."""
        import tensorflow_datasets as tfds  # lazy

        yield from tfds.as_numpy(self.dataset(**kwargs))
