"""SamPredictor: the official `segment_anything.SamPredictor` API on top of `sam_jax.functional`.

Set an image once (the image encoder runs once), then predict masks for any number of prompts.
Inputs and outputs are numpy, in original-image pixel coordinates, exactly as the official class.
Prompt tokens and prompt counts are padded to power-of-two buckets (PAD_LABEL slots and copies of
the first prompt, which do not change results), so a changing number of points or prompts compiles
only a few decoder versions. This is the one padding layer of the inference path: callers (the
evaluation protocol, the detections scorer) pass their real rows. Inputs are validated here, once;
the `sam_jax.functional` internals called afterwards do not check them again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import transforms


class ResizeLongestSide:
    """The official `ResizeLongestSide` (numpy parts): image resize and coordinate mapping."""

    def __init__(self, target_length: int):
        self.target_length = int(target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        return transforms.resize_longest_side(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size) -> np.ndarray:
        return transforms.apply_coords(coords, original_size, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size) -> np.ndarray:
        return transforms.apply_boxes(
            np.asarray(boxes).reshape(-1, 4), original_size, self.target_length
        )

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return transforms.get_preprocess_shape(oldh, oldw, long_side_length)


def _as_float_array(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_points(coords, labels, batch: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validates (B, N, 2) coords and (B, N) labels (or (N, 2)/(N,) when batch is None)."""
    lead = "N" if batch is None else "B, N"
    if labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied")
    coords = _as_float_array(coords, "point_coords")
    try:
        labels_f = np.asarray(labels, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError("point_labels must be numeric") from e
    ndim = 1 if batch is None else 2
    if coords.ndim != ndim + 1 or coords.shape[-1] != 2:
        raise ValueError(f"point_coords must have shape ({lead}, 2), got {coords.shape}")
    if labels_f.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels shape {labels_f.shape} does not match point_coords {coords.shape}"
        )
    if not np.all(np.isin(labels_f, (0, 1))):
        raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
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


class SamPredictor:
    """Official-style predictor: `set_image` once, then `predict` / `predict_batch`.

    model: a `sam_jax.modeling.Sam` (from `build_sam` or `sam_jax.load`); params: its params.
    min_batch_bucket: `predict_batch` pads the number of prompts B to a power of two of at least
    this (padded rows are dropped from the outputs), so that batches of 1..8 prompts share one
    compiled version; `predict` (one prompt) is not padded.
    """

    def __init__(self, model, params, min_batch_bucket: int = 8):
        self.model = model
        self.min_batch_bucket = int(min_batch_bucket)
        # Host (numpy) leaves go to the device once, not on every call.
        self.params = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params
        )
        self.image_size = model.config.image_size
        self.low_res_size = model.config.low_res_size
        self.transform = ResizeLongestSide(self.image_size)
        self._zeros = {}
        self.reset_image()

    # ----------------------------------------------------------------------- image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of a uint8 (H, W, 3) image in "RGB" or "BGR" channel order."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = transforms.check_image(image)
        if image_format == "BGR":
            image = image[..., ::-1]
        x, input_size = transforms.preprocess_image(image, self.image_size)
        self.reset_image()
        self.features = F._encode(self.model, self.params, x[None])
        self.original_size = (int(image.shape[0]), int(image.shape[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self):
        """The embedding of the current image: jax array (1, g, g, D) (NHWC)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to get an embedding.")
        return self.features

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None

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

        point_coords (N, 2) xy pixels, point_labels (N,) in {0, 1}; box (4,) XYXY; mask_input
        (1, m, m) low-res logits from a previous call. Returns masks (C, H, W) (bool, or float32
        logits with return_logits), iou (C,) and low-res logits (C, m, m); C = 3 or 1.
        """
        self._require_image()
        coords = labels = boxes = masks = None
        if point_coords is not None:
            coords, labels = _check_points(point_coords, point_labels, None)
            coords, labels = coords[None], labels[None]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if box is not None:
            boxes = _check_boxes(box, batch=False)
        if mask_input is not None:
            masks = self._check_mask_input(mask_input, (1,), "(1, {m}, {m})")
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
        """B prompts on the current image in one call (official `predict_torch`, but taking
        original-image coordinates like `predict`).

        point_coords (B, N, 2), point_labels (B, N); boxes (B, 4) XYXY; mask_input (B, 1, m, m)
        (or (B, m, m)). Returns masks (B, C, H, W), iou (B, C), low-res logits (B, C, m, m).
        """
        self._require_image()
        coords = labels = box_arr = masks = None
        sizes = {}
        if point_coords is not None:
            coords, labels = _check_points(point_coords, point_labels, batch=True)
            sizes["point_coords"] = coords.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if boxes is not None:
            box_arr = _check_boxes(boxes, batch=True)
            sizes["boxes"] = box_arr.shape[0]
        if mask_input is not None:
            m = np.asarray(mask_input)
            if m.ndim == 3:
                m = m[:, None]
            masks = self._check_mask_input(m, (m.shape[0], 1), "(B, 1, {m}, {m})")[:, 0]
            sizes["mask_input"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"predict_batch inputs disagree on the batch size: {sizes}")
        if not sizes:
            raise ValueError("predict_batch needs point_coords, boxes or mask_input")
        num = next(iter(sizes.values()))
        if num == 0:
            raise ValueError("predict_batch got an empty batch (B = 0)")
        bucket = self.min_batch_bucket
        return self._predict(
            coords, labels, box_arr, masks, num, bucket, multimask_output, return_logits
        )

    # ----------------------------------------------------------------------- internals

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _check_mask_input(self, mask_input, lead: tuple[int, ...], expected: str) -> np.ndarray:
        m = self.low_res_size
        arr = _as_float_array(mask_input, "mask_input")
        if arr.shape != (*lead, m, m):
            raise ValueError(f"mask_input must have shape {expected.format(m=m)}, got {arr.shape}")
        return arr.astype(np.float32)

    def _zero_masks(self, num: int):
        """Device-resident zeros (1, num, m, m), cached per size (no host transfer per call)."""
        if num not in self._zeros:
            m = self.low_res_size
            self._zeros[num] = jnp.zeros((1, num, m, m), jnp.float32)
        return self._zeros[num]

    def _predict(self, coords, labels, boxes, masks, num, min_bucket, multimask_output, logits):
        """coords (P, N, 2) / labels (P, N) / boxes (P, 4) in original pixels; masks (P, m, m);
        all validated by the caller. P = num prompts, padded to bucket_size(num, min_bucket)."""
        tokens = (0 if coords is None else coords.shape[1] + (boxes is None)) + (
            0 if boxes is None else 2
        )
        pts, labs = F._pack_image_prompts(
            self.original_size,
            self.image_size,
            coords,
            labels,
            boxes,
            pad_to=transforms.bucket_size(tokens),
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
            self.features,
            pts[None],
            labs[None],
            mask_in,
            has_mask,
            bool(multimask_output),
        )
        # Padded post-processing: images of similar sizes share one compiled version.
        out = F._postprocess_masks_padded(
            low_res[0],
            self.input_size,
            self.original_size,
            self.image_size,
            None if logits else 0.0,
            transforms.MASK_SIZE_MULTIPLE,
        )
        h, w = self.original_size
        out = np.ascontiguousarray(np.asarray(out)[:num, ..., :h, :w])
        return out, np.asarray(iou[0][:num]), np.asarray(low_res[0][:num])
