"""Training batches: resize/pad to the model frame, filter and sample masks, batch, repeat forever.

Determinism and resuming: raw examples form one infinite stream per host (epoch e is a permutation
of the host's share seeded by (seed, e); tfds streams are shuffled with a seeded buffer). Stream
position q is turned into a training example by a pure function of (seed, process_index, q, the
example). Batch k holds slots k*B .. k*B+B-1; slot p takes the example at position p, or, if that
one is unusable (undecodable, or no valid mask), the first usable one after it. Batch k therefore
depends only on positions >= k*B, and `start_batch=k` starts the stream at k*B and yields exactly
the batches k, k+1, ... of an uninterrupted run.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from sam_jax.data.records import Record, count
from sam_jax.data.sources import is_stream, open_source
from sam_jax.data.spec import DatasetSpec, parse_dataset_spec
from sam_jax.transforms import get_preprocess_shape


def frame_geometry(
    h: int,
    w: int,
    image_size: int,
    rng: np.random.Generator | None = None,
    large_scale_jitter: tuple[float, float] | None = None,
    align: int = 1,
):
    """Where an (h, w) image lands in the S x S model frame.

    Without jitter the longest side is resized to S (official ResizeLongestSide arithmetic). With
    large_scale_jitter=(lo, hi) it is resized to int(S * s + 0.5), s ~ U(lo, hi), and a random
    S x S window (offsets multiples of `align`) is cropped where the result exceeds S. Returns
    ((newh, neww), (y0, x0)): the resized size and the crop offset; the kept part goes to the
    top-left, the rest is zero padding.
    """
    long_side = image_size
    if large_scale_jitter is not None:
        long_side = max(1, int(image_size * rng.uniform(*large_scale_jitter) + 0.5))
    newh, neww = get_preprocess_shape(h, w, long_side)
    newh, neww = max(newh, 1), max(neww, 1)
    y0 = align * int(rng.integers(0, (newh - image_size) // align + 1)) if newh > image_size else 0
    x0 = align * int(rng.integers(0, (neww - image_size) // align + 1)) if neww > image_size else 0
    return (newh, neww), (y0, x0)


def _place(resized: np.ndarray, offset: tuple[int, int], image_size: int) -> np.ndarray:
    """Crops at offset and zero pads bottom/right to (S, S, ...)."""
    y0, x0 = offset
    crop = resized[y0 : y0 + image_size, x0 : x0 + image_size]
    out = np.zeros((image_size, image_size, *resized.shape[2:]), resized.dtype)
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def transform_image(image: np.ndarray, size_hw, offset, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (S, S, 3): PIL bilinear resize to size_hw, crop, zero pad."""
    resized = np.asarray(Image.fromarray(image).resize(size_hw[::-1], Image.BILINEAR))
    return _place(resized, offset, image_size)


def _area_resize(src: np.ndarray, fy: float, fx: float) -> np.ndarray:
    """uint8 {0, 1} (h, w) -> uint8 coverage 0..255 at scale (fy, fx): cv2 INTER_AREA (pixel-area
    averaging), after an exact k x k box reduction (zero padded to a multiple of k) for speed."""
    import cv2  # lazy: training-only dependency

    src = src * np.uint8(255)
    k = max(1, int(1.0 / max(fx, fy)) // 2)
    if k > 1:
        h, w = src.shape
        hp, wp = -(-h // k) * k, -(-w // k) * k
        if (hp, wp) != (h, w):
            src = np.pad(src, ((0, hp - h), (0, wp - w)))
        src = cv2.resize(src, (wp // k, hp // k), interpolation=cv2.INTER_AREA)
        fy, fx = fy * k, fx * k
    return cv2.resize(src, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_AREA)


def transform_mask(
    mask: np.ndarray, size_hw, offset, image_size: int, mask_size: int
) -> np.ndarray:
    """bool (H, W) -> uint8 {0, 1} (m, m): the mask on the m x m grid of the padded S x S frame.

    Each output pixel covers r x r frame pixels (r = S / m, an integer); its value is the area
    fraction of the original mask under it (pixel-area averaging from the original resolution
    straight to frame size / r), thresholded at 0.5. `offset` must be a multiple of r.
    """
    r = image_size // mask_size
    fy, fx = size_hw[0] / mask.shape[0] / r, size_hw[1] / mask.shape[1] / r
    out = np.zeros((mask_size, mask_size), np.uint8)
    if mask.shape[0] * fy < 0.5 or mask.shape[1] * fx < 0.5:  # smaller than one output pixel
        return out
    if not mask.flags.c_contiguous and mask.T.flags.c_contiguous:  # RLE masks decode transposed
        small = _area_resize(mask.T.view(np.uint8), fx, fy).T
    else:
        small = _area_resize(np.ascontiguousarray(mask).view(np.uint8), fy, fx)
    y0, x0 = offset[0] // r, offset[1] // r
    crop = small[y0 : y0 + mask_size, x0 : x0 + mask_size] >= 128
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def make_training_example(
    record: Record,
    rng: np.random.Generator,
    *,
    image_size: int,
    mask_size: int,
    max_masks: int,
    max_mask_area_fraction: float = 0.9,
    large_scale_jitter: tuple[float, float] | None = None,
    stats: dict | None = None,
) -> dict | None:
    """One training example from a record, or None (counted) if no usable mask remains.

    Masks covering more than max_mask_area_fraction of the image are dropped ("large_masks"); up to
    max_masks of the rest are sampled uniformly without replacement. Returns {"image" uint8
    (S,S,3), "image_hw" int32 (2,) valid (h, w) region, "masks" uint8 (M,m,m), "mask_valid" bool
    (M,)}; masks that vanish in the frame are marked invalid.
    """
    if image_size % mask_size:
        raise ValueError(f"image_size {image_size} must be a multiple of mask_size {mask_size}")
    h, w = record.image.shape[:2]
    areas = np.asarray(record.masks.areas)
    keep = np.flatnonzero((areas > 0) & (areas <= max_mask_area_fraction * h * w))
    count(stats, "large_masks", int((areas > max_mask_area_fraction * h * w).sum()))
    if keep.size == 0:
        count(stats, "images_without_masks")
        return None
    chosen = rng.choice(keep, size=min(max_masks, keep.size), replace=False)
    # with jitter a crop can miss every mask: retry twice, then fall back to no jitter
    attempts = [large_scale_jitter] * 3 + [None] if large_scale_jitter is not None else [None]
    for jitter in attempts:
        size_hw, offset = frame_geometry(h, w, image_size, rng, jitter, image_size // mask_size)
        masks = np.zeros((max_masks, mask_size, mask_size), np.uint8)
        for j, i in enumerate(chosen):
            masks[j] = transform_mask(
                record.masks.decode_one(i), size_hw, offset, image_size, mask_size
            )
        valid = masks.reshape(max_masks, -1).any(-1)
        if valid.any():
            break
    else:
        count(stats, "images_without_masks")
        return None
    image = transform_image(record.image, size_hw, offset, image_size)
    hw = [min(size_hw[0] - offset[0], image_size), min(size_hw[1] - offset[1], image_size)]
    return {
        "image": image,
        "image_hw": np.asarray(hw, np.int32),
        "masks": masks,
        "mask_valid": valid,
    }


class _EpochOrder:
    """Stream position q -> source index: epoch q // n is a (seed, epoch)-seeded permutation."""

    def __init__(self, n: int, seed: int, process_index: int):
        self.n, self.seed, self.process_index = n, seed, process_index
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, q: int) -> int:
        epoch, k = divmod(q, self.n)
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, self.process_index, epoch, 0xE0C])
                perm = self._cache[epoch] = rng.permutation(self.n)
                while len(self._cache) > 4:
                    self._cache.popitem(last=False)
        return int(perm[k])


def _ordered_map(fn, items, num_workers: int):
    """fn over an (infinite) iterable, in order, on a bounded thread pool."""
    if num_workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(num_workers)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        try:
            pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down
            pass


def _tf_map(fn, start: int, num_workers: int | None, shapes):
    """fn over positions start, start+1, ... with tf.data (parallel, deterministic order)."""
    import tensorflow as tf  # lazy

    (s, m, mm) = shapes
    zeros = (
        np.zeros((s, s, 3), np.uint8),
        np.zeros(2, np.int32),
        np.zeros((m, mm, mm), np.uint8),
        np.zeros(m, bool),
    )

    def py(q):
        ex = fn(int(q.numpy()))
        if ex is None:
            return (*zeros, False)
        return ex["image"], ex["image_hw"], ex["masks"], ex["mask_valid"], True

    def load(q):
        out = tf.py_function(py, [q], [tf.uint8, tf.int32, tf.uint8, tf.bool, tf.bool])
        for t, shape in zip(out, [(s, s, 3), (2,), (m, mm, mm), (m,), ()], strict=True):
            t.set_shape(shape)
        return out

    ds = tf.data.Dataset.range(start, 2**62).map(
        load, num_parallel_calls=num_workers or tf.data.AUTOTUNE, deterministic=True
    )
    for image, hw, masks, valid, ok in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        yield (
            {"image": image, "image_hw": hw, "masks": masks, "mask_valid": valid} if ok else None
        )


def _batches(examples, batch_size: int, max_invalid_run: int):
    """Slot assembly: an unusable position takes the next usable example; yields stacked batches."""
    buf, pending, run = [], 0, 0
    for ex in examples:
        if ex is None:
            pending, run = pending + 1, run + 1
            if run > max_invalid_run:
                raise RuntimeError(
                    f"no usable training image in {run} consecutive examples "
                    "(all undecodable or without a valid mask); check the dataset"
                )
            continue
        buf.extend([ex] * (pending + 1))
        pending = run = 0
        while len(buf) >= batch_size:
            yield {k: np.stack([e[k] for e in buf[:batch_size]]) for k in buf[0]}
            del buf[:batch_size]


class TrainIterator:
    """Infinite iterator of training batches. `next_batch`: index of the batch next() returns
    (save it to resume with start_batch); `stats`: running skip/filter counts (includes examples
    loaded ahead by prefetching)."""

    def __init__(self, batches, start_batch: int, stats: dict):
        self._batches = batches
        self.next_batch = start_batch
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self.next_batch += 1
        return batch

    def close(self) -> None:
        self._batches.close()


def _check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def make_train_iterator(
    spec: str | DatasetSpec,
    split: str = "train",
    *,
    batch_size: int,
    image_size: int = 1024,
    mask_size: int = 256,
    max_masks: int = 64,
    seed: int = 0,
    start_batch: int = 0,
    large_scale_jitter: tuple[float, float] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    max_mask_area_fraction: float = 0.9,
    stats: dict | None = None,
    backend: str = "auto",
    num_workers: int | None = None,
) -> TrainIterator:
    """Infinite, deterministic, resumable iterator of this host's training batches.

    Each batch is a numpy dict: "image" uint8 (B,S,S,3) (longest side resized to S with PIL
    bilinear, zero-padded bottom/right), "image_hw" int32 (B,2) resized (h, w) before padding,
    "masks" uint8 {0,1} (B,M,m,m) GT masks on the m x m grid of the padded S x S frame (pixel-area
    average from the original resolution, threshold 0.5; S must be a multiple of m), "mask_valid"
    bool (B,M) (False for padding slots and masks that vanish at m x m; every image has >= 1).
    Masks over max_mask_area_fraction of the image are dropped, then up to max_masks are sampled
    uniformly. large_scale_jitter=(lo, hi) rescales by U(lo, hi) and crops/pads to S.

    Batch k is a pure function of (spec, split, seed, process share, k); `start_batch=k` yields
    exactly the batches k, k+1, ... of a fresh run (resume with `iterator.next_batch`). backend:
    "tf" (tf.data parallel map), "threads" (thread pool) or "auto" (threads for synthetic and
    tfds, tf otherwise); all give identical batches. Needs opencv (the train extra).
    """
    _check_positive(
        batch_size=batch_size, image_size=image_size, mask_size=mask_size, max_masks=max_masks
    )
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f"start_batch must be an int >= 0, got {start_batch!r}")
    if image_size % mask_size:
        raise ValueError(f"image_size {image_size} must be a multiple of mask_size {mask_size}")
    if not 0 < max_mask_area_fraction <= 1:
        raise ValueError(f"max_mask_area_fraction must be in (0, 1], got {max_mask_area_fraction}")
    if large_scale_jitter is not None:
        lo, hi = (float(v) for v in large_scale_jitter)
        if not 0 < lo <= hi:
            raise ValueError(
                f"large_scale_jitter must be (lo, hi) with 0 < lo <= hi, got {large_scale_jitter!r}"
            )
        large_scale_jitter = (lo, hi)
    if backend not in ("auto", "tf", "threads"):
        raise ValueError(f"backend must be 'auto', 'tf' or 'threads', got {backend!r}")
    spec = parse_dataset_spec(spec)
    source = open_source(spec, split, process_index, process_count)
    stats = {} if stats is None else stats
    start = int(start_batch) * batch_size
    workers = num_workers if num_workers is not None else 8
    kwargs = dict(
        image_size=image_size,
        mask_size=mask_size,
        max_masks=max_masks,
        max_mask_area_fraction=max_mask_area_fraction,
        large_scale_jitter=large_scale_jitter,
        stats=stats,
    )

    def process(q: int, record: Record | None) -> dict | None:
        if record is None:
            return None
        rng = np.random.default_rng([seed, process_index, q])
        return make_training_example(record, rng, **kwargs)

    if is_stream(source):
        from sam_jax.data.tfds_source import tfds_example_to_record

        raw = enumerate(source.iter_examples(shuffle_seed=seed, repeat=True, skip=start), start)
        examples = _ordered_map(
            lambda qe: process(qe[0], tfds_example_to_record(qe[1], stats)), raw, workers
        )
        max_run = 10_000
    else:
        if len(source) == 0:
            raise ValueError(
                f"dataset {spec.text!r}: no images in this host's share "
                f"(process {process_index} of {process_count})"
            )
        order = _EpochOrder(len(source), seed, process_index)
        load = lambda q: process(q, source.load(order(q), stats))  # noqa: E731
        use_tf = backend == "tf" or (backend == "auto" and spec.kind != "synthetic")
        if use_tf:
            examples = _tf_map(load, start, num_workers, (image_size, max_masks, mask_size))
        else:
            examples = _ordered_map(load, _count_from(start), workers)
        max_run = 2 * len(source) + 100
    return TrainIterator(_batches(examples, batch_size, max_run), int(start_batch), stats)


def _count_from(start: int):
    q = start
    while True:
        yield q
        q += 1
