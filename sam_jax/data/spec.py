"""Dataset spec strings, shared by training configs and eval.py.

    synthetic[:SPLIT]                 the built-in synthetic dataset (splits train / val / test)
    nuclei[:SPLIT]                    nuclei of scikit-image's IHC slide (train / test tiles)
    sa1b:PATH                         a folder (or one .tar) of SA-1B tars or jpg+json pairs
    coco:ANN_JSON:IMAGES_DIR          COCO instance annotations and their images folder
    lvis:ANN_JSON:IMAGES_DIR          LVIS v1 annotations (COCO-like, with category frequencies and
                                      federated image labels) and the COCO 2017 images folder
    bsds:ROOT[:SPLIT]                 BSDS500 (images/SPLIT/*.jpg, groundTruth/SPLIT/*.mat): human
                                      boundary maps, for edge detection only
    tfds:NAME[:SPLIT]                 a prepared tensorflow-datasets dataset (e.g. segment_anything)

Paths may be local or anything tf.io.gfile reads (gs://...). Options follow a `?`, joined by `&`:
synthetic: image_size (N or HxW), num_images (size of the named split), seed, min_objects,
max_objects, part_prob, texture_strength, min_area, max_area, min_visible (see SyntheticConfig);
coco: include_crowd (0/1); tfds: data_dir.
Example: `synthetic:val?image_size=64&num_images=16`.
"""

from __future__ import annotations

import dataclasses
import re

from sam_jax import paths
from sam_jax.data.bsds import SPLITS as BSDS_SPLITS
from sam_jax.data.coco import load_coco_index
from sam_jax.data.nuclei import SPLITS as NUCLEI_SPLITS
from sam_jax.data.synthetic import SPLITS

KINDS = ("synthetic", "nuclei", "sa1b", "coco", "lvis", "bsds", "tfds")
# synthetic options that are fractions in [0, 1] (SyntheticConfig checks their ranges)
FRACTION_OPTIONS = ("part_prob", "texture_strength", "min_area", "max_area", "min_visible")
_OPTIONS = {
    "synthetic": (
        "image_size",
        "num_images",
        "seed",
        "min_objects",
        "max_objects",
        "part_prob",
        "texture_strength",
        "min_area",
        "max_area",
        "min_visible",
    ),
    "nuclei": (),
    "sa1b": (),
    "coco": ("include_crowd",),
    "lvis": (),
    "bsds": (),
    "tfds": ("data_dir",),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec. `path`: sa1b folder/tar, coco/lvis annotation file or bsds root;
    `images_dir`: coco/lvis images; `name`: tfds dataset name; `split`: synthetic/nuclei/bsds/tfds
    split (None: the caller's split)."""

    kind: str
    path: str | None = None
    images_dir: str | None = None
    name: str | None = None
    split: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    text: str = ""

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


def split_paths(rest: str) -> list[str]:
    """Splits 'a:b' on ':' except where a ':' starts a URL scheme separator ('gs://')."""
    return re.split(r":(?!//)", rest)


def _parse_options(kind: str, query: str, spec: str) -> tuple[tuple[str, str], ...]:
    options = []
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"dataset spec {spec!r}: option {item!r} is not key=value")
        if key not in _OPTIONS[kind]:
            allowed = ", ".join(_OPTIONS[kind]) or "none"
            raise ValueError(
                f"dataset spec {spec!r}: unknown {kind} option {key!r} (allowed: {allowed})"
            )
        options.append((key, value))
    return tuple(options)


def _check_int_options(spec: DatasetSpec, keys) -> None:
    for key in keys:
        value = spec.option(key)
        if value is not None and not re.fullmatch(r"\d+", value):
            raise ValueError(
                f"dataset spec {spec.text!r}: option {key} must be a non-negative "
                f"integer, got {value!r}"
            )


def parse_dataset_spec(spec: str | DatasetSpec, check_paths: bool = True) -> DatasetSpec:
    """Parses and checks a dataset spec string; raises a one-line ValueError if malformed.

    Checks the kind, the number of fields and the options; with check_paths, also that paths
    exist (FileNotFoundError otherwise) and, for coco, that the annotation file is a COCO
    instances file (it is loaded once and cached for the readers).
    """
    if isinstance(spec, DatasetSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"dataset spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    body, _, query = text.partition("?")
    kind, _, rest = body.partition(":")
    if kind not in KINDS:
        raise ValueError(
            f"dataset spec {text!r}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})"
        )
    options = _parse_options(kind, query, text)
    if kind == "synthetic":
        if rest and rest not in SPLITS:
            raise ValueError(f"dataset spec {text!r}: synthetic split must be one of {SPLITS}")
        out = DatasetSpec(kind, split=rest or None, options=options, text=text)
        _check_int_options(out, ("num_images", "seed", "min_objects", "max_objects"))
        for key in FRACTION_OPTIONS:
            value = out.option(key)
            if value is not None and not re.fullmatch(r"\d*\.?\d+", value):
                raise ValueError(f"dataset spec {text!r}: option {key} must be a number in [0, 1]")
        size = out.option("image_size")
        if size is not None and not re.fullmatch(r"\d+(x\d+)?", size):
            raise ValueError(f"dataset spec {text!r}: image_size must be N or HxW, got {size!r}")
        return out
    if kind == "nuclei":
        if rest and rest not in NUCLEI_SPLITS:
            raise ValueError(f"dataset spec {text!r}: nuclei split must be one of {NUCLEI_SPLITS}")
        return DatasetSpec(kind, split=rest or None, options=options, text=text)
    if kind == "sa1b":
        if not rest:
            raise ValueError(f"dataset spec {text!r}: expected sa1b:PATH")
        if check_paths and not paths.exists(rest):
            raise FileNotFoundError(f"dataset spec {text!r}: path {rest!r} does not exist")
        return DatasetSpec(kind, path=rest, options=options, text=text)
    if kind == "bsds":
        parts = split_paths(rest) if rest else []
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"dataset spec {text!r}: expected bsds:ROOT[:SPLIT]")
        if len(parts) == 2 and parts[1] not in BSDS_SPLITS:
            raise ValueError(f"dataset spec {text!r}: bsds split must be one of {BSDS_SPLITS}")
        if check_paths and not paths.isdir(parts[0]):
            raise FileNotFoundError(f"dataset spec {text!r}: folder {parts[0]!r} does not exist")
        split = parts[1] if len(parts) == 2 else None
        return DatasetSpec(kind, path=parts[0], split=split, options=options, text=text)
    if kind in ("coco", "lvis"):
        parts = split_paths(rest)
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"dataset spec {text!r}: expected {kind}:ANN_JSON:IMAGES_DIR")
        ann, images = parts
        out = DatasetSpec(kind, path=ann, images_dir=images, options=options, text=text)
        if out.option("include_crowd", "0") not in ("0", "1"):
            raise ValueError(f"dataset spec {text!r}: include_crowd must be 0 or 1")
        if not check_paths:
            return out
        if not paths.exists(ann):
            raise FileNotFoundError(
                f"dataset spec {text!r}: annotation file {ann!r} does not exist"
            )
        if not paths.isdir(images):
            raise FileNotFoundError(
                f"dataset spec {text!r}: images folder {images!r} does not exist"
            )

        load_coco_index(ann)  # raises ValueError if not a COCO instances file
        return out
    # tfds
    parts = rest.split(":", 1) if rest else []  # a split may hold ":" (train[:10])
    if not 1 <= len(parts) <= 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise ValueError(f"dataset spec {text!r}: expected tfds:NAME[:SPLIT]")
    return DatasetSpec(
        kind, name=parts[0], split=parts[1] if len(parts) == 2 else None, options=options, text=text
    )
