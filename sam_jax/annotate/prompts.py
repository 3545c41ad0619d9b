"""The annotation tool's inputs: limits, request parsing and checks, the listed images, mask
encodings and detector boxes (`sam_jax.annotate.tool` and `.serve` build on these)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import posixpath
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.annotate.auto import image_id
from sam_jax.errors import RequestError, one_line
from sam_jax.images import list_images
from sam_jax.outputs import output_stems

MAX_BODY_BYTES = 1 << 20  # a request body (prompts and names only: masks are never uploaded)
MAX_DRAIN_BYTES = 8 << 20  # what is read past MAX_BODY_BYTES (and dropped) before answering 413
MAX_POINTS = 64  # points of one prompt
MAX_NAME_CHARS = 100  # an object's name
MAX_OBJECTS = 10_000  # accepted objects of one image (annotation ids: image_id * 1e6 + k)
MAX_PROPOSALS = 1000  # prefilled proposals of one image
DEFAULT_NAME = "object"
STATE_DIR = ".state"
EMBEDDINGS_DIR = ".embeddings"
COCO_FILE = "annotations.json"
CATEGORIES_FILE = ".categories.json"  # in STATE_DIR; image stems never start with "."
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SA1B_KEYS = ("segmentation", "area", "bbox", "predicted_iou", "stability_score")
SA1B_KEYS += ("point_coords", "crop_box")
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """One image of the folder: position, file name, path, output stem and SA-1B image id."""

    index: int
    name: str
    path: str
    stem: str
    image_id: int


@dataclasses.dataclass(frozen=True)
class Detection:
    """A detector box (XYXY pixels), its score and category name."""

    box: tuple[float, float, float, float]
    score: float
    name: str


# ---------------------------------------------------------------------------------- helpers


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """The JSON value of a request body (strict: no NaN or Infinity); RequestError 400."""
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the body is not valid JSON: {one_line(e, 200)}") from None


def clean_name(value: Any, default: str | None = DEFAULT_NAME) -> str:
    """An object name from a request: a string of 1..MAX_NAME_CHARS printable characters
    (surrounding blanks dropped); `default` when missing or empty (RequestError 422 without)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(422, "name must be a string")
    name = " ".join(value.split())
    if not name:
        if default is None:
            raise RequestError(422, "name must not be empty")
        return default
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(422, f"name is longer than {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise RequestError(422, "name holds control characters")
    return name


def parse_prompts(body: dict, width: int, height: int):
    """(points [(x, y, label)], box (x0, y0, x1, y1) or None) of a request body, checked: at most
    MAX_POINTS points of finite pixel coordinates inside the image and labels 1 (positive) or 0
    (negative), a box XYXY inside the image with x0 <= x1 and y0 <= y1, and at least one of them.
    RequestError 422 otherwise."""
    points = body.get("points")
    points = [] if points is None else points
    if not isinstance(points, list):
        raise RequestError(422, "points must be a list of [x, y, label]")
    if len(points) > MAX_POINTS:
        raise RequestError(422, f"at most {MAX_POINTS} points per prompt, got {len(points)}")
    out = []
    for i, p in enumerate(points):
        if not (isinstance(p, list) and len(p) == 3 and all(_finite_number(v) for v in p)):
            raise RequestError(422, f"points[{i}] must be [x, y, label] with finite numbers")
        x, y, label = p
        if label not in (0, 1):
            raise RequestError(422, f"points[{i}] label must be 1 (positive) or 0 (negative)")
        if not (0 <= x <= width and 0 <= y <= height):
            raise RequestError(422, f"points[{i}] ({x}, {y}) is outside the {width}x{height} image")
        out.append((float(x), float(y), int(label)))
    box = body.get("box")
    if box is not None:
        if not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box)):
            raise RequestError(422, "box must be [x0, y0, x1, y1] with finite numbers")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 <= x1 and y0 <= y1):
            raise RequestError(422, "box must have x0 <= x1 and y0 <= y1")
        if not (0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height):
            raise RequestError(422, f"box {box} is outside the {width}x{height} image")
        box = (x0, y0, x1, y1)
    if not out and box is None:
        raise RequestError(422, "give at least one point or a box")
    return out, box


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE ({size, counts: str}) of a bool (H, W) mask."""
    from sam_jax.amg.masks import coco_encode_rle, mask_to_rle

    return coco_encode_rle(mask_to_rle(np.asarray(mask, bool)[None])[0])


def mask_bbox(mask: np.ndarray) -> list[int]:
    """XYWH box of a bool mask as the automatic generator writes it (inclusive max, so a
    one-pixel mask has w = h = 0); [0, 0, 0, 0] when empty."""
    from sam_jax.amg.masks import batched_mask_to_box, box_xyxy_to_xywh

    return box_xyxy_to_xywh(batched_mask_to_box(np.asarray(mask, bool)[None])[0]).tolist()


def encoder_fingerprint(model, params) -> str:
    """A key that changes when the image embedding would: the model input size, and the shapes
    and leading values of the image encoder's weights."""
    import jax

    digest = hashlib.sha256(repr(model.config.image_size).encode())
    encoder = params.get("image_encoder", params) if hasattr(params, "get") else params
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(encoder)[0]:
        digest.update(jax.tree_util.keystr(keypath).encode())
        digest.update(repr(tuple(leaf.shape)).encode())
        digest.update(np.asarray(leaf.reshape(-1)[:64], np.float32).tobytes())
    return digest.hexdigest()[:32]


def mask_from_rle(rle: dict, hw: tuple[int, int]) -> np.ndarray:
    from sam_jax.data.rle import rle_to_mask

    mask = rle_to_mask(rle)
    if mask.shape != tuple(hw):
        raise ValueError(f"mask of size {list(mask.shape)}, image {list(hw)}")
    return mask


def list_entries(images_dir: str) -> list[ImageEntry]:
    """The images of the folder (`images.list_images`) with the output stems and SA-1B ids the
    automatic stage gives them."""
    files = list_images(images_dir)
    stems = output_stems(files)
    return [
        ImageEntry(i, paths.basename(p), p, s, image_id(s, i))
        for i, (p, s) in enumerate(zip(files, stems, strict=True))
    ]


# ---------------------------------------------------------------------------------- detections


def load_detections(
    path: str,
    entries: list[ImageEntry],
    score_threshold: float = 0.5,
    max_per_image: int = 100,
) -> tuple[dict[str, list[Detection]], int]:
    """Detector boxes per image name from a COCO results JSON, and how many were left out.

    The file is a list of results {image_id, bbox: [x, y, w, h], score, category_id} (what COCO
    detectors write), or an object with that list as "annotations" and optionally "images"
    ([{id, file_name}], to match images by file name) and "categories" ([{id, name}], to name
    them). A result may also name its image by "file_name". Images without a file name are
    matched by SA-1B image id (`auto.image_id`: N for sa_N, else position + 1). Results under
    `score_threshold`, of other images or beyond the `max_per_image` best of an image are left
    out. Raises ValueError (one line naming the file and the entry) for a malformed file.
    """
    try:
        data = json.loads(paths.read_bytes(path))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"--detections {path} is not valid JSON: {one_line(e, 200)}") from None
    files, categories = {}, {}
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise ValueError(f"--detections {path}: an object needs an 'annotations' list")
        for im in data.get("images") or []:
            if isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str):
                files[im["id"]] = posixpath.basename(im["file_name"])
        for c in data.get("categories") or []:
            if isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str):
                categories[c["id"]] = c["name"]
        results = data["annotations"]
    elif isinstance(data, list):
        results = data
    else:
        raise ValueError(f"--detections {path} must hold a list of COCO results")
    by_name = {e.name: e for e in entries}
    by_id = {e.image_id: e for e in entries}
    found: dict[str, list[Detection]] = collections.defaultdict(list)
    left_out = 0
    for i, r in enumerate(results):
        where = f"--detections {path} entry {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} is not an object")
        bbox, score = r.get("bbox"), r.get("score", 1.0)
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_finite_number, bbox))):
            raise ValueError(f"{where}: bbox must be [x, y, width, height] numbers")
        if not _finite_number(score):
            raise ValueError(f"{where}: score must be a number")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: bbox has a negative width or height")
        name = r.get("file_name") or files.get(r.get("image_id"))
        entry = by_name.get(posixpath.basename(name)) if isinstance(name, str) else None
        if entry is None and name is None:
            entry = by_id.get(r.get("image_id"))
        if entry is None or score < score_threshold:
            left_out += 1
            continue
        cid = r.get("category_id")
        label = categories.get(cid) or (DEFAULT_NAME if cid is None else f"category {cid}")
        x, y, w, h = (float(v) for v in bbox)
        found[entry.name].append(Detection((x, y, x + w, y + h), float(score), label[:80]))
    out = {}
    for name, dets in found.items():
        dets.sort(key=lambda d: -d.score)
        left_out += max(0, len(dets) - max_per_image)
        out[name] = dets[:max_per_image]
    return out, left_out
