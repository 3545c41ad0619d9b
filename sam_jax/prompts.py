"""The one home of a prompt: its checks, its coordinate frames, its packing into decoder tokens and
the buckets that bound recompilation. Host-side numpy; nothing here compiles.

A prompt on one image is points (N, 2) xy with labels (N,) in {1 foreground, 0 background}, a box
(4,) XYXY, a previous low-res mask (m, m) of logits, or several of these together. P prompts on
one image are checked into an `ImagePrompts` (what `SamPredictor`, `SamModel.__call__` and the
evaluation protocols decode through `functional.decode_image_prompts`).

Coordinates are in one of two frames:

- original-image pixels (`SamPredictor.predict` / `predict_batch`, the official `predict`);
- the resized model-input frame (longest side = `image_size`, 1024 for SAM), as the official
  `predict_torch` and `Sam.forward` take them, made by `ResizeLongestSide.apply_coords` /
  `apply_boxes`, which return `ResizedCoords` arrays that record their frame, so that
  coordinates are never mapped twice by mistake.

Decoder tokens (`pack_prompts`): points (P, T, 2) float32 in the input frame and labels (P, T)
int32, in the official order: the points, a padding point (label -1) when there is no box, then
the box's two corners (labels 2 and 3). Slots labelled PAD_LABEL are ignored by the decoder, so
prompts of different sizes pad to a common T (`bucket_size`) without changing their results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sam_jax import transforms
from sam_jax.modeling.prompt_encoder import NOT_A_POINT_LABEL, PAD_LABEL
from sam_jax.transforms import as_float_array, to_host

# Prompts are padded to at least this many rows (a power of two) by `SamPredictor.predict_batch`
# and `SamModel.__call__`, so that batches of 1..8 prompts share one compiled decoder.
DEFAULT_MIN_BUCKET = 8

Point = tuple[float, float, int]  # x, y (pixels of the original image), label 1 fg / 0 bg
Box = tuple[float, float, float, float]  # x0, y0, x1, y1

__all__ = [
    "NOT_A_POINT_LABEL",
    "PAD_LABEL",
    "Box",
    "ImagePrompts",
    "Point",
    "ResizeLongestSide",
    "ResizedCoords",
    "bucket_size",
    "check_prompts",
    "default_multimask",
    "pack_image_prompts",
    "pack_prompts",
    "pad_rows",
    "stack_prompts",
]


# --------------------------------------------------------------------------- frames


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


def refuse_resized(x, what: str, method: str) -> None:
    """The trap of the official API: predict / predict_batch take original-image pixels, so
    coordinates mapped by `transform.apply_*` would be mapped twice (wrong masks, no error)."""
    if isinstance(x, ResizedCoords):
        mapper = "apply_boxes" if what == "boxes" else "apply_coords"
        raise ValueError(
            f"these {what} were mapped by transform.{mapper} to the {x.target_length}-px input "
            f"frame: pass them to predict_torch, or pass original-image pixels to {method}"
        )


def check_frame(x, what: str, image_size: int) -> None:
    """Input-frame coordinates (predict_torch, SamModel) tagged for another frame size."""
    if isinstance(x, ResizedCoords) and x.target_length not in (None, image_size):
        raise ValueError(
            f"these {what} were mapped to a {x.target_length}-px frame but the model input is "
            f"{image_size} px: map them with ResizeLongestSide({image_size}) (predictor.transform)"
        )


# --------------------------------------------------------------------------- checks


def check_points(
    coords, labels, batch: bool, padding: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validates (B, N, 2) coords and (B, N) labels (or (N, 2) / (N,) without batch); with
    padding, label -1 (the official padding point of batched prompts) is allowed too. Returns
    float64 coords and int32 labels."""
    lead = "B, N" if batch else "N"
    if labels is None:
        raise ValueError("point_labels must be supplied if point_coords is supplied")
    coords = as_float_array(coords, "point_coords")
    try:
        labels_f = np.asarray(to_host(labels), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError("point_labels must be numeric") from e
    ndim = 2 if batch else 1
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


def check_boxes(boxes, batch: bool) -> np.ndarray:
    """(B, 4) XYXY boxes, or one box of 4 numbers without batch -> float64 (B or 1, 4)."""
    boxes = as_float_array(boxes, "boxes" if batch else "box")
    if batch and (boxes.ndim != 2 or boxes.shape[-1] != 4):
        raise ValueError(f"boxes must have shape (B, 4), got {boxes.shape}")
    if not batch:
        if boxes.size != 4 or boxes.ndim > 2 or (boxes.ndim == 2 and boxes.shape[0] != 1):
            raise ValueError(f"box must be 4 numbers XYXY, got shape {boxes.shape}")
        boxes = boxes.reshape(1, 4)
    if np.any(boxes[:, 0] > boxes[:, 2]) or np.any(boxes[:, 1] > boxes[:, 3]):
        raise ValueError("box must be XYXY with x0 <= x1 and y0 <= y1")
    return boxes


def check_mask_input(mask_input, m: int, lead: tuple[int, ...], expected: str) -> np.ndarray:
    """Low-res mask logits of shape (*lead, m, m) -> float32. A bool or integer array is a
    binary mask, not logits (using it as 0/1 logits gives wrong masks without an error): it is
    refused with what to pass instead."""
    kind = np.asarray(to_host(mask_input)).dtype
    if kind.kind in "biu":
        raise ValueError(
            f"mask_input must be low-res mask logits (float), got a {kind.name} mask: pass the "
            "low_res logits a previous predict returned (a binary mask is not logits)"
        )
    arr = as_float_array(mask_input, "mask_input")
    if arr.shape != (*lead, m, m):
        raise ValueError(f"mask_input must have shape {expected.format(m=m)}, got {arr.shape}")
    return arr.astype(np.float32)


def check_prompts(
    point_coords=None, point_labels=None, boxes=None, pad_to: int | None = None
) -> int | None:
    """Checks the prompt arrays of P prompts on one image; returns their token count T (None
    without points and boxes).

    point_coords (P, N, 2) with point_labels (P, N), and/or boxes (P, 4), agreeing on P;
    pad_to, if given, at least T. Only shapes are checked (values are left as given).
    """
    num = tokens = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        pc, pl = np.shape(point_coords), np.shape(point_labels)
        if len(pc) != 3 or pc[-1] != 2 or pl != pc[:2]:
            raise ValueError(
                f"point_coords must be (P, N, 2) and point_labels (P, N); got {pc} and {pl}"
            )
        num, tokens = pc[0], pc[1] + (boxes is None)
    elif point_labels is not None:
        raise ValueError("point_labels given without point_coords")
    if boxes is not None:
        bx = np.shape(boxes)
        if len(bx) != 2 or bx[-1] != 4:
            raise ValueError(f"boxes must be (P, 4), got {bx}")
        if num is not None and bx[0] != num:
            raise ValueError(f"{bx[0]} boxes for {num} point prompts")
        num, tokens = bx[0], (tokens or 0) + 2
    if tokens is not None and pad_to is not None and pad_to < tokens:
        raise ValueError(f"pad_to={pad_to} is smaller than the {tokens} prompt tokens")
    return tokens


@dataclasses.dataclass(frozen=True)
class ImagePrompts:
    """P checked prompts on one image (every field agrees on P; None where the kind is absent).

    point_coords (P, N, 2) float64 xy and point_labels (P, N) int32; boxes (P, 4) float64 XYXY;
    mask_input (P, m, m) float32 logits; text_embeddings (P, E) float32 CLIP embeddings (text
    prompts, for a SAM with a text path). Coordinates are original-image pixels, or with
    input_frame already in the resized model-input frame. Without points and boxes every prompt
    is the official "no sparse prompt" (a mask-only or prompt-free decode); a text prompt
    without a box is followed by the padding point, as points are (and as SAM was trained).
    """

    point_coords: np.ndarray | None
    point_labels: np.ndarray | None
    boxes: np.ndarray | None
    mask_input: np.ndarray | None
    num: int
    input_frame: bool = False
    text_embeddings: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        """Decoder tokens of each prompt (points, padding point or box corners; the text token
        is apart)."""
        if self.point_coords is None:
            if self.boxes is None:
                return 0 if self.text_embeddings is None else 1
            return 2
        return self.point_coords.shape[1] + (1 if self.boxes is None else 2)

    @classmethod
    def single(
        cls, low_res_size: int, point_coords=None, point_labels=None, box=None, mask_input=None,
        text_embedding=None,
    ) -> ImagePrompts:  # fmt: skip
        """One prompt as the official `SamPredictor.predict` takes it: point_coords (N, 2) xy
        pixels with point_labels (N,) in {0, 1}; box (4,) XYXY; mask_input (1, m, m) logits;
        text_embedding (E,) a CLIP embedding. As officially, no prompt at all is accepted (the
        prompt-free embedding)."""
        refuse_resized(point_coords, "point_coords", "predict")
        refuse_resized(box, "boxes", "predict")
        coords = labels = boxes = masks = None
        if point_coords is not None:
            coords, labels = check_points(point_coords, point_labels, batch=False)
            coords, labels = coords[None], labels[None]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if box is not None:
            boxes = check_boxes(box, batch=False)
        if mask_input is not None:
            masks = check_mask_input(mask_input, low_res_size, (1,), "(1, {m}, {m})")
        text = None
        if text_embedding is not None:
            text = check_text_embeddings(text_embedding, None).reshape(1, -1)
        return cls(coords, labels, boxes, masks, 1, text_embeddings=text)

    @classmethod
    def batch(
        cls,
        low_res_size: int,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        who: str = "predict_batch",
        input_frame: bool = False,
        allow_none: bool = False,
        text_embeddings=None,
    ) -> ImagePrompts:
        """B prompts: point_coords (B, N, 2) with point_labels (B, N), boxes (B, 4), mask_input
        (B, 1, m, m) or (B, m, m), agreeing on B. input_frame (the official `predict_torch` and
        `Sam.forward` inputs) allows label -1 (padding points); with allow_none (`Sam.forward`)
        no prompt at all is one prompt (B = 1). `who` names the caller in errors."""
        coords = labels = box_arr = masks = None
        sizes = {}
        if point_coords is not None:
            coords, labels = check_points(point_coords, point_labels, True, padding=input_frame)
            sizes["point_coords"] = coords.shape[0]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if boxes is not None:
            box_arr = check_boxes(boxes, batch=True)
            sizes["boxes"] = box_arr.shape[0]
        if mask_input is not None:
            m = np.asarray(to_host(mask_input))
            if m.ndim == 3:
                m = m[:, None]
            m = check_mask_input(m, low_res_size, (m.shape[0], 1), "(B, 1, {m}, {m})")
            masks = m[:, 0]
            sizes["mask_input"] = masks.shape[0]
        text = None
        if text_embeddings is not None:
            text = check_text_embeddings(text_embeddings, "B")
            sizes["texts"] = text.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{who} inputs disagree on the batch size: {sizes}")
        if not sizes:
            if allow_none:
                return cls(None, None, None, None, 1, input_frame)
            raise ValueError(f"{who} needs point_coords, boxes or mask_input (or texts)")
        num = next(iter(sizes.values()))
        if num == 0:
            raise ValueError(f"{who} got an empty batch (B = 0)")
        return cls(coords, labels, box_arr, masks, num, input_frame, text)

    def select(self, rows: np.ndarray, offset: np.ndarray | None = None) -> ImagePrompts:
        """The prompts `rows`, with (x, y) `offset` subtracted from their coordinates (a tile's
        corner in tiled prediction)."""
        off = np.zeros(2) if offset is None else np.asarray(offset, np.float64)

        def pick(x, shift=None):
            return None if x is None else (x[rows] if shift is None else x[rows] - shift)

        return ImagePrompts(
            pick(self.point_coords, off),
            pick(self.point_labels),
            pick(self.boxes, np.tile(off, 2)),
            pick(self.mask_input),
            len(rows),
            self.input_frame,
            pick(self.text_embeddings),
        )


def default_multimask(points: Sequence[Point], box: Box | None, text: bool = False) -> bool:
    """Three masks for a single point or a text alone (an ambiguous prompt), else one."""
    return len(points) + bool(text) == 1 and box is None


def check_text_embeddings(x, lead: str | None) -> np.ndarray:
    """CLIP embeddings: (E,) without lead, else (lead, E) -> float32."""
    arr = as_float_array(x, "text_embeddings")
    if arr.ndim != (1 if lead is None else 2) or arr.shape[-1] == 0:
        want = "(E,)" if lead is None else f"({lead}, E)"
        raise ValueError(f"text embeddings must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(np.linalg.norm(arr, axis=-1) == 0):
        raise ValueError("text embeddings must be finite and non-zero")
    return arr.astype(np.float32)


# --------------------------------------------------------------------------- packing


def pack_prompts(
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Builds decoder prompt tokens in the official order, for P prompts of one image.

    point_coords (P, N, 2) and point_labels (P, N), boxes (P, 4) XYXY, all in the input frame.
    Returns points (P, T, 2) float32 and labels (P, T) int32 with T = N (+1 padding point when there
    is no box, as the official prompt encoder) (+2 box corners), padded with PAD_LABEL to `pad_to`.
    """
    if check_prompts(point_coords, point_labels, boxes, pad_to) is None:
        raise ValueError("pack_prompts needs point_coords or boxes")
    return pack_input_prompts(point_coords, point_labels, boxes, pad_to)


def pack_input_prompts(point_coords, point_labels, boxes, pad_to=None):
    """`pack_prompts` without checks (the arguments satisfy `check_prompts`). With neither
    points nor boxes: P = 1 prompt made only of PAD_LABEL slots (the official "no sparse
    prompt", e.g. a mask-only prompt)."""
    if point_coords is None and boxes is None:
        n = 1 if pad_to is None else pad_to
        return np.zeros((1, n, 2), np.float32), np.full((1, n), PAD_LABEL, np.int32)
    parts_xy, parts_lab = [], []
    num = None
    if point_coords is not None:
        pc = np.asarray(point_coords, np.float32)
        num = pc.shape[0]
        parts_xy.append(pc)
        parts_lab.append(np.asarray(point_labels, np.int32))
        if boxes is None:
            parts_xy.append(np.zeros((num, 1, 2), np.float32))
            parts_lab.append(np.full((num, 1), NOT_A_POINT_LABEL, np.int32))
    if boxes is not None:
        bx = np.asarray(boxes, np.float32)
        num = bx.shape[0]
        parts_xy.append(bx.reshape(num, 2, 2))
        parts_lab.append(np.tile(np.array([[2, 3]], np.int32), (num, 1)))
    xy = np.concatenate(parts_xy, axis=1)
    lab = np.concatenate(parts_lab, axis=1)
    if pad_to is not None and pad_to > xy.shape[1]:
        extra = pad_to - xy.shape[1]
        xy = np.concatenate([xy, np.zeros((num, extra, 2), np.float32)], axis=1)
        lab = np.concatenate([lab, np.full((num, extra), PAD_LABEL, np.int32)], axis=1)
    return xy, lab


def pack_image_prompts(
    original_size: Sequence[int],
    image_size: int,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens of P prompts on one image, from original-image coordinates.

    point_coords (P, N, 2) xy and point_labels (P, N) and/or boxes (P, 4) XYXY, in pixels of the
    original (H, W) image. Coordinates are mapped to the input frame as the official
    `ResizeLongestSide`, then packed in the official token order (`pack_prompts`). With neither
    points nor boxes, returns P = 1 prompt made only of PAD_LABEL slots (the official "no sparse
    prompt", e.g. a mask-only prompt). Returns points (P, T, 2) float32, labels (P, T).
    """
    check_prompts(point_coords, point_labels, boxes, pad_to)
    if point_coords is not None:
        point_coords = transforms.apply_coords(point_coords, original_size, image_size)
    if boxes is not None:
        boxes = transforms.apply_boxes(boxes, original_size, image_size)
    return pack_input_prompts(point_coords, point_labels, boxes, pad_to)


def stack_prompts(
    per_image: Sequence[Any],
    num_prompts: int | None = None,
    num_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacks the prompts of B images into one padded batch.

    per_image[i] is (points (P_i, T_i, 2), labels (P_i, T_i)) as from `pack_image_prompts`, or a
    list of such pairs (prompts of different kinds on one image; they are concatenated along P).
    Tokens are padded with PAD_LABEL to N = max T (or num_tokens); prompts to P = max P_i (or
    num_prompts) with copies of the image's first prompt, so that padded rows are valid inputs.
    Returns points (B, P, N, 2) float32, labels (B, P, N) int32 and valid (B, P) bool (False on
    padded prompts, whose outputs are to be ignored).
    """
    if len(per_image) == 0:
        raise ValueError("stack_prompts needs at least one image")
    groups = []
    for i, item in enumerate(per_image):
        chunks = [item] if isinstance(item, tuple) else list(item)
        if not chunks:
            raise ValueError(f"image {i} has no prompts")
        checked = []
        for pts, lab in chunks:
            pts, lab = np.asarray(pts, np.float32), np.asarray(lab, np.int32)
            if lab.ndim != 2 or pts.shape != (*lab.shape, 2):
                raise ValueError(f"image {i}: points {pts.shape} and labels {lab.shape} disagree")
            checked.append((pts, lab))
        groups.append(checked)
    all_chunks = [c for g in groups for c in g]
    n = max(lab.shape[1] for _, lab in all_chunks) if num_tokens is None else num_tokens
    sizes = [sum(lab.shape[0] for _, lab in g) for g in groups]
    p = max(sizes) if num_prompts is None else num_prompts
    b = len(groups)
    points = np.zeros((b, p, n, 2), np.float32)
    labels = np.full((b, p, n), PAD_LABEL, np.int32)
    valid = np.zeros((b, p), bool)
    for i, g in enumerate(groups):
        if sizes[i] == 0 or sizes[i] > p or max(lab.shape[1] for _, lab in g) > n:
            raise ValueError(f"image {i}: its prompts do not fit in ({p} prompts, {n} tokens)")
        row = 0
        for pts, lab in g:
            pi, ti = lab.shape
            points[i, row : row + pi, :ti], labels[i, row : row + pi, :ti] = pts, lab
            row += pi
        points[i, row:], labels[i, row:] = points[i, :1], labels[i, :1]
        valid[i, :row] = True
    return points, labels, valid


# --------------------------------------------------------------------------- buckets


def bucket_size(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): the padded size used to limit recompilation."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """x padded along axis 0 to `size` rows with copies of its first row (valid inputs whose
    outputs are dropped). Returns x itself when it already has `size` rows."""
    x = np.asarray(x)
    if len(x) == size:
        return x
    if len(x) == 0 or len(x) > size:
        raise ValueError(f"cannot pad {len(x)} rows to {size}")
    return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)], axis=0)


def bucketed_tokens(
    prompts: ImagePrompts, original_size: Sequence[int], image_size: int, min_bucket: int = 1
) -> tuple[np.ndarray, np.ndarray, int]:
    """The decoder tokens of `prompts`, bucketed: points (Pb, Tb, 2) float32 and labels (Pb, Tb)
    int32 in the input frame, with Tb = bucket_size(T) (PAD_LABEL slots) and Pb =
    bucket_size(P, min_bucket) (copies of the first prompt, whose outputs are to be dropped).
    Returns (points, labels, Pb)."""
    pad_to = bucket_size(prompts.num_tokens)
    if prompts.input_frame:
        coords, boxes = prompts.point_coords, prompts.boxes
    else:
        coords = boxes = None
        if prompts.point_coords is not None:
            coords = transforms.apply_coords(prompts.point_coords, original_size, image_size)
        if prompts.boxes is not None:
            boxes = transforms.apply_boxes(prompts.boxes, original_size, image_size)
    pts, labs = pack_input_prompts(coords, prompts.point_labels, boxes, pad_to)
    if pts.shape[0] != prompts.num:  # no sparse prompt: the same all-padding tokens for each
        pts, labs = np.repeat(pts, prompts.num, axis=0), np.repeat(labs, prompts.num, axis=0)
    if coords is None and boxes is None and prompts.text_embeddings is not None:
        labs[:, 0] = NOT_A_POINT_LABEL  # a text alone: then the padding point
    size = bucket_size(prompts.num, min_bucket)
    return pad_rows(pts, size), pad_rows(labs, size), size
