"""The tfds `segment_anything` reader, on a tiny dataset prepared by a fake builder."""

import io

import numpy as np
import pytest

from sam_jax.data import iterate_examples, make_train_iterator
from sam_jax.data.tfds_source import tfds_example_to_record
from tests.fixtures_data import bad_rle, encode_image, encode_rle, synthetic_examples

_FAKE = {}


def _annotation(k, seg):
    return {
        "area": 1,
        "bbox": np.zeros(4, np.float32),
        "crop_box": np.zeros(4, np.float32),
        "id": k,
        "point_coords": np.zeros((1, 2)),
        "predicted_iou": 0.9,
        "segmentation": seg,
        "stability_score": 0.9,
    }


def _fake_builder_class():
    """A subclass of the official segment_anything builder that writes 5 synthetic examples
    (registered once per process as `fake_segment_anything`)."""
    if "cls" in _FAKE:
        return _FAKE["cls"]
    from etils import epath
    from tensorflow_datasets.datasets.segment_anything import segment_anything_dataset_builder

    official = segment_anything_dataset_builder.Builder

    class FakeSegmentAnything(official):
        pkg_dir_path = epath.Path(segment_anything_dataset_builder.__file__).parent

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(None)}

        def _generate_examples(self, paths):
            for n, ex in enumerate(synthetic_examples(5), start=1):
                h, w = ex["image"].shape[:2]
                anns = [
                    _annotation(
                        k, {"counts": encode_rle(m)["counts"], "size": np.array([h, w], np.uint64)}
                    )
                    for k, m in enumerate(ex["masks"])
                ]
                yield (
                    n,
                    {
                        "image": {
                            "content": io.BytesIO(encode_image(ex["image"], "PNG")),
                            "file_name": f"sa_{n}.jpg",
                            "height": h,
                            "width": w,
                            "image_id": n,
                        },
                        "annotations": anns,
                    },
                )

    _FAKE["cls"] = FakeSegmentAnything
    return FakeSegmentAnything


def _prepare(tmp_path_factory, file_format: str):
    import tensorflow_datasets as tfds

    _fake_builder_class()
    data_dir = tmp_path_factory.mktemp(f"tfds_{file_format}")
    builder = tfds.builder("fake_segment_anything", data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(download_dir=str(data_dir / "downloads"))
    return data_dir


@pytest.fixture(scope="module", params=["tfrecord", "array_record"])
def tfds_dir(request, tmp_path_factory):
    """The fake dataset built as a stream (tfrecord) and with random access (array_record)."""
    return _prepare(tmp_path_factory, request.param)


def test_array_record_build_is_random_access_and_resumes_without_reading_the_past(
    tmp_path_factory, monkeypatch
):
    from sam_jax.data.sources import is_stream, open_source
    from sam_jax.data.spec import parse_dataset_spec
    from sam_jax.data.tfds_source import TfdsIndexedSource

    spec = f"tfds:fake_segment_anything?data_dir={_prepare(tmp_path_factory, 'array_record')}"
    source = open_source(parse_dataset_spec(spec), "train")
    assert isinstance(source, TfdsIndexedSource) and not is_stream(source) and len(source) == 5
    reads = []
    real_load = TfdsIndexedSource.load
    monkeypatch.setattr(
        TfdsIndexedSource,
        "load",
        lambda self, i, st=None: reads.append(i) or real_load(self, i, st),
    )
    kw = dict(batch_size=2, image_size=32, mask_size=8, max_masks=3, backend="threads")
    far = next(make_train_iterator(spec, start_batch=100_000, num_workers=1, **kw))
    assert 2 <= len(reads) <= 4  # the two slots of one batch (and fallbacks), not 200,000 reads
    again = next(make_train_iterator(spec, start_batch=100_000, num_workers=1, **kw))
    assert all(np.array_equal(far[k], again[k]) for k in far)


def test_a_tfrecord_build_is_read_as_a_stream(tmp_path_factory):
    from sam_jax.data.sources import is_stream, open_source
    from sam_jax.data.spec import parse_dataset_spec
    from sam_jax.data.tfds_source import TfdsSource

    spec = f"tfds:fake_segment_anything?data_dir={_prepare(tmp_path_factory, 'tfrecord')}"
    source = open_source(parse_dataset_spec(spec), "train")
    assert isinstance(source, TfdsSource) and is_stream(source)


def test_conversion_from_a_tfds_style_example():
    ex = synthetic_examples(1)[0]
    h, w = ex["image"].shape[:2]
    counts = [encode_rle(m)["counts"].encode() for m in ex["masks"]] + [
        bad_rle((h, w))["counts"].encode()
    ]
    example = {
        "image": {
            "content": encode_image(ex["image"], "PNG"),
            "file_name": b"sa_9.jpg",
            "image_id": 9,
            "height": h,
            "width": w,
        },
        "annotations": {
            "segmentation": {
                "counts": np.array(counts, object),
                "size": np.array([[h, w]] * len(counts)),
            }
        },
    }
    stats = {}
    record = tfds_example_to_record(example, stats)
    assert record.image_id == "sa_9" and np.array_equal(record.image, ex["image"])
    assert np.array_equal(record.masks.decode(), ex["masks"])
    assert stats["skipped_masks"] == 1
    example["image"]["content"] = b"not an image"
    assert tfds_example_to_record(example, stats) is None and stats["skipped_images"] == 1
    example["image"]["content"] = ex["image"]  # already-decoded content works too
    assert np.array_equal(tfds_example_to_record(example).masks.decode(), ex["masks"])


def test_tfds_reader_iterator_and_shards(tfds_dir):
    spec = f"tfds:fake_segment_anything?data_dir={tfds_dir}"
    expected = {f"sa_{n}": ex for n, ex in enumerate(synthetic_examples(5), start=1)}
    exs = list(iterate_examples(spec, split="train"))
    assert sorted(e["image_id"] for e in exs) == sorted(expected)
    for e in exs:
        assert np.array_equal(e["image"], expected[e["image_id"]]["image"])
        assert np.array_equal(e["masks"], expected[e["image_id"]]["masks"])
    shares = [
        {
            e["image_id"]
            for e in iterate_examples(spec + "", split="train", process_index=i, process_count=2)
        }
        for i in range(2)
    ]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(expected)
    kw = dict(batch_size=2, image_size=32, mask_size=8, max_masks=3)
    full = [next(it) for it in [make_train_iterator(spec, **kw)] for _ in range(6)]
    resumed = make_train_iterator(spec, start_batch=4, **kw)
    for a in full[4:]:
        b = next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_unprepared_or_unknown_tfds_dataset_raises(tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        iterate_examples(f"tfds:segment_anything?data_dir={tmp_path}")
    with pytest.raises(ValueError, match="cannot load the builder"):
        iterate_examples(f"tfds:no_such_dataset_xyz?data_dir={tmp_path}")
