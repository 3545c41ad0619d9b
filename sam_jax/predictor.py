"""SamPredictor: the official `segment_anything.SamPredictor` API on top of `sam_jax.functional`.

Set an image once (the image encoder runs once), then predict masks for any number of prompts.
Inputs and outputs are numpy. Prompt coordinates are in one of two frames:

- original-image pixels: `predict` and `predict_batch` (as the official `predict`);
- the resized model-input frame (longest side = `image_size`, 1024 for SAM): `predict_torch`, as
  the official one, which takes the output of `transform.apply_coords` / `apply_boxes` (and
  their `_torch` variants). Those return `ResizedCoords` arrays, which `predict` and
  `predict_batch` refuse, so that coordinates cannot be mapped twice by mistake.

Prompt tokens and prompt counts are padded to power-of-two buckets (PAD_LABEL slots and copies of
the first prompt, which do not change results), so a changing number of points or prompts compiles
only a few decoder versions. This is the one padding layer of the inference path: callers (the
evaluation protocol, the detections scorer, `SamModel.__call__`) pass their real rows. Inputs are
validated here, once; the `sam_jax.functional` internals called afterwards do not check them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import tiling, transforms
from sam_jax.errors import check_bool
from sam_jax.sam_model import device_of, unbind
from sam_jax.transforms import to_host

Point = tuple[float, float, int]  # x, y (pixels of the original image), label 1 fg / 0 bg
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


class ResizedCoords(np.ndarray):
    """Prompt coordinates in the resized model-input frame of `target_length` pixels.

    What `ResizeLongestSide.apply_coords` / `apply_boxes` (and the `_torch` variants) return: a
    plain numpy array (same values as the official functions) that records the frame it is in.
    `SamPredictor.predict_torch` and `SamModel(...)` take it (and check `target_length` against
    the model); `predict` and `predict_batch`, which take original-image pixels, refuse it.
    Slices and arithmetic keep the tag; `np.array(x)` / `np.asarray(x)` drop it.
    """

    target_length: int | None

    def __new__(cls, array, target_length: int):
        obj = np.asarray(array).view(cls)
        obj.target_length = int(target_length)
        return obj

    def __array_finalize__(self, obj):
        self.target_length = getattr(obj, "target_length", None)

    def __reduce__(self):  # pickles keep the tag
        rebuild, args, state = super().__reduce__()
        return rebuild, args, (state, self.target_length)

    def __setstate__(self, state):
        base, self.target_length = state
        super().__setstate__(base)


def _map_once(x, what: str, method: str):
    if isinstance(x, ResizedCoords):
        raise ValueError(
            f"these {what} are already in the {x.target_length}-px input frame (from "
            f"transform.{method}): map original-image pixels once"
        )
    return to_host(x)


class ResizeLongestSide:
    """The official `ResizeLongestSide`: image resize and coordinate mapping.

    Coordinates come back as `ResizedCoords` (numpy): `apply_coords` / `apply_boxes` in float64
    as the official numpy methods, `apply_coords_torch` / `apply_boxes_torch` in float32 as the
    official torch methods (same values). All four take numpy or jax arrays, or torch tensors.
    """

    def __init__(self, target_length: int):
        self.target_length = int(target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return transforms.resize_longest_side(to_host(image), self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size) -> ResizedCoords:
        coords = _map_once(coords, "coordinates", "apply_coords")
        out = transforms.apply_coords(coords, original_size, self.target_length)
        return ResizedCoords(out, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size) -> ResizedCoords:
        boxes = np.asarray(_map_once(boxes, "boxes", "apply_boxes")).reshape(-1, 4)
        out = transforms.apply_boxes(boxes, original_size, self.target_length)
        return ResizedCoords(out, self.target_length)

    def apply_coords_torch(self, coords, original_size) -> ResizedCoords:
        """`apply_coords` in float32, as the official torch version: x * float32(new_w / old_w)
        rounded once to float32 (torch's arithmetic), likewise y. Returns numpy, not a tensor."""
        coords = _map_once(coords, "coordinates", "apply_coords_torch")
        old_h, old_w = int(original_size[0]), int(original_size[1])
        new_h, new_w = transforms.get_preprocess_shape(old_h, old_w, self.target_length)
        out = np.array(coords, dtype=np.float32)  # copy
        out[..., 0] = out[..., 0] * np.float32(new_w / old_w)
        out[..., 1] = out[..., 1] * np.float32(new_h / old_h)
        return ResizedCoords(out, self.target_length)

    def apply_boxes_torch(self, boxes, original_size) -> ResizedCoords:
        boxes = np.asarray(_map_once(boxes, "boxes", "apply_boxes_torch"))
        out = self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size)
        return out.reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return transforms.get_preprocess_shape(oldh, oldw, long_side_length)


def _as_float_array(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(to_host(x), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_points(
    coords, labels, batch: int | None, padding: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validates (B, N, 2) coords and (B, N) labels (or (N, 2)/(N,) when batch is None); with
    padding, label -1 (the official padding point of batched prompts) is allowed too."""
    lead = "N" if batch is None else "B, N"
    if labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied")
    coords = _as_float_array(coords, "point_coords")
    try:
        labels_f = np.asarray(to_host(labels), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError("point_labels must be numeric") from e
    ndim = 1 if batch is None else 2
    if coords.ndim != ndim + 1 or coords.shape[-1] != 2:
        raise ValueError(f"point_coords must have shape ({lead}, 2), got {coords.shape}")
    if labels_f.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels shape {labels_f.shape} does not match point_coords {coords.shape}"
        )
    if not np.all(np.isin(labels_f, (-1, 0, 1) if padding else (0, 1))):
        raise ValueError(
            "point_labels must be 1 (foreground) or 0 (background)"
            + (" or -1 (padding point)" if padding else "")
        )
    return coords, labels_f.astype(np.int32)


def _check_boxes(boxes, batch: bool) -> np.ndarray:
    boxes = _as_float_array(boxes, "box" if not batch else "boxes")
    if batch and (boxes.ndim != 2 or boxes.shape[-1] != 4):
        raise ValueError(f"boxes must have shape (B, 4), got {boxes.shape}")
    if not batch:
        if boxes.size != 4 or boxes.ndim > 2 or (boxes.ndim == 2 and boxes.shape[0] != 1):
            raise ValueError(f"box must be 4 numbers XYXY, got shape {boxes.shape}")
        boxes = boxes.reshape(1, 4)
    if np.any(boxes[:, 0] > boxes[:, 2]) or np.any(boxes[:, 1] > boxes[:, 3]):
        raise ValueError("box must be XYXY with x0 <= x1 and y0 <= y1")
    return boxes


def _refuse_resized(x, what: str, method: str) -> None:
    """The trap of the official API: predict / predict_batch take original-image pixels, so
    coordinates mapped by `transform.apply_*` would be mapped twice (wrong masks, no error)."""
    if isinstance(x, ResizedCoords):
        mapper = "apply_boxes" if what == "boxes" else "apply_coords"
        raise ValueError(
            f"these {what} were mapped by transform.{mapper} to the {x.target_length}-px input "
            f"frame: pass them to predict_torch, or pass original-image pixels to {method}"
        )


def _check_frame(x, what: str, image_size: int) -> None:
    """Input-frame coordinates (predict_torch, SamModel) tagged for another frame size."""
    if isinstance(x, ResizedCoords) and x.target_length not in (None, image_size):
        raise ValueError(
            f"these {what} were mapped to a {x.target_length}-px frame but the model input is "
            f"{image_size} px: map them with ResizeLongestSide({image_size}) (predictor.transform)"
        )


def check_batched_prompts(
    point_coords,
    point_labels,
    boxes,
    mask_input,
    low_res_size: int,
    who: str,
    input_frame: bool = False,
    allow_none: bool = False,
):
    """Validates batched prompts (B, N, 2) / (B, N) / (B, 4) / (B, 1, m, m) (or (B, m, m)) that
    agree on B. Returns (coords, labels, boxes, masks (B, m, m) float32, B). input_frame (the
    official `predict_torch` and `Sam.forward` inputs) allows label -1 (padding points); with
    allow_none (`Sam.forward`) no prompt at all is one prompt (B = 1)."""
    coords = labels = box_arr = masks = None
    sizes = {}
    if point_coords is not None:
        coords, labels = _check_points(point_coords, point_labels, True, padding=input_frame)
        sizes["point_coords"] = coords.shape[0]
    elif point_labels is not None:
        raise ValueError("point_labels given without point_coords")
    if boxes is not None:
        box_arr = _check_boxes(boxes, batch=True)
        sizes["boxes"] = box_arr.shape[0]
    if mask_input is not None:
        m = np.asarray(to_host(mask_input))
        if m.ndim == 3:
            m = m[:, None]
        m = _check_mask_input(m, low_res_size, (m.shape[0], 1), "(B, 1, {m}, {m})")
        masks = m[:, 0]
        sizes["mask_input"] = masks.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{who} inputs disagree on the batch size: {sizes}")
    if not sizes:
        if allow_none:
            return None, None, None, None, 1
        raise ValueError(f"{who} needs point_coords, boxes or mask_input")
    num = next(iter(sizes.values()))
    if num == 0:
        raise ValueError(f"{who} got an empty batch (B = 0)")
    return coords, labels, box_arr, masks, num


def _check_mask_input(mask_input, m: int, lead: tuple[int, ...], expected: str) -> np.ndarray:
    arr = _as_float_array(mask_input, "mask_input")
    if arr.shape != (*lead, m, m):
        raise ValueError(f"mask_input must have shape {expected.format(m=m)}, got {arr.shape}")
    return arr.astype(np.float32)


def check_resized_image(image, image_size: int, original_size, name: str):
    """A (3, h, w) image already resized by `ResizeLongestSide.apply_image` (numpy, jax or torch;
    uint8 or float values) and its original (H, W) -> (HWC float array, (H, W), (h, w)).

    (h, w) must be what `apply_image` makes of (H, W), so that a missing resize, a channels-last
    image or a swapped original_size is an error rather than wrong masks."""
    x = _as_float_array(image, name)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(
            f"{name} must be (3, H, W) (transform.apply_image, then channels first), "
            f"got shape {x.shape}"
        )
    try:
        size = tuple(int(v) for v in to_host(original_size))
    except (TypeError, ValueError):
        raise ValueError(f"original_size must be (H, W) ints, got {original_size!r}") from None
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"original_size must be two positive ints (H, W), got {original_size!r}")
    input_size = (int(x.shape[1]), int(x.shape[2]))
    expected = transforms.get_preprocess_shape(size[0], size[1], image_size)
    if input_size != expected:
        raise ValueError(
            f"{name} of size {input_size} is not an image of original_size {size} resized to "
            f"long side {image_size} (expected {expected}): resize with ResizeLongestSide"
            f"({image_size}).apply_image and pass the (H, W) of the image before resizing"
        )
    return x.transpose(1, 2, 0), size, input_size


class SamPredictor:
    """Official-style predictor: `set_image` once, then `predict` / `predict_batch` /
    `predict_torch`.

    `SamPredictor(sam)` with a `SamModel` (from `sam_model_registry`), or `SamPredictor(model,
    params)` with a `sam_jax.modeling.Sam` (from `build_sam` or `sam_jax.load`) and its params.
    min_batch_bucket: `predict_batch` / `predict_torch` pad the number of prompts B to a power of
    two of at least this (padded rows are dropped from the outputs), so that batches of 1..8
    prompts share one compiled version; `predict` (one prompt) is not padded.

    Tiled mode (micro_sam's): with tile_shape and halo ((h, w) pixels, `sam_jax.tiling`),
    `set_image` encodes every tile-with-halo separately (`functional.encode_image_tiled`), and
    each prompt (points and/or box, in full-image pixels) is decoded in the tile that holds it
    with the most margin (`tiling.choose_tiles`; `tile_ids` holds the last call's choices).
    Masks come back at the full (H, W), False (logits -inf) outside the chosen tile; iou is that
    tile's; low_res_masks are in the chosen tile's frame (its tile-with-halo resized), so pass them
    back as mask_input only with prompts decoded in the same tile. A prompt needs a point or a
    box; `predict_torch` and `set_torch_image` (resized-frame inputs) are refused. An image
    within one tile gives exactly the untiled results.
    """

    def __init__(
        self, model, params=None, min_batch_bucket: int = 8, *, tile_shape=None, halo=None
    ):
        model, params = unbind(model, params, "SamPredictor")
        self.model = model
        self.min_batch_bucket = int(min_batch_bucket)
        self.tiling = tiling.check_tiling(tile_shape, halo)  # None: untiled
        # Host (numpy) leaves go to the device once, not on every call.
        self.params = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params
        )
        self.image_size = model.config.image_size
        self.low_res_size = model.config.low_res_size
        self.transform = ResizeLongestSide(self.image_size)
        self._zeros = {}
        self.reset_image()

    @property
    def device(self) -> jax.Device:
        """The jax device of the image embedding (before `set_image`, that of the params): where
        to put inputs, e.g. `jnp.asarray(boxes, device=predictor.device)`."""
        if self.features is not None:
            return device_of(self.features)
        if self.tiles is not None:
            return device_of(self.tiles.features[0])
        return device_of(jax.tree_util.tree_leaves(self.params)[0])

    # ----------------------------------------------------------------------- image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of a uint8 (H, W, 3) image in "RGB" or "BGR" channel order."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = transforms.check_image(to_host(image))
        if image_format == "BGR":
            image = image[..., ::-1]
        if self.tiling is not None:
            grid = tiling.TileGrid.build(image.shape[:2], *self.tiling)
            tiles = F._encode_tiles(self.model, self.params, image, grid)
            self.reset_image()
            self.tiles, self.original_size, self.is_image_set = tiles, image.shape[:2], True
            return
        x, input_size = transforms.preprocess_image(image, self.image_size)
        self._set_embedding(
            F._encode(self.model, self.params, x[None]), image.shape[:2], input_size
        )

    def set_torch_image(self, transformed_image, original_image_size) -> None:
        """`set_image` of an image already resized (official `set_torch_image`): (1, 3, h, w)
        (numpy, jax or torch; uint8 or float values) from `transform.apply_image`, and the
        original (H, W)."""
        self._refuse_tiled("set_torch_image", "set_image")
        x = to_host(transformed_image)
        shape = np.shape(x)
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError(f"set_torch_image takes a (1, 3, h, w) image, got shape {shape}")
        hwc, original, input_size = check_resized_image(
            x[0], self.image_size, original_image_size, "transformed_image[0]"
        )
        x = transforms._normalize_and_pad(hwc, self.image_size)
        self._set_embedding(F._encode(self.model, self.params, x[None]), original, input_size)

    def _set_embedding(self, features, original_size, input_size) -> None:
        """Makes `features` (1, g, g, D) the current image's embedding."""
        self.reset_image()
        self.features = features
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self):
        """The embedding of the current image: jax array (1, g, g, D) (NHWC); in tiled mode
        (T, g, g, D), one per tile of `tiles.grid` (row-major)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to get an embedding.")
        if self.tiles is not None:
            return jnp.concatenate(self.tiles.features)
        return self.features

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self.tiles = None  # tiling.TiledEmbeddings in tiled mode
        self.tile_ids = None  # (P,) tile of each prompt of the last tiled call

    # ----------------------------------------------------------------------- prompts

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the current image (official `SamPredictor.predict`).

        point_coords (N, 2) xy pixels of the original image, point_labels (N,) in {0, 1}; box
        (4,) XYXY; mask_input (1, m, m) low-res logits from a previous call. Returns masks
        (C, H, W) (bool, or float32 logits with return_logits), iou (C,) and low-res logits
        (C, m, m); C = 3 or 1. multimask_output and return_logits must be bools (TypeError).
        As officially, points outside the image and a call without any prompt are accepted
        (the latter decodes the no-prompt embedding).
        """
        self._require_image()
        _refuse_resized(point_coords, "point_coords", "predict")
        _refuse_resized(box, "boxes", "predict")
        coords = labels = boxes = masks = None
        if point_coords is not None:
            coords, labels = _check_points(point_coords, point_labels, None)
            coords, labels = coords[None], labels[None]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if box is not None:
            boxes = _check_boxes(box, batch=False)
        if mask_input is not None:
            masks = _check_mask_input(mask_input, self.low_res_size, (1,), "(1, {m}, {m})")
        out = self._predict(coords, labels, boxes, masks, 1, 1, multimask_output, return_logits)
        return tuple(o[0] for o in out)

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts on the current image in one call, in original-image pixels like `predict`
        (`predict_torch` takes the same prompts in the resized input frame).

        point_coords (B, N, 2), point_labels (B, N); boxes (B, 4) XYXY; mask_input (B, 1, m, m)
        (or (B, m, m)). Returns masks (B, C, H, W), iou (B, C), low-res logits (B, C, m, m).
        """
        self._require_image()
        _refuse_resized(point_coords, "point_coords", "predict_batch")
        _refuse_resized(boxes, "boxes", "predict_batch")
        coords, labels, box_arr, masks, num = check_batched_prompts(
            point_coords, point_labels, boxes, mask_input, self.low_res_size, "predict_batch"
        )
        bucket = self.min_batch_bucket
        return self._predict(
            coords, labels, box_arr, masks, num, bucket, multimask_output, return_logits
        )

    def predict_torch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The official `predict_torch`: B prompts ALREADY in the resized input frame.

        point_coords (B, N, 2) and boxes (B, 4) from `transform.apply_coords(_torch)` /
        `apply_boxes(_torch)` (or any array in that frame: longest image side = `image_size`);
        point_labels (B, N); mask_input (B, 1, m, m). numpy, jax or torch inputs. Returns numpy
        masks (B, C, H, W) at the original size, iou (B, C), low-res logits (B, C, m, m).
        """
        self._require_image()
        self._refuse_tiled("predict_torch", "predict_batch")
        _check_frame(point_coords, "point_coords", self.image_size)
        _check_frame(boxes, "boxes", self.image_size)
        coords, labels, box_arr, masks, num = check_batched_prompts(
            point_coords,
            point_labels,
            boxes,
            mask_input,
            self.low_res_size,
            "predict_torch",
            input_frame=True,
        )
        bucket = self.min_batch_bucket
        return self._predict(
            coords, labels, box_arr, masks, num, bucket, multimask_output, return_logits, True
        )

    # ----------------------------------------------------------------------- internals

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _refuse_tiled(self, method: str, instead: str) -> None:
        if self.tiling is not None:
            raise ValueError(
                f"{method} takes resized-frame inputs, which tiled mode has not: use {instead}"
            )

    def _zero_masks(self, num: int):
        """Device-resident zeros (1, num, m, m), cached per size (no host transfer per call)."""
        if num not in self._zeros:
            m = self.low_res_size
            self._zeros[num] = jnp.zeros((1, num, m, m), jnp.float32)
        return self._zeros[num]

    def _predict(
        self,
        coords,
        labels,
        boxes,
        masks,
        num,
        min_bucket,
        multimask_output,
        logits,
        input_frame=False,
        frame=None,
    ):
        """coords (P, N, 2) / labels (P, N) / boxes (P, 4) in original pixels (input_frame:
        already in the resized input frame); masks (P, m, m); all validated by the caller.
        P = num prompts, padded to bucket_size(num, min_bucket). frame: (features, original
        size, input size) of a tile (default: the image's)."""
        multimask_output = check_bool("multimask_output", multimask_output)
        logits = check_bool("return_logits", logits)
        if self.tiles is not None and frame is None:
            return self._predict_tiled(
                coords, labels, boxes, masks, min_bucket, multimask_output, logits
            )
        features, original_size, input_size = frame or (
            self.features,
            self.original_size,
            self.input_size,
        )
        tokens = (0 if coords is None else coords.shape[1] + (boxes is None)) + (
            0 if boxes is None else 2
        )
        pad_to = transforms.bucket_size(tokens)
        if input_frame:
            pts, labs = F._pack_input_prompts(coords, labels, boxes, pad_to)
        else:
            pts, labs = F._pack_image_prompts(
                original_size, self.image_size, coords, labels, boxes, pad_to
            )
        if pts.shape[0] != num:  # no sparse prompt: the same all-padding tokens for every prompt
            pts, labs = np.repeat(pts, num, axis=0), np.repeat(labs, num, axis=0)
        # Pad the prompt count with copies of the first prompt (results sliced off below).
        size = transforms.bucket_size(num, min_bucket)
        pts, labs = transforms.pad_rows(pts, size), transforms.pad_rows(labs, size)
        # Always pass a mask prompt (zeros flagged absent when there is none: the official
        # no_mask_embed), so that prompts with and without masks share one compiled decoder.
        if masks is None:
            mask_in = self._zero_masks(size)
            has_mask = np.zeros((1, size), bool)
        else:
            mask_in, has_mask = transforms.pad_rows(masks, size)[None], np.ones((1, size), bool)
        low_res, iou = F._decode_prompts(
            self.model,
            self.params,
            features,
            pts[None],
            labs[None],
            mask_in,
            has_mask,
            multimask_output,
        )
        # Padded post-processing: images of similar sizes share one compiled version.
        out = F._postprocess_masks_padded(
            low_res[0],
            input_size,
            original_size,
            self.image_size,
            None if logits else 0.0,
            transforms.MASK_SIZE_MULTIPLE,
        )
        h, w = original_size
        out = np.ascontiguousarray(np.asarray(out)[:num, ..., :h, :w])
        return out, np.asarray(iou[0][:num]), np.asarray(low_res[0][:num])

    def _predict_tiled(self, coords, labels, boxes, masks, min_bucket, multimask_output, logits):
        """`_predict` in tiled mode: each prompt in its tile (`tiling.choose_tiles`), pasted."""
        grid = self.tiles.grid
        self.tile_ids = tiling.choose_tiles(grid, coords, boxes)

        def predict_tile(t, rows, offset):
            frame = (self.tiles.features[t], grid.outer_shape(t), self.tiles.input_sizes[t])
            c = None if coords is None else coords[rows] - offset
            b = None if boxes is None else boxes[rows] - np.tile(offset, 2)
            lab = None if labels is None else labels[rows]
            m = None if masks is None else masks[rows]
            return self._predict(
                c, lab, b, m, len(rows), min_bucket, multimask_output, logits, frame=frame
            )

        fill = -np.inf if logits else False
        return tiling.predict_in_tiles(grid, self.tile_ids, predict_tile, fill)


def default_multimask(points: Sequence[Point], box: Box | None) -> bool:
    """Three masks for a single point without a box (an ambiguous prompt), else one."""
    return len(points) == 1 and box is None


def segment(
    model,
    params,
    image: np.ndarray,
    points: Sequence[Point] = (),
    box: Box | None = None,
    multimask_output: bool | None = None,
    tile_shape=None,
    halo=None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(masks bool (C, H, W), predicted IoU (C,), multimask_output) for the prompts (tiled with
    tile_shape and halo, see `SamPredictor`)."""
    if not points and box is None:
        raise ValueError("give at least one point or a box")
    if multimask_output is None:
        multimask_output = default_multimask(points, box)
    coords = np.array([p[:2] for p in points], np.float64) if points else None
    labels = np.array([p[2] for p in points], np.int32) if points else None
    predictor = SamPredictor(model, params, tile_shape=tile_shape, halo=halo)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        box=None if box is None else np.array(box, np.float64),
        multimask_output=multimask_output,
    )
    return np.asarray(masks, bool), np.asarray(scores, np.float64), multimask_output
