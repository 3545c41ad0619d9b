"""Training batches: frame resize/pad, mask filtering/sampling, determinism, resume, shards."""

import hashlib

import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide

from sam_jax.data import make_train_iterator, make_training_example
from sam_jax.data.pipeline import frame_geometry
from sam_jax.data.records import DenseMasks, Record
from tests.fixtures_data import synthetic_examples, write_coco_dataset, write_sa1b_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SYN = "synthetic:train?image_size=40x56&num_images=10"
KW = dict(image_size=32, mask_size=8, max_masks=4)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _record(image, masks):
    return Record("r", image, DenseMasks(np.asarray(masks)))


@pytest.mark.parametrize("hw", [(40, 56), (57, 23), (100, 100), (7, 300), (1500, 2250)])
@pytest.mark.parametrize("size", [32, 64, 1024])
def test_frame_geometry_is_official_resize_longest_side(hw, size):
    (newh, neww), offset = frame_geometry(*hw, size)
    assert (newh, neww) == ResizeLongestSide(size).get_preprocess_shape(*hw, size)
    assert offset == (0, 0)


def test_image_resize_and_pad_match_official():
    image = synthetic_examples(1, image_size=(45, 70))[0]["image"]
    ex = make_training_example(
        _record(image, [np.ones((45, 70), bool)]),
        np.random.default_rng(0),
        image_size=64,
        mask_size=64,
        max_masks=2,
        max_mask_area_fraction=1.0,
    )
    expected = ResizeLongestSide(64).apply_image(image)  # PIL bilinear on uint8
    h, w = expected.shape[:2]
    assert tuple(ex["image_hw"]) == (h, w) == (41, 64)
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
    assert np.array_equal(ex["image"][:h, :w], expected)
    assert not ex["image"][h:].any() and not ex["image"][:, w:].any()
    # a full-image mask covers exactly the resized region of the padded frame
    assert ex["mask_valid"].tolist() == [True, False]
    assert ex["masks"][0][:h, :w].all() and ex["masks"][0].sum() == h * w
    assert not ex["masks"][1].any()


def test_masks_are_downsampled_in_the_padded_frame():
    h, w = 60, 90
    mask = np.zeros((h, w), bool)
    mask[15:45, 30:84] = True  # in a 128 frame (scale 128/90): rows 21.3..64, cols 42.7..119.5
    ex = make_training_example(
        _record(np.zeros((h, w, 3), np.uint8), [mask]),
        np.random.default_rng(0),
        image_size=128,
        mask_size=32,
        max_masks=1,
    )
    expected = np.zeros((32, 32), bool)
    expected[5:16, 11:30] = True  # the same box at 1/4 of the frame, edges rounded
    got = ex["masks"][0].astype(bool)
    assert ex["masks"].dtype == np.uint8 and set(np.unique(ex["masks"])) <= {0, 1}
    assert (got & expected).sum() / (got | expected).sum() > 0.9


def test_rle_and_dense_masks_give_the_same_example():
    from sam_jax.data.records import RleMasks
    from sam_jax.data.rle import check_rle
    from tests.fixtures_data import encode_rle

    ex = synthetic_examples(1, image_size=(45, 70))[0]
    runs, areas = zip(*(check_rle(encode_rle(m)) for m in ex["masks"]), strict=True)
    rle_record = Record("r", ex["image"], RleMasks(list(runs), areas, (45, 70)))
    for jitter in (None, (0.5, 2.0)):
        kw = dict(image_size=64, mask_size=16, max_masks=3, large_scale_jitter=jitter)
        a = make_training_example(rle_record, np.random.default_rng(3), **kw)
        b = make_training_example(_record(ex["image"], ex["masks"]), np.random.default_rng(3), **kw)
        assert _same(a, b)


def test_masks_over_90_percent_are_dropped_and_images_without_masks_counted():
    image = np.zeros((20, 20, 3), np.uint8)
    big = np.ones((20, 20), bool)
    big[0, :4] = False  # 99% of the image
    small = np.zeros((20, 20), bool)
    small[5:10, 5:10] = True
    stats = {}
    for seed in range(20):
        ex = make_training_example(
            _record(image, [big, small]),
            np.random.default_rng(seed),
            image_size=20,
            mask_size=20,
            max_masks=2,
            stats=stats,
        )
        assert ex["mask_valid"].tolist() == [True, False]
        assert np.array_equal(ex["masks"][0].astype(bool), small)
    assert stats["large_masks"] == 20
    assert (
        make_training_example(
            _record(image, [big]),
            np.random.default_rng(0),
            image_size=20,
            mask_size=20,
            max_masks=2,
            stats=stats,
        )
        is None
    )
    assert stats["images_without_masks"] == 1
    kept = make_training_example(
        _record(image, [big]),
        np.random.default_rng(0),
        image_size=20,
        mask_size=20,
        max_masks=2,
        max_mask_area_fraction=1.0,
    )
    assert kept["mask_valid"].tolist() == [True, False]


def test_masks_are_sampled_uniformly_up_to_max_masks():
    image = np.zeros((16, 16, 3), np.uint8)
    masks = np.zeros((6, 16, 16), bool)
    for i in range(6):
        masks[i, i * 2 : i * 2 + 2] = True
    seen = np.zeros(6)
    for seed in range(300):
        ex = make_training_example(
            _record(image, masks),
            np.random.default_rng(seed),
            image_size=16,
            mask_size=16,
            max_masks=3,
        )
        assert ex["mask_valid"].all()
        rows = [int(np.flatnonzero(m.any(1))[0]) // 2 for m in ex["masks"]]
        assert len(set(rows)) == 3
        seen[rows] += 1
    assert np.all(np.abs(seen / 300 - 0.5) < 0.1)


def test_large_scale_jitter_crops_and_pads():
    image = synthetic_examples(1, image_size=(48, 64))[0]["image"]
    mask = np.ones((48, 64), bool)
    sizes = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        ex = make_training_example(
            _record(image, [mask]),
            rng,
            image_size=32,
            mask_size=32,
            max_masks=1,
            large_scale_jitter=(0.5, 2.0),
            max_mask_area_fraction=1.0,
        )
        h, w = ex["image_hw"]
        sizes.add((int(h), int(w)))
        assert 1 <= h <= 32 and 1 <= w <= 32
        assert not ex["image"][h:].any() and not ex["image"][:, w:].any()
        assert ex["masks"][0].sum() == h * w
    assert (32, 32) in sizes and any(h < 24 for h, _ in sizes)


def test_batch_format_and_determinism():
    it = make_train_iterator(SYN, batch_size=3, **KW)
    batches = _take(it, 4)
    b = batches[0]
    assert b["image"].shape == (3, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["image_hw"].shape == (3, 2) and b["image_hw"].dtype == np.int32
    assert tuple(b["image_hw"][0]) == (23, 32)  # 40x56 -> 22.86 + 0.5 -> 23
    assert b["masks"].shape == (3, 4, 8, 8) and b["masks"].dtype == np.uint8
    assert b["mask_valid"].shape == (3, 4) and b["mask_valid"].dtype == bool
    assert all(b["mask_valid"].any(1).all() for b in batches)  # >= 1 valid mask per image
    again = _take(make_train_iterator(SYN, batch_size=3, **KW), 4)
    assert all(_same(x, y) for x, y in zip(batches, again, strict=True))
    other = _take(make_train_iterator(SYN, batch_size=3, seed=1, **KW), 4)
    assert not all(_same(x, y) for x, y in zip(batches, other, strict=True))
    assert it.next_batch == 4


def _digests(batches):
    return [hashlib.sha1(img.tobytes()).hexdigest() for b in batches for img in b["image"]]


def test_epochs_are_permutations_and_repeat_forever():
    batches = _take(make_train_iterator(SYN, batch_size=5, **KW), 6)  # 3 epochs of 10 images
    d = _digests(batches)
    assert len(set(d[:10])) == 10 and set(d[:10]) == set(d[10:20]) == set(d[20:30])
    assert d[:10] != d[10:20]


@pytest.mark.parametrize("jitter", [None, (0.3, 2.0)])
def test_start_batch_resumes_exactly(jitter):
    full = _take(make_train_iterator(SYN, batch_size=3, large_scale_jitter=jitter, **KW), 8)
    resumed = make_train_iterator(SYN, batch_size=3, large_scale_jitter=jitter, start_batch=5, **KW)
    assert resumed.next_batch == 5
    assert all(_same(a, b) for a, b in zip(full[5:], _take(resumed, 3), strict=True))


def test_broken_entries_skipped_counted_and_resume_exact_with_tf_data(tmp_path):
    """COCO fixture with undecodable/missing images and an image without masks; tf.data path."""
    fx = write_coco_dataset(tmp_path / "coco")
    stats = {}
    it = make_train_iterator(fx.spec, batch_size=2, stats=stats, backend="tf", **KW)
    full = _take(it, 9)  # 18 slots over 7 images, 3 of them unusable
    assert it.stats is stats
    assert stats["skipped_images"] >= 2 * 2 and stats["images_without_masks"] >= 2
    usable = {hashlib.sha1(make_train_iterator_image(fx, k)).hexdigest() for k in fx.masks}
    assert set(_digests(full)) == usable
    resumed = make_train_iterator(fx.spec, batch_size=2, start_batch=6, backend="tf", **KW)
    assert all(_same(a, b) for a, b in zip(full[6:], _take(resumed, 3), strict=True))
    threads = make_train_iterator(fx.spec, batch_size=2, backend="threads", **KW)
    assert all(_same(a, b) for a, b in zip(full, _take(threads, 9), strict=True))


def make_train_iterator_image(fx, image_id):
    """The uint8 32x32 frame bytes of a fixture image (resized from the decoded JPEG)."""
    from sam_jax.data.sources import open_source

    src = open_source(fx.spec)
    i = [str(im.image_id) for im in src.images].index(image_id)
    ex = make_training_example(src.load(i), np.random.default_rng(0), **KW)
    return ex["image"].tobytes()


def test_batch_size_one_survives_unusable_images(tmp_path):
    fx = write_sa1b_dataset(tmp_path / "sa1b", layout="pairs")
    batches = _take(make_train_iterator(fx.spec, batch_size=1, backend="threads", **KW), 12)
    assert len(set(_digests(batches))) == len(fx.masks)


@pytest.mark.parametrize("backend", ["threads", "tf"])
def test_global_batch_does_not_depend_on_the_process_count(tmp_path, backend):
    """Each process yields its rows; together they are the 1-process batch, also on resume and
    with unusable images (the COCO fixture has 3 of 7)."""
    fx = write_coco_dataset(tmp_path / "coco")
    one = _take(make_train_iterator(fx.spec, batch_size=4, backend=backend, **KW), 5)
    for count in (2, 4):
        parts = [
            make_train_iterator(
                fx.spec, batch_size=4, process_index=i, process_count=count, backend=backend, **KW
            )
            for i in range(count)
        ]
        assert [p.rows for p in parts] == [
            tuple(range(i * 4 // count, (i + 1) * 4 // count)) for i in range(count)
        ]
        got = [[next(p) for p in parts] for _ in range(5)]
        for full, shares in zip(one, got, strict=True):
            assert _same(full, {k: np.concatenate([s[k] for s in shares]) for k in full})
    odd = make_train_iterator(fx.spec, batch_size=4, rows=(1, 3), start_batch=3, **KW)
    assert _same(next(odd), {k: v[[1, 3]] for k, v in one[3].items()})


def test_dataset_without_usable_images_raises(tmp_path):
    from tests.fixtures_data import write_coco_dataset as write

    fx = write(tmp_path / "c", examples=synthetic_examples(3))
    # keep only the broken images: images 2 and 3 (undecodable / missing) and the empty one
    import json

    data = json.loads(open(fx.path).read())
    data["images"] = [im for im in data["images"] if im["id"] in (2, 3, 4)]
    open(fx.path, "w").write(json.dumps(data))
    it = make_train_iterator(fx.spec, batch_size=1, backend="threads", **KW)
    with pytest.raises(RuntimeError, match="no usable training image"):
        next(it)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2, max_masks=0), "max_masks"),
        (dict(batch_size=2, start_batch=-1), "start_batch"),
        (dict(batch_size=2, large_scale_jitter=(2.0, 1.0)), "large_scale_jitter"),
        (dict(batch_size=2, max_mask_area_fraction=0.0), "max_mask_area_fraction"),
        (dict(batch_size=2, backend="torch"), "backend"),
        (dict(batch_size=2, mask_size=12), "multiple of mask_size"),
        (dict(batch_size=2, seed=-1), "seed"),
        (dict(batch_size=2, process_index=1, process_count=1), "process_index"),
        (dict(batch_size=3, process_count=2), "not divisible by the process count"),
        (dict(batch_size=2, rows=(1, 0)), "rows must be increasing"),
        (dict(batch_size=2, rows=(2,)), "rows must be increasing"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_train_iterator(SYN, **{**dict(image_size=32, mask_size=8), **kwargs})
