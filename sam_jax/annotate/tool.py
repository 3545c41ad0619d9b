"""The annotation tool without its web layer: `Annotator` (images, prompts to masks, objects,
proposals and the files saved as the work happens). See `sam_jax.annotate.serve` for the whole
tool and the files it writes."""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.annotate.auto import jpeg_bytes, sa1b_record
from sam_jax.annotate.prompts import (
    CATEGORIES_FILE,
    COCO_FILE,
    DEFAULT_NAME,
    EMBEDDINGS_DIR,
    MAX_OBJECTS,
    MAX_POINTS,
    MAX_PROPOSALS,
    SA1B_KEYS,
    STATE_DIR,
    STATE_VERSION,
    Detection,
    ImageEntry,
    RequestError,
    clean_name,
    encoder_fingerprint,
    list_entries,
    mask_bbox,
    mask_from_rle,
    mask_rle,
    parse_prompts,
)
from sam_jax.errors import one_line

# ---------------------------------------------------------------------------------- the tool


class Annotator:
    """The tool without its web layer: images, prompts to masks, objects and the saved files.

    model, params: a `sam_jax.modeling.Sam` and its params (`sam_jax.load`), or a `SamModel`
    (`sam_model_registry[...]`) and None; images_dir: the folder of images
    (`images.list_images`); output_dir: where the work is saved (module doc).
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
                paths.write_bytes(jpg, jpeg_bytes(raw, entry.path, image))
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
            self.predictor.set_embedding(features, original, input_size)
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
                self.predictor.set_embedding(features, image.shape[:2], input_size)
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
        from sam_jax.prompts import default_multimask

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
            "version": STATE_VERSION,
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
                mask = mask_from_rle(a["segmentation"], hw)
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
