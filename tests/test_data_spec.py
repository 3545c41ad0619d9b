"""Dataset spec strings: parsing, options and one-line ValueErrors for malformed specs."""

import json

import pytest

from sam_jax.data import iterate_examples, make_train_iterator, parse_dataset_spec
from sam_jax.data.spec import split_paths
from tests.fixtures_data import write_coco_dataset, write_sa1b_dataset


def test_good_specs(tmp_path):
    s = parse_dataset_spec("synthetic")
    assert (s.kind, s.split) == ("synthetic", None)
    s = parse_dataset_spec("synthetic:val?image_size=32x48&num_images=5&seed=3")
    assert s.split == "val" and s.option("image_size") == "32x48" and s.option("seed") == "3"
    assert parse_dataset_spec(s) is s
    sa1b = write_sa1b_dataset(tmp_path / "sa1b", broken=False)
    assert parse_dataset_spec(sa1b.spec).path == str(tmp_path / "sa1b")
    coco = write_coco_dataset(tmp_path / "coco", broken=False)
    s = parse_dataset_spec(coco.spec + "?include_crowd=1")
    assert (s.path, s.images_dir) == (coco.path, str(tmp_path / "coco" / "images"))
    s = parse_dataset_spec("tfds:segment_anything:train[:10]?data_dir=gs://b/tfds")
    assert (s.name, s.split, s.option("data_dir")) == (
        "segment_anything",
        "train[:10]",
        "gs://b/tfds",
    )


def test_url_paths_keep_their_scheme():
    assert split_paths("gs://b/ann.json:gs://b/images") == ["gs://b/ann.json", "gs://b/images"]
    assert split_paths("/a/ann.json:/a/images") == ["/a/ann.json", "/a/images"]


def _not_coco(tmp_path):
    path = tmp_path / "sa_1.json"
    path.write_text(json.dumps({"image": {"image_id": 1}, "annotations": []}))
    (tmp_path / "images").mkdir(exist_ok=True)
    return f"coco:{path}:{tmp_path / 'images'}"


def _not_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("{not json")
    (tmp_path / "images").mkdir(exist_ok=True)
    return f"coco:{path}:{tmp_path / 'images'}"


def _captions(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "caption": "a"}]}))
    (tmp_path / "images").mkdir(exist_ok=True)
    return f"coco:{path}:{tmp_path / 'images'}"


@pytest.mark.parametrize(
    "make_spec, match",
    [
        (lambda p: "", "non-empty"),
        (lambda p: "imagenet:/data", "unknown kind 'imagenet'"),
        (lambda p: "synthetic:validation", "synthetic split must be one of"),
        (lambda p: "synthetic?size=3", "unknown synthetic option 'size'"),
        (lambda p: "synthetic?image_size=big", "image_size must be N or HxW"),
        (lambda p: "synthetic?seed=-1", "seed must be a non-negative integer"),
        (lambda p: "synthetic?seed", "is not key=value"),
        (lambda p: "sa1b", "expected sa1b:PATH"),
        (lambda p: f"sa1b:{p / 'nowhere'}", "does not exist"),
        (lambda p: "coco:ann.json", "expected coco:ANN_JSON:IMAGES_DIR"),
        (lambda p: f"coco:{p / 'missing.json'}:{p}", "annotation file .* does not exist"),
        (lambda p: _not_coco(p).replace("images", "noimages"), "images folder .* does not exist"),
        (_not_coco, "not a COCO instances file"),
        (_not_json, "is not valid JSON"),
        (_captions, "lacks 'image_id' or 'segmentation'"),
        (lambda p: "tfds:", "expected tfds:NAME"),
        (lambda p: "tfds:segment_anything?dir=x", "unknown tfds option 'dir'"),
    ],
)
def test_bad_specs_raise_one_line_value_errors(tmp_path, make_spec, match):
    spec = make_spec(tmp_path)
    for fn in (
        parse_dataset_spec,
        lambda s: iterate_examples(s),
        lambda s: make_train_iterator(s, batch_size=1),
    ):
        # malformed: ValueError; a path that does not exist: FileNotFoundError (exit 1, not 2)
        error = FileNotFoundError if "does not exist" in match else ValueError
        with pytest.raises(error, match=match) as info:
            fn(spec)
        assert "\n" not in str(info.value)


def test_empty_sa1b_folder_raises_at_open(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files or jpg\\+json pairs"):
        iterate_examples(f"sa1b:{tmp_path / 'empty'}")


def test_bad_synthetic_values_raise():
    with pytest.raises(ValueError, match="image_size"):
        iterate_examples("synthetic?image_size=2")
    with pytest.raises(ValueError, match="max_images"):
        iterate_examples("synthetic", max_images=-1)
