"""The data engine's assisted-manual and semi-automatic stages: a local web annotation tool
(`sam-jax-annotate serve`).

A person picks an image, left-clicks positive points, right-clicks negative points or drags a
box, and sees the mask after each click. The image encoder runs once per image (the embedding is
cached on disk, OUTPUT/.embeddings/<stem>.npy, keyed by the image file and the encoder weights);
a click runs only the prompt encoder and the mask decoder on it. Accepted objects are named,
renamed and deleted; the work is saved as it happens, each file written whole (temporary name,
then rename):

- OUTPUT/.state/<stem>.json  the tool's record of an image: its objects with their prompts, the
                             prefilled proposals and the decisions on them (the other files are
                             derived from these, and rebuilt from them at every start);
- OUTPUT/<stem>.json         SA-1B JSON of the accepted objects, the record format of the automatic
                             stage (`sam_jax.annotate.auto`), with the image beside it as
                             <stem>.jpg (unless copy_images is off): OUTPUT is an `sa1b:` source;
- OUTPUT/annotations.json    COCO instances of every edited image: images, annotations (COCO RLE)
                             and categories (an object's name is its category).

The mask of a prompt (`Annotator.segment`, the one rule of the tool): `SamPredictor.predict` on
the image with the points and box in original-image pixels and no mask input; a single point
without a box asks for three masks (`multimask_output=True`) and the one of highest predicted
IoU is kept, any other prompt asks for one mask (`sam_jax.predictor.default_multimask`).

Semi-automatic stage: an image can open with proposals, shown for the person to accept or
reject: the masks an automatic run wrote (`prefill_dir`: its SA-1B JSON per image) or masks
decoded from detector boxes (`load_detections`: a COCO results JSON; each box is a box prompt).
Pending and rejected proposals never reach the exported files; decisions are kept, so a rejected
proposal does not come back.

Requests are checked before anything is read: image names are looked up in the listed images (a
name is never joined to a path), bodies are at most MAX_BODY_BYTES of JSON, prompts at most
MAX_POINTS points and one box inside the image; bad requests get a 4xx answer with a JSON
{"error": ...}. When served on a loopback address only loopback Host headers are answered, and
requests that change anything must be JSON from the tool's own origin (no cross-site writes).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import posixpath
import socket
import threading
import time
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.annotate.auto import _jpeg_bytes, image_id, list_images, output_stems, sa1b_record
from sam_jax.errors import one_line

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
_STATE_VERSION = 1


class RequestError(Exception):
    """A request the tool refuses: HTTP `status` (4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


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


def _mask_from_rle(rle: dict, hw: tuple[int, int]) -> np.ndarray:
    from sam_jax.data.rle import rle_to_mask

    mask = rle_to_mask(rle)
    if mask.shape != tuple(hw):
        raise ValueError(f"mask of size {list(mask.shape)}, image {list(hw)}")
    return mask


def list_entries(images_dir: str) -> list[ImageEntry]:
    """The images of the folder (`auto.list_images`) with the output stems and SA-1B ids the
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


# ---------------------------------------------------------------------------------- the tool


class Annotator:
    """The tool without its web layer: images, prompts to masks, objects and the saved files.

    model, params: a `sam_jax.modeling.Sam` and its params (`sam_jax.load`), or a `SamModel`
    (`sam_model_registry[...]`) and None; images_dir: the folder of images
    (`auto.list_images`); output_dir: where the work is saved (module doc).
    prefill_dir: an automatic run's output (SA-1B JSON per image, `<stem>.json`) whose masks of
    predicted IoU >= prefill_min_iou open as proposals; detections: `load_detections`'s boxes per
    image name, decoded into proposals when an image is first opened.
    Thread-safe: one lock serializes the model and the files (a tool for one person).
    """

    def __init__(
        self,
        model,
        params,
        images_dir: str,
        output_dir: str,
        *,
        prefill_dir: str | None = None,
        prefill_min_iou: float = 0.0,
        detections: dict[str, list[Detection]] | None = None,
        detections_key: str = "detections",
        copy_images: bool = True,
        cached_embeddings: int = 8,
        warmup: bool = True,
    ):
        from sam_jax.predictor import SamPredictor
        from sam_jax.sam_model import unbind

        model, params = unbind(model, params, "Annotator")
        self.entries = list_entries(images_dir)
        if not self.entries:
            raise FileNotFoundError(f"--images {images_dir} holds no image files")
        self.by_name = {e.name: e for e in self.entries}
        self.images_dir, self.output_dir = images_dir, output_dir
        self.prefill_dir, self.prefill_min_iou = prefill_dir, float(prefill_min_iou)
        self.detections = detections
        self.detections_key = detections_key
        self.copy_images = copy_images
        self.warnings: list[str] = []
        ids = [e.image_id for e in self.entries]
        if len(set(ids)) != len(ids):
            self.warnings.append(
                "some images share an SA-1B image id (sa_N names beside others): their ids "
                "collide in annotations.json"
            )
        self.lock = threading.RLock()
        self.predictor = SamPredictor(model, params)
        self.model_key = encoder_fingerprint(model, params)
        self.stats = {"encoder_runs": 0, "embeddings_read": 0}
        self._cache_size = max(1, int(cached_embeddings))
        self._images: collections.OrderedDict = collections.OrderedDict()
        self._embeddings: collections.OrderedDict = collections.OrderedDict()
        self._current: str | None = None  # the image whose embedding the predictor holds
        self._unreadable: dict[str, str] = {}
        self._probed: dict[str, str] = {}  # name -> file signature when its header was read
        self._coco_parts: dict[str, tuple[str, str]] = {}
        self._warmup = warmup
        self._warmed: set[tuple[int, int]] = set()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        paths.makedirs(self._out(STATE_DIR))
        paths.makedirs(self._out(EMBEDDINGS_DIR))
        self.categories: list[str] = self._load_categories()
        self.states: dict[str, dict] = self._load_states()
        self._rebuild_exports()

    # ------------------------------------------------------------------ files

    def _out(self, *names: str) -> str:
        return paths.join(self.output_dir, *names)

    def _state_path(self, entry: ImageEntry) -> str:
        return self._out(STATE_DIR, entry.stem + ".json")

    def _load_categories(self) -> list[str]:
        path = self._out(STATE_DIR, CATEGORIES_FILE)
        if not paths.exists(path):
            return []
        try:
            names = json.loads(paths.read_text(path))
            assert isinstance(names, list) and all(isinstance(n, str) for n in names)
        except (ValueError, AssertionError):
            raise ValueError(f"{path} is damaged: it must be a JSON list of names") from None
        return names

    def _load_states(self) -> dict[str, dict]:
        states = {}
        for entry in self.entries:
            path = self._state_path(entry)
            if not paths.exists(path):
                continue
            try:
                state = json.loads(paths.read_text(path))
                assert isinstance(state, dict) and isinstance(state.get("objects"), list)
                assert isinstance(state.get("proposals"), list)
            except (ValueError, AssertionError):
                raise ValueError(
                    f"{path} is damaged; move it away to start that image afresh"
                ) from None
            states[entry.name] = state
            for o in state["objects"]:
                self._category_id(o["name"])
        return states

    def _category_id(self, name: str) -> int:
        if name not in self.categories:
            self.categories.append(name)
            paths.write_text(self._out(STATE_DIR, CATEGORIES_FILE), json.dumps(self.categories))
        return self.categories.index(name) + 1

    def _sa1b(self, entry: ImageEntry, state: dict) -> dict:
        records = [{k: o[k] for k in SA1B_KEYS} for o in state["objects"]]
        hw = (state["height"], state["width"])
        record = sa1b_record(records, entry.image_id, entry.stem + ".jpg", hw)
        for a, o in zip(record["annotations"], state["objects"], strict=True):
            a["id"] = o["id"]  # stable over deletions
        return record

    def _write_image_exports(self, entry: ImageEntry, state: dict, check: bool = False) -> None:
        """<stem>.jpg (first) and <stem>.json of an edited image; with check, only what is
        missing or differs (the start-up repair after a crash between two writes)."""
        if self.copy_images:
            jpg = self._out(entry.stem + ".jpg")
            if not paths.exists(jpg):
                raw = paths.read_bytes(entry.path)
                image = self._images[entry.name][0] if entry.name in self._images else None
                if image is None and not entry.name.lower().endswith((".jpg", ".jpeg")):
                    from sam_jax.images import decode_image

                    image = decode_image(raw)
                paths.write_bytes(jpg, _jpeg_bytes(raw, entry.path, image))
        text = json.dumps(self._sa1b(entry, state))
        target = self._out(entry.stem + ".json")
        if check and paths.exists(target) and paths.read_text(target) == text:
            return
        paths.write_text(target, text)

    def _coco_part(self, entry: ImageEntry, state: dict) -> tuple[str, str]:
        image = {
            "id": entry.image_id,
            "file_name": entry.name,
            "width": state["width"],
            "height": state["height"],
        }
        annotations = [
            {
                "id": o["id"],
                "image_id": entry.image_id,
                "category_id": self._category_id(o["name"]),
                "segmentation": o["segmentation"],
                "area": o["area"],
                "bbox": o["bbox"],
                "iscrowd": 0,
                "predicted_iou": o["predicted_iou"],
                "stability_score": o["stability_score"],
                "source": o["source"],
            }
            for o in state["objects"]
        ]
        return json.dumps(image), ", ".join(json.dumps(a) for a in annotations)

    def _write_coco(self) -> None:
        images, annotations, used = [], [], set()
        for entry in self.entries:
            state = self.states.get(entry.name)
            if state is None or not state.get("edited"):
                continue
            if entry.name not in self._coco_parts:
                self._coco_parts[entry.name] = self._coco_part(entry, state)
            image, anns = self._coco_parts[entry.name]
            images.append(image)
            if anns:
                annotations.append(anns)
            used.update(o["name"] for o in state["objects"])
        categories = [
            {"id": i + 1, "name": n, "supercategory": ""}
            for i, n in enumerate(self.categories)
            if n in used
        ]
        info = {"description": "sam-jax-annotate serve", "version": "1.0"}
        text = (
            f'{{"info": {json.dumps(info)}, "images": [{", ".join(images)}], '
            f'"annotations": [{", ".join(annotations)}], "categories": {json.dumps(categories)}}}'
        )
        paths.write_text(self._out(COCO_FILE), text)

    def _rebuild_exports(self) -> None:
        for entry in self.entries:
            state = self.states.get(entry.name)
            if state is not None and state.get("edited"):
                self._write_image_exports(entry, state, check=True)
        self._write_coco()

    def _save(self, entry: ImageEntry, state: dict) -> None:
        """The state first (the record of the work), then the files derived from it."""
        paths.write_text(self._state_path(entry), json.dumps(state))
        if state.get("edited"):
            self._coco_parts.pop(entry.name, None)
            self._write_image_exports(entry, state)
            self._write_coco()

    # ------------------------------------------------------------------ images

    def _entry(self, name: Any) -> ImageEntry:
        """The listed image of this name (RequestError 404 for any other string)."""
        if not isinstance(name, str) or name not in self.by_name:
            raise RequestError(404, "no such image in the images folder")
        return self.by_name[name]

    @staticmethod
    def _why(entry: ImageEntry, e: BaseException) -> str:
        """One line for a person, without the folder's path."""
        text = f"{type(e).__name__}: {e}".replace(entry.path, entry.name)
        return one_line(text, 200)

    def _probe(self, entry: ImageEntry) -> None:
        """Reads the image header once per file version: unreadable files are listed as such."""
        from PIL import Image

        try:
            signature = paths.file_signature(entry.path)
        except OSError as e:
            self._unreadable[entry.name] = self._why(entry, e)
            return
        if self._probed.get(entry.name) == signature:
            return
        self._probed[entry.name] = signature
        try:
            with paths.open(entry.path, "rb") as f, Image.open(f) as im:
                if min(im.size) <= 0:
                    raise ValueError(f"image of size {im.size}")
            self._unreadable.pop(entry.name, None)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            self._unreadable[entry.name] = self._why(entry, e)

    def _image(self, entry: ImageEntry, check_file: bool = True) -> np.ndarray:
        """The decoded image (cached; re-read when the file changed), or RequestError 422."""
        from sam_jax.images import decode_image

        cached = self._images.get(entry.name)
        signature = None
        if check_file or cached is None:
            try:
                signature = paths.file_signature(entry.path)
            except OSError as e:
                self._unreadable[entry.name] = self._why(entry, e)
                raise RequestError(422, f"cannot read image {entry.name}: {e.strerror}") from None
        if cached is not None and (signature is None or cached[1] == signature):
            self._images.move_to_end(entry.name)
            return cached[0]
        try:
            image = decode_image(paths.read_bytes(entry.path))
        except Exception as e:  # noqa: BLE001 - any unreadable image is reported, not fatal
            why = self._why(entry, e)
            self._unreadable[entry.name] = why
            self._probed[entry.name] = signature  # the header check cannot clear this
            raise RequestError(422, f"cannot read image {entry.name}: {why}") from None
        self._unreadable.pop(entry.name, None)
        self._images[entry.name] = (image, signature, None)
        while len(self._images) > 4:
            self._images.popitem(last=False)
        if self._current == entry.name:  # the file changed: its embedding too
            self._current = None
        self._embeddings.pop(entry.name, None)
        return image

    def image_png(self, name: Any) -> tuple[bytes, str]:
        """(PNG bytes of the decoded image, its file signature): the browser shows exactly the
        pixels the model sees (no EXIF rotation, any format)."""
        import io

        from PIL import Image

        entry = self._entry(name)
        with self.lock:
            image = self._image(entry)
            cached = self._images[entry.name]
            if cached[2] is None:
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG", compress_level=1)
                cached = (cached[0], cached[1], buf.getvalue())
                self._images[entry.name] = cached
            return cached[2], cached[1]

    def _embedding_paths(self, entry: ImageEntry) -> tuple[str, str]:
        return (
            self._out(EMBEDDINGS_DIR, entry.stem + ".npy"),
            self._out(EMBEDDINGS_DIR, entry.stem + ".json"),
        )

    def _ensure_embedding(self, entry: ImageEntry, image: np.ndarray) -> None:
        """Makes the predictor hold this image's embedding: from memory, from the disk cache
        (when it was made from this file by these encoder weights) or by running the encoder."""
        import jax.numpy as jnp

        if self._current == entry.name:
            return
        cached = self._images.get(entry.name)
        signature = cached[1] if cached else paths.file_signature(entry.path)
        if entry.name in self._embeddings:
            features, original, input_size = self._embeddings[entry.name]
            self._embeddings.move_to_end(entry.name)
            self.predictor._set_embedding(features, original, input_size)
            self._current = entry.name
            return
        npy, meta_path = self._embedding_paths(entry)
        key = {
            "image": signature,
            "model": self.model_key,
            "original_size": [int(image.shape[0]), int(image.shape[1])],
        }
        features = None
        try:
            meta = json.loads(paths.read_text(meta_path)) if paths.exists(meta_path) else None
            if isinstance(meta, dict) and all(meta.get(k) == v for k, v in key.items()):
                import io

                array = np.load(io.BytesIO(paths.read_bytes(npy)), allow_pickle=False)
                features = jnp.asarray(array)
                input_size = tuple(meta["input_size"])
                self.predictor._set_embedding(features, image.shape[:2], input_size)
                self.stats["embeddings_read"] += 1
        except (OSError, ValueError, KeyError, TypeError):
            features = None  # a damaged cache entry is made again
        if features is None:
            import io

            self.predictor.set_image(image)
            self.stats["encoder_runs"] += 1
            features = self.predictor.features
            buf = io.BytesIO()
            np.save(buf, np.asarray(features), allow_pickle=False)
            paths.write_bytes(npy, buf.getvalue())
            meta = {**key, "input_size": list(self.predictor.input_size)}
            paths.write_text(meta_path, json.dumps(meta))
        self._embeddings[entry.name] = (
            self.predictor.features,
            self.predictor.original_size,
            self.predictor.input_size,
        )
        while len(self._embeddings) > self._cache_size:
            self._embeddings.popitem(last=False)
        self._current = entry.name

    # ------------------------------------------------------------------ masks

    def segment(self, points, box, logits: bool = False):
        """The tool's mask of a prompt on the current image (module doc): (bool mask (H, W),
        predicted IoU, multimask_output, stability score or None). With logits, the stability
        score (SA-1B's, offset 1.0) comes from a second decoder run returning logits."""
        from sam_jax.amg.masks import calculate_stability_score
        from sam_jax.predictor import default_multimask

        coords = np.array([p[:2] for p in points], np.float64) if points else None
        labels = np.array([p[2] for p in points], np.int32) if points else None
        box_arr = None if box is None else np.array(box, np.float64)
        multimask = default_multimask(points, box)
        masks, ious, _ = self.predictor.predict(coords, labels, box_arr, multimask_output=multimask)
        k = int(np.argmax(ious)) if multimask else 0
        stability = None
        if logits:
            out, _, _ = self.predictor.predict(
                coords, labels, box_arr, multimask_output=multimask, return_logits=True
            )
            stability = float(calculate_stability_score(out[k], 0.0, 1.0))
            stability = stability if math.isfinite(stability) else 0.0
        return np.asarray(masks[k], bool), float(ious[k]), multimask, stability

    def predict(self, name: Any, body: dict) -> dict:
        """The mask of the prompts of `body` ({points, box}) on image `name` (no state change)."""
        entry = self._entry(name)
        with self.lock:
            image = self._image(entry, check_file=False)
            points, box = parse_prompts(body, image.shape[1], image.shape[0])
            t0 = time.perf_counter()
            self._ensure_embedding(entry, image)
            mask, score, multimask, _ = self.segment(points, box)
            rle = mask_rle(mask)
            ms = (time.perf_counter() - t0) * 1e3
        return {
            "image": entry.name,
            "mask": rle,
            "score": score,
            "area": int(mask.sum()),
            "bbox": mask_bbox(mask),
            "multimask": multimask,
            "server_ms": round(ms, 3),
        }

    # ------------------------------------------------------------------ state

    def _new_state(self, entry: ImageEntry, image: np.ndarray) -> dict:
        h, w = image.shape[:2]
        return {
            "version": _STATE_VERSION,
            "file_name": entry.name,
            "image_id": entry.image_id,
            "width": int(w),
            "height": int(h),
            "edited": False,
            "next_id": 0,
            "objects": [],
            "proposals": [],
            "sources": [],
        }

    def _state(self, entry: ImageEntry, image: np.ndarray) -> tuple[dict, list[str]]:
        """The image's state, with the proposals of the configured prefill sources added on the
        first opening (saved, so decisions persist), and warnings for the person."""
        warnings = []
        state = self.states.get(entry.name)
        if state is None:
            state = self._new_state(entry, image)
        if [state["height"], state["width"]] != list(image.shape[:2]):
            raise RequestError(
                409,
                f"{entry.name} is {image.shape[1]}x{image.shape[0]} now but was annotated at "
                f"{state['width']}x{state['height']}: move {STATE_DIR}/{entry.stem}.json away",
            )
        added = False
        if self.prefill_dir is not None:
            key = f"auto:{self.prefill_dir}"
            if key not in state["sources"]:
                warnings += self._prefill_auto(entry, state, image.shape[:2])
                state["sources"].append(key)
                added = True
        if self.detections is not None:
            key = f"detections:{self.detections_key}"
            if key not in state["sources"]:
                self._prefill_detections(entry, state, image)
                state["sources"].append(key)
                added = True
        if added:
            self.states[entry.name] = state
            paths.write_text(self._state_path(entry), json.dumps(state))
        return state, warnings

    def _prefill_auto(self, entry: ImageEntry, state: dict, hw: tuple[int, int]) -> list[str]:
        path = paths.join(self.prefill_dir, entry.stem + ".json")
        if not paths.exists(path):
            return []
        try:
            record = json.loads(paths.read_text(path))
            annotations = record["annotations"]
            assert isinstance(annotations, list)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            return [f"prefill {path} is not SA-1B JSON ({one_line(e, 120)}): no proposals"]
        kept, bad = 0, 0
        for k, a in enumerate(annotations):
            try:
                iou = float(a.get("predicted_iou", 1.0))
                if not iou >= self.prefill_min_iou:
                    continue
                mask = _mask_from_rle(a["segmentation"], hw)
                if not mask.any():
                    continue
                proposal = {
                    "pid": f"auto-{k}",
                    "source": "auto",
                    "status": "pending",
                    "name": DEFAULT_NAME,
                    "box": None,
                    "segmentation": mask_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "predicted_iou": iou,
                    "stability_score": float(a.get("stability_score", 0.0)),
                    "point_coords": [[float(v) for v in p] for p in a.get("point_coords", [])],
                    "crop_box": [float(v) for v in a.get("crop_box", [0, 0, hw[1], hw[0]])],
                }
            except (KeyError, TypeError, ValueError, AttributeError):
                bad += 1
                continue
            if kept >= MAX_PROPOSALS:
                break
            state["proposals"].append(proposal)
            kept += 1
        return [f"{bad} masks of {path} are malformed and were left out"] if bad else []

    def _prefill_detections(self, entry: ImageEntry, state: dict, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        self._ensure_embedding(entry, image)
        for k, det in enumerate(self.detections.get(entry.name, [])[:MAX_PROPOSALS]):
            x0, y0, x1, y1 = det.box
            box = (min(max(x0, 0.0), w), min(max(y0, 0.0), h))
            box += (min(max(x1, box[0]), w), min(max(y1, box[1]), h))
            mask, iou, _, _ = self.segment([], box)
            if not mask.any():
                continue
            state["proposals"].append(
                {
                    "pid": f"det-{k}",
                    "source": "detections",
                    "status": "pending",
                    "name": det.name,
                    "box": list(box),
                    "detector_score": det.score,
                    "segmentation": mask_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "predicted_iou": iou,
                }
            )

    @staticmethod
    def _object_view(o: dict) -> dict:
        keys = ("id", "name", "source", "points", "box", "segmentation", "area", "bbox")
        return {**{k: o.get(k) for k in keys}, "score": o["predicted_iou"]}

    @staticmethod
    def _proposal_view(p: dict) -> dict:
        keys = ("pid", "source", "name", "box", "segmentation", "area", "bbox")
        view = {k: p.get(k) for k in keys}
        view["score"] = p.get("detector_score", p["predicted_iou"])
        return view

    def _payload(self, entry: ImageEntry, state: dict, warnings=()) -> dict:
        used = sorted({o["name"] for s in self.states.values() for o in s["objects"]})
        return {
            "name": entry.name,
            "index": entry.index,
            "width": state["width"],
            "height": state["height"],
            "objects": [self._object_view(o) for o in state["objects"]],
            "proposals": [
                self._proposal_view(p) for p in state["proposals"] if p["status"] == "pending"
            ],
            "names": sorted(set(used) | {DEFAULT_NAME}),
            "warnings": list(warnings),
        }

    def list_payload(self) -> dict:
        """Every listed image with whether it can be read and what was done on it."""
        with self.lock:
            images = []
            for entry in self.entries:
                if entry.name not in self._images:
                    self._probe(entry)
                state = self.states.get(entry.name)
                images.append(
                    {
                        "name": entry.name,
                        "index": entry.index,
                        "readable": entry.name not in self._unreadable,
                        "error": self._unreadable.get(entry.name),
                        "objects": len(state["objects"]) if state else 0,
                        "pending": sum(p["status"] == "pending" for p in state["proposals"])
                        if state
                        else 0,
                        "edited": bool(state and state.get("edited")),
                    }
                )
            return {
                "images": images,
                "max_points": MAX_POINTS,
                "prefill": self.prefill_dir is not None,
                "detections": self.detections is not None,
            }

    def open_image(self, name: Any) -> dict:
        """Opens an image: decodes it, makes its embedding (the encoder runs here, once), adds
        the prefill proposals on the first opening; returns its objects and pending proposals."""
        entry = self._entry(name)
        with self.lock:
            image = self._image(entry)
            self._ensure_embedding(entry, image)
            state, warnings = self._state(entry, image)
            payload = self._payload(entry, state, warnings)
            shape = (int(image.shape[0]), int(image.shape[1]))
            if self._warmup and shape not in self._warmed and not self._closing.is_set():
                self._warmed.add(shape)
                thread = threading.Thread(target=self._warm, args=(entry, shape), daemon=True)
                self._threads.append(thread)
                thread.start()
            return payload

    def close(self) -> None:
        """Waits for the background compilations (a thread killed inside XLA at exit aborts
        the process)."""
        self._closing.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _warm(self, entry: ImageEntry, shape: tuple[int, int]) -> None:
        """Compiles, in the background, the decoder versions of the usual prompts (1 point, 2-3
        points or a point and a box, 4-7 points, a box) and the post-processing of this image
        size, one at a time under the lock, so that the first clicks do not wait for them."""
        try:
            h, w = shape
            point = (w / 2, h / 2, 1)
            box = (0.0, 0.0, float(w), float(h))
            prompts = [([point], None), ([point] * 2, None), ([point] * 4, None), ([], box)]
            for k, (points, b) in enumerate(prompts):
                if self._closing.is_set():
                    return
                with self.lock:
                    self._ensure_embedding(entry, self._image(entry, check_file=False))
                    self.segment(points, b, logits=k == 1)
        except Exception:  # noqa: BLE001 - warming up is only an optimisation
            pass

    def _edit(self, entry: ImageEntry) -> dict:
        image = self._image(entry, check_file=False)
        state, _ = self._state(entry, image)
        self.states[entry.name] = state
        state["edited"] = True
        return state

    def _new_object(self, entry: ImageEntry, state: dict, fields: dict) -> dict:
        if len(state["objects"]) >= MAX_OBJECTS or state["next_id"] >= 1_000_000:
            raise RequestError(422, f"an image holds at most {MAX_OBJECTS} objects")
        obj = {"id": entry.image_id * 1_000_000 + state["next_id"], **fields}
        state["next_id"] += 1
        state["objects"].append(obj)
        self._category_id(obj["name"])
        return obj

    def accept(self, name: Any, body: dict) -> dict:
        """Accepts the mask of the prompts of `body` ({points, box, name}) as a new object."""
        entry = self._entry(name)
        with self.lock:
            image = self._image(entry, check_file=False)
            h, w = image.shape[:2]
            points, box = parse_prompts(body, w, h)
            label = clean_name(body.get("name"))
            self._ensure_embedding(entry, image)
            mask, iou, _, stability = self.segment(points, box, logits=True)
            if not mask.any():
                raise RequestError(422, "the mask is empty: add or move points")
            state = self._edit(entry)
            obj = self._new_object(
                entry,
                state,
                {
                    "name": label,
                    "source": "manual",
                    "points": [list(p) for p in points],
                    "box": None if box is None else list(box),
                    "segmentation": mask_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": mask_bbox(mask),
                    "predicted_iou": iou,
                    "stability_score": stability,
                    "point_coords": [[x, y] for x, y, label_ in points if label_ == 1],
                    "crop_box": [0, 0, w, h],
                },
            )
            self._save(entry, state)
            return self._object_view(obj)

    def _object(self, state: dict | None, object_id: int) -> dict:
        for o in (state or {}).get("objects", []):
            if o["id"] == object_id:
                return o
        raise RequestError(404, f"no object {object_id} in this image")

    def rename(self, name: Any, object_id: int, body: dict) -> dict:
        entry = self._entry(name)
        with self.lock:
            obj = self._object(self.states.get(entry.name), object_id)
            label = clean_name(body.get("name"), default=None)
            state = self._edit(entry)
            obj["name"] = label
            self._category_id(label)
            self._save(entry, state)
            return self._object_view(obj)

    def delete(self, name: Any, object_id: int) -> dict:
        entry = self._entry(name)
        with self.lock:
            obj = self._object(self.states.get(entry.name), object_id)
            state = self._edit(entry)
            state["objects"].remove(obj)
            self._save(entry, state)
            return {"deleted": object_id}

    def _proposal(self, state: dict | None, pid: str) -> dict:
        for p in (state or {}).get("proposals", []):
            if p["pid"] == pid and p["status"] == "pending":
                return p
        raise RequestError(404, "no such pending proposal in this image")

    def decide(self, name: Any, pid: str, accept: bool, body: dict | None = None) -> dict:
        """Accepts (as an object, optionally renamed by body {name}) or rejects a proposal."""
        entry = self._entry(name)
        with self.lock:
            proposal = self._proposal(self.states.get(entry.name), pid)
            label = clean_name((body or {}).get("name"), default=proposal["name"])
            image = self._image(entry, check_file=False)
            h, w = image.shape[:2]
            stability = proposal.get("stability_score")
            if accept and stability is None:  # a detector box: its score needs the logits
                self._ensure_embedding(entry, image)
                _, _, _, stability = self.segment([], tuple(proposal["box"]), logits=True)
            state = self._edit(entry)
            proposal["status"] = "accepted" if accept else "rejected"
            result: dict[str, Any] = {"pid": pid, "status": proposal["status"]}
            if accept:
                fields = {
                    "name": label,
                    "source": proposal["source"],
                    "points": [],
                    "box": proposal["box"],
                    **{k: proposal[k] for k in ("segmentation", "area", "bbox", "predicted_iou")},
                    "stability_score": stability,
                    "point_coords": proposal.get("point_coords", []),
                    "crop_box": proposal.get("crop_box", [0, 0, w, h]),
                }
                if "detector_score" in proposal:
                    fields["detector_score"] = proposal["detector_score"]
                result["object"] = self._object_view(self._new_object(entry, state, fields))
            self._save(entry, state)
            return result


# ---------------------------------------------------------------------------------- web layer


def _static_files() -> dict[str, tuple[bytes, str]]:
    kinds = {
        "index.html": "text/html; charset=utf-8",
        "app.js": "text/javascript; charset=utf-8",
        "style.css": "text/css; charset=utf-8",
    }
    out = {}
    for name, kind in kinds.items():
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            out[name] = (f.read(), kind)
    return out


_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    ),
)


class _Guard:
    """ASGI middleware: answers only the allowed Host names (DNS rebinding), refuses writes from
    other origins (cross-site requests), and adds the security headers."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    @staticmethod
    def _hostname(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def _problem(self, scope) -> tuple[int, str] | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and self._hostname(host) not in self.allowed_hosts:
            return 400, "this server answers only its loopback address (bad Host header)"
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None:
            if origin.rstrip("/").lower() != f"http://{host}".lower():
                return 403, "cross-origin requests are refused"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        declared = Headers(scope=scope).get("content-length")
        body = {"done": False, "seen": 0}

        async def tracked_receive():
            message = await receive()
            if message["type"] == "http.request":
                body["seen"] += len(message.get("body", b""))
                body["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                body["done"] = True
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                # An answer before the whole body was read (an early 4xx): read the rest first,
                # up to a bound, so that closing the connection does not reset it (which would
                # lose the answer on the way to the client).
                drainable = declared is None or (
                    declared.isdigit() and int(declared) <= MAX_BODY_BYTES + MAX_DRAIN_BYTES
                )
                while drainable and not body["done"]:
                    if body["seen"] > MAX_BODY_BYTES + MAX_DRAIN_BYTES:
                        break
                    await tracked_receive()
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        problem = self._problem(scope)
        if problem is not None:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": problem[1]}, status_code=problem[0])
            return await response(scope, tracked_receive, guarded_send)
        return await self.app(scope, tracked_receive, guarded_send)


async def read_json_body(request) -> dict:
    """The JSON object of a request: application/json, at most MAX_BODY_BYTES (RequestError
    415, 413, 400, 422)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, "send the body as application/json")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, "bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    value = parse_json(bytes(body))
    if not isinstance(value, dict):
        raise RequestError(422, "the body must be a JSON object")
    return value


def create_app(annotator: Annotator, allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS):
    """The Starlette app of the tool (None for allowed_hosts answers any Host header)."""
    import logging

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    static = _static_files()
    log = logging.getLogger("sam_jax.annotate.serve")

    def asset(name: str):
        async def endpoint(request):
            data, kind = static[name]
            return Response(data, media_type=kind, headers={"cache-control": "no-cache"})

        return endpoint

    def api(handler):
        async def endpoint(request):
            result = await handler(request)
            status = 200
            if isinstance(result, tuple):
                result, status = result
            return JSONResponse(result, status_code=status, headers={"cache-control": "no-store"})

        return endpoint

    async def images(request):
        return await run_in_threadpool(annotator.list_payload)

    async def open_image(request):
        return await run_in_threadpool(annotator.open_image, request.path_params["name"])

    async def image_png(request):
        data, signature = await run_in_threadpool(annotator.image_png, request.path_params["name"])
        etag = '"' + hashlib.sha1(signature.encode()).hexdigest()[:16] + '"'
        headers = {"etag": etag, "cache-control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/png", headers=headers)

    async def predict(request):
        t0 = time.perf_counter()
        body = await read_json_body(request)
        result = await run_in_threadpool(annotator.predict, body.get("image"), body)
        total = (time.perf_counter() - t0) * 1e3
        server_timing = f"decode;dur={result['server_ms']:.2f}, total;dur={total:.2f}"
        return JSONResponse(
            {**result, "total_ms": round(total, 3)},
            headers={"server-timing": server_timing, "cache-control": "no-store"},
        )

    async def add_object(request):
        body = await read_json_body(request)
        return await run_in_threadpool(annotator.accept, request.path_params["name"], body), 201

    async def one_object(request):
        name, oid = request.path_params["name"], request.path_params["oid"]
        if request.method == "DELETE":
            return await run_in_threadpool(annotator.delete, name, oid)
        body = await read_json_body(request)
        return await run_in_threadpool(annotator.rename, name, oid, body)

    async def proposal(request):
        action = request.path_params["action"]
        if action not in ("accept", "reject"):
            raise RequestError(404, "proposals are accepted or rejected")
        empty = request.headers.get("content-length", "0") == "0"
        body = {} if empty and "transfer-encoding" not in request.headers else None
        body = await read_json_body(request) if body is None else body
        name, pid = request.path_params["name"], request.path_params["pid"]
        return await run_in_threadpool(annotator.decide, name, pid, action == "accept", body)

    async def request_error(request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        message = one_line(f"{type(exc).__name__}: {exc}", 300)
        return JSONResponse({"error": f"internal error: {message}"}, status_code=500)

    routes = [
        Route("/", asset("index.html")),
        Route("/static/app.js", asset("app.js")),
        Route("/static/style.css", asset("style.css")),
        Route("/api/images", api(images)),
        Route("/api/images/{name}", api(open_image)),
        Route("/api/images/{name}/image.png", image_png),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/images/{name}/objects", api(add_object), methods=["POST"]),
        Route("/api/images/{name}/objects/{oid:int}", api(one_object), methods=["PATCH", "DELETE"]),
        Route("/api/images/{name}/proposals/{pid}/{action}", api(proposal), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, allowed_hosts=allowed_hosts)],
        exception_handlers={
            RequestError: request_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError (one line) if the
    port is taken or the address is not this machine's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections wait in the backlog until the server accepts them
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def allowed_hosts_for(host: str) -> frozenset[str] | None:
    """Loopback binds answer loopback names only; any other bind answers any Host."""
    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS or host.startswith("127.") else None


def _uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=5,
        limit_concurrency=64,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def serve_forever(app, sock: socket.socket) -> None:
    """Serves `app` on the bound socket until Ctrl-C / SIGTERM (then re-raised by uvicorn)."""
    _uvicorn_server(app).run(sockets=[sock])


class BackgroundServer:
    """The tool served from a thread (tests, notebooks): `url`, then `stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the annotation server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
