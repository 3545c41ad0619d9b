"""Training batches: resize/pad to the model frame, filter and sample masks, batch, repeat forever.

Determinism, hosts and resuming: the raw examples form one infinite global stream, the same on
every host (epoch e of a random-access source is a permutation of the whole dataset seeded by
(seed, e); tfds streams are shuffled with a seeded buffer). The global batch k has B slots; slot s
takes the example at stream position q = k*B + s, or, if that one is unusable (undecodable, or no
valid mask), the first usable one after it, and turns it into a training example with an RNG
seeded by (seed, q). Every slot is therefore a pure function of (dataset, seed, k, s): the global
batch of step k never depends on how many processes read it, each process computes only its own
rows of it, and `start_batch=k` starts at step k in constant time for random-access sources
(synthetic, sa1b, coco, and tfds datasets built as array_record): no skipping of k*B examples.
A tfds dataset built as tfrecord is a stream, advanced by reading it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from sam_jax.data.records import Record, count
from sam_jax.data.sources import check_process, is_stream, open_source
from sam_jax.data.spec import DatasetSpec, parse_dataset_spec
from sam_jax.data.tfds_source import tfds_example_to_record
from sam_jax.transforms import get_preprocess_shape

logger = logging.getLogger(__name__)


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

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, q: int) -> int:
        epoch, k = divmod(q, self.n)
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, epoch, 0xE0C])
                perm = self._cache[epoch] = rng.permutation(self.n)
                while len(self._cache) > 4:
                    self._cache.popitem(last=False)
        return int(perm[k])


class _StreamWindow:
    """Random access to the recent past and near future of a sequential stream (tfds): position
    q -> raw example, reading ahead as needed and forgetting positions more than `keep` behind the
    newest one requested."""

    def __init__(self, raw, start: int, keep: int):
        self._raw, self._base, self._keep = raw, start, keep
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def __call__(self, q: int):
        with self._lock:
            while self._base + len(self._items) <= q:
                self._items.append(next(self._raw))
            while len(self._items) > self._keep and self._base < q - self._keep:
                self._items.popleft()
                self._base += 1
            if q < self._base:
                raise RuntimeError(f"stream position {q} was already released")
            return self._items[q - self._base]


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


def _tf_map(fn, start: int, num_workers: int | None):
    """fn(i) over flat slot indices start, start+1, ... with tf.data (parallel, in order).

    An exception raised by fn is re-raised as is from the iterator (not as a tf error)."""
    import tensorflow as tf  # lazy

    keys = ("image", "image_hw", "masks", "mask_valid", "index")
    first = fn(start)  # fixes the static shapes (and surfaces errors before tf.data starts)
    yield first
    zeros = [np.zeros_like(first[k]) for k in keys]
    errors: dict[int, BaseException] = {}

    def py(i):
        i = int(i.numpy())
        try:
            ex = fn(i)
        except Exception as e:  # noqa: BLE001 - handed to the consumer below
            errors[i] = e
            return (*zeros, i, False)
        return (*(ex[k] for k in keys), i, True)

    def load(i):
        types = [tf.uint8, tf.int32, tf.uint8, tf.bool, tf.int32, tf.int64, tf.bool]
        out = tf.py_function(py, [i], types)
        for t, z in zip(out, [*zeros, 0, True], strict=True):
            t.set_shape(np.shape(z))
        return out

    ds = tf.data.Dataset.range(start + 1, 2**62).map(
        load, num_parallel_calls=num_workers or tf.data.AUTOTUNE, deterministic=True
    )
    for *values, i, ok in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        if not ok:
            raise errors.pop(int(i))
        yield dict(zip(keys, values, strict=True))


def _stack(examples, rows_per_batch: int):
    """Groups consecutive slot examples into stacked batches of rows_per_batch."""
    buf = []
    for ex in examples:
        buf.append(ex)
        if len(buf) == rows_per_batch:
            yield {k: np.stack([e[k] for e in buf]) for k in buf[0]}
            buf = []


class TrainIterator:
    """Infinite iterator of this process's rows of the global training batches. `next_batch`:
    index of the batch next() returns (save it to resume with start_batch); `rows`: the global
    batch rows this process yields; `stats`: running skip/filter counts of this process's slots
    (includes examples loaded ahead by prefetching)."""

    def __init__(self, batches, start_batch: int, rows: tuple[int, ...], stats: dict):
        self._batches = batches
        self.next_batch = start_batch
        self.rows = rows
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self.next_batch += 1
        return batch

    def close(self) -> None:
        self._batches.close()


def process_rows(
    batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[int, ...]:
    """The contiguous block of global batch rows of one process (batch_size / process_count)."""
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the process count {process_count}"
        )
    share = batch_size // process_count
    return tuple(range(process_index * share, (process_index + 1) * share))


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
    rows: tuple[int, ...] | None = None,
    max_mask_area_fraction: float = 0.9,
    stats: dict | None = None,
    backend: str = "auto",
    num_workers: int | None = None,
    index_dir: str | None = None,
    barrier: Callable[[], None] | None = None,
) -> TrainIterator:
    """Infinite, deterministic, resumable iterator of this process's rows of the training batches.

    batch_size is the GLOBAL batch size B; the iterator yields the rows `rows` of each global batch
    (default: process `process_index`'s contiguous block of B / process_count rows). Each batch is
    a numpy dict: "image" uint8 (R,S,S,3) (longest side resized to S with PIL bilinear,
    zero-padded bottom/right), "image_hw" int32 (R,2) resized (h, w) before padding, "masks" uint8
    {0,1} (R,M,m,m) GT masks on the m x m grid of the padded S x S frame (pixel-area average from
    the original resolution, threshold 0.5; S must be a multiple of m), "mask_valid" bool (R,M)
    (False for padding slots and masks that vanish at m x m; every image has >= 1), "index" int32
    (R,) the source position of each row's image (-1 for a stream; the embedding cache's key).
    Masks over max_mask_area_fraction of the image are dropped, then up to max_masks are sampled
    uniformly.
    large_scale_jitter=(lo, hi) rescales by U(lo, hi) and crops/pads to S.

    Row s of batch k is a pure function of (spec, split, seed, k, s) (see the module doc);
    `start_batch=k` yields exactly the batches k, k+1, ... of a fresh run (resume with
    `iterator.next_batch`). backend: "threads" (a thread pool; "auto" is threads: it matched grain
    and beat tf.data per CPU-second in benchmarks/input_pipeline.py) or "tf" (tf.data parallel
    map); both give identical batches.
    index_dir/barrier: where SA-1B tar indices are cached and the cross-process sync after the
    processes built their share of them. Needs opencv (the train extra).
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
    check_process(process_index, process_count)
    if rows is None:
        rows = process_rows(batch_size, process_index, process_count)
    rows = tuple(int(r) for r in rows)
    if not rows or list(rows) != sorted(set(rows)) or rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"rows must be increasing indices in [0, {batch_size}), got {rows}")
    spec = parse_dataset_spec(spec)
    source = open_source(
        spec, split, process_index, process_count, index_dir=index_dir, barrier=barrier
    )
    stats = {} if stats is None else stats
    kwargs = dict(
        image_size=image_size,
        mask_size=mask_size,
        max_masks=max_masks,
        max_mask_area_fraction=max_mask_area_fraction,
        large_scale_jitter=large_scale_jitter,
    )
    if is_stream(source):
        max_run = 4 * batch_size + 64
        skip = int(start_batch) * batch_size  # a stream can only be advanced by reading it
        if skip:
            logger.warning(
                "resuming %s at batch %d reads and drops %d examples (a tfrecord build has no "
                "random access; `tfds build --file_format=array_record` resumes at once)",
                spec.text,
                start_batch,
                skip,
            )
        raw = source.iter_examples(shuffle_seed=seed, repeat=True, skip=skip)
        window = _StreamWindow(raw, skip, keep=2 * max_run)
        fetch = lambda q, st: tfds_example_to_record(window(q), st)  # noqa: E731
        position = lambda q: -1  # noqa: E731 - a stream has no stable index
        use_tf = False
    else:
        if len(source) == 0:
            raise ValueError(f"dataset {spec.text!r}: no images")
        order = _EpochOrder(len(source), seed)
        fetch = lambda q, st: source.load(order(q), st)  # noqa: E731
        position = order
        max_run = 2 * len(source) + 100
        use_tf = backend == "tf"

    def slot(i: int) -> dict:
        """Flat slot index i (batch i // R, row rows[i % R]) -> its training example."""
        k, r = divmod(i, len(rows))
        q0 = k * batch_size + rows[r]
        rng = np.random.default_rng([seed, q0])
        for q in range(q0, q0 + max_run):
            st = stats if q == q0 else None  # each position is counted by its own slot
            record = fetch(q, st)
            ex = None if record is None else make_training_example(record, rng, stats=st, **kwargs)
            if ex is not None:
                ex["index"] = np.int32(position(q))
                return ex
        raise RuntimeError(
            f"no usable training image in {max_run} consecutive examples of {spec.text!r} "
            "(all undecodable or without a valid mask); check the dataset"
        )

    first = int(start_batch) * len(rows)
    if use_tf:
        examples = _tf_map(slot, first, num_workers)
    else:
        examples = _ordered_map(slot, itertools.count(first), num_workers or 8)
    return TrainIterator(_stack(examples, len(rows)), int(start_batch), rows, stats)
