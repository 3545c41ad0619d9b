"""Pre- and post-processing of SAM inputs and outputs, as in the official `SamPredictor`.

Pre-processing (numpy, on the host): resize the longest image side to the model input size S
(`ResizeLongestSide`: PIL bilinear on uint8), scale prompt coordinates the same way, normalise with
the pixel mean/std and zero-pad bottom/right to S x S.

Post-processing (jax, jit-able): low-resolution mask logits (..., 4g, 4g) -> bilinear to S x S ->
crop to the resized input size -> bilinear to the original image size. Both resizes use PyTorch's
`F.interpolate(mode="bilinear", align_corners=False)` rule (half-pixel centres, source index
clamped at 0, two taps, no antialiasing), evaluated in float32 like the official code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sam_jax.config import PIXEL_MEAN, PIXEL_STD

try:
    from jax.experimental import layout as _layout
except ImportError:  # older jax: no layout constraints (only slower on CPU)
    _layout = None


def to_host(x):
    """x as given, except a torch tensor (on any device), which becomes a numpy array. Only
    when the caller has imported torch: sam_jax never imports it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
    """Size (newh, neww) of an (oldh, oldw) image whose longest side is resized to long_side_length.

    scale = long_side / max(h, w); new = int(dim * scale + 0.5), exactly as the official code.
    """
    scale = long_side_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    return int(newh + 0.5), int(neww + 0.5)


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Returns `image` as a numpy array after checking it is a non-empty (H, W, 3) uint8 array."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 with values in 0..255, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


def as_float_array(x, name: str) -> np.ndarray:
    """x (numpy, jax, torch or nested lists) as finite float64 numpy (ValueError otherwise)."""
    try:
        arr = np.asarray(to_host(x), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def check_resized_image(image, image_size: int, original_size, name: str):
    """A (3, h, w) image already resized by `ResizeLongestSide.apply_image` (numpy, jax or torch;
    uint8 or float values) and its original (H, W) -> (HWC float array, (H, W), (h, w)).

    (h, w) must be what `apply_image` makes of (H, W), so that a missing resize, a channels-last
    image or a swapped original_size is an error rather than wrong masks."""
    x = as_float_array(image, name)
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
    expected = get_preprocess_shape(size[0], size[1], image_size)
    if input_size != expected:
        raise ValueError(
            f"{name} of size {input_size} is not an image of original_size {size} resized to "
            f"long side {image_size} (expected {expected}): resize with ResizeLongestSide"
            f"({image_size}).apply_image and pass the (H, W) of the image before resizing"
        )
    return x.transpose(1, 2, 0), size, input_size


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resizes a uint8 (H, W, 3) image so that its longest side is `long_side`.

    Identical to the official `ResizeLongestSide.apply_image`: a PIL bilinear resize of the uint8
    image (PIL antialiases when downsampling). Returns uint8 (newh, neww, 3).
    """
    return _resize_longest_side(check_image(image), long_side)


def _resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """`resize_longest_side` of an image that passed `check_image`."""
    newh, neww = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    if newh == 0 or neww == 0:
        raise ValueError(f"image of shape {image.shape} is too elongated to resize to {long_side}")
    pil = Image.fromarray(np.ascontiguousarray(image), mode=None)
    return np.array(pil.resize((neww, newh), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: Sequence[int], long_side: int) -> np.ndarray:
    """Maps (x, y) coordinates (..., 2) of an original (H, W) image to the resized input frame.

    x is scaled by new_w / old_w and y by new_h / old_h, in float64 like the official numpy path.
    Shapes are not checked (as the official `ResizeLongestSide`): callers validate prompts at
    their public boundary (`SamPredictor`, `functional.pack_image_prompts`).
    """
    old_h, old_w = int(original_size[0]), int(original_size[1])
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)  # copy
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray, original_size: Sequence[int], long_side: int) -> np.ndarray:
    """Maps XYXY boxes (..., 4) of an original (H, W) image to the resized input frame (shapes
    not checked, see `apply_coords`)."""
    boxes = np.asarray(boxes)
    out = apply_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side)
    return out.reshape(boxes.shape)


def normalize_and_pad(image: np.ndarray, image_size: int) -> np.ndarray:
    """Normalises a resized (h, w, 3) image (uint8, or float values in 0..255) and zero-pads it
    bottom/right to (S, S, 3).

    (x - PIXEL_MEAN) / PIXEL_STD in float32, as the official `Sam.preprocess`. Returns float32.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
        raise ValueError(f"image must be a non-empty (h, w, 3) array, got {image.shape}")
    h, w = image.shape[:2]
    if h > image_size or w > image_size:
        raise ValueError(f"image of size {(h, w)} does not fit in the {image_size} model input")
    mean = np.asarray(PIXEL_MEAN, np.float32)
    std = np.asarray(PIXEL_STD, np.float32)
    out = np.zeros((image_size, image_size, 3), np.float32)
    out[:h, :w] = (image.astype(np.float32) - mean) / std
    return out


def preprocess_image(image: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize-longest-side + normalise + pad of an image that passed `check_image` (its callers,
    `SamPredictor.set_image` and `functional.preprocess_images`, check it once). Returns float32
    (S, S, 3) and the resized (h, w)."""
    resized = _resize_longest_side(image, image_size)
    return normalize_and_pad(resized, image_size), (resized.shape[0], resized.shape[1])


def _bilinear_taps(in_size: int, out_size: int, n_out: int | None = None):
    """Source indices and weights of PyTorch's bilinear (align_corners=False) resize along one axis.

    Mirrors aten's `area_pixel_compute_source_index` in float32: src = max(scale * (dst + 0.5)
    - 0.5, 0) with scale = in / out (float32, the product and subtraction rounded once as aten's
    fused multiply-add does); i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0.
    Only the first n_out output positions are returned (used to fuse the crop).
    """
    n_out = out_size if n_out is None else n_out
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    # aten evaluates scale * dst - 0.5 with a fused multiply-add: one rounding to float32.
    src = (scale.astype(np.float64) * dst.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0).astype(np.int32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def _weighted_taps(x: jnp.ndarray, axis: int, taps) -> jnp.ndarray:
    """w0 * x[i0] + w1 * x[i1] along `axis` (-1 or -2) for taps (i0, i1, w0, w1), in x's dtype."""
    i0, i1, w0, w1 = taps
    shape = (-1,) if axis == -1 else (-1, 1)
    w0, w1 = jnp.asarray(w0, x.dtype).reshape(shape), jnp.asarray(w1, x.dtype).reshape(shape)
    return w0 * jnp.take(x, i0, axis=axis) + w1 * jnp.take(x, i1, axis=axis)


def resize_bilinear(
    x: jnp.ndarray, size: Sequence[int], crop: Sequence[int] | None = None
) -> jnp.ndarray:
    """Bilinear resize of the last two axes (..., h, w) -> (..., H, W), no antialiasing.

    Matches `torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)` for
    both up- and downsampling. With `crop=(ch, cw)` returns only the top-left (ch, cw) corner of the
    resized array (computed directly, without materialising the full result).
    """
    in_h, in_w = x.shape[-2], x.shape[-1]
    out_h, out_w = int(size[0]), int(size[1])
    n_h, n_w = (out_h, out_w) if crop is None else (int(crop[0]), int(crop[1]))
    x = _resize_axis(x, -1, in_w, out_w, n_w)
    return _resize_axis(x, -2, in_h, out_h, n_h)


def _resize_axis(x: jnp.ndarray, axis: int, in_size: int, out_size: int, keep: int):
    """One pass of `resize_bilinear` along `axis`, its first `keep` outputs. A resize to the same
    size has the taps (i, i + 1, 1, 0), the identity, so it is computed as a slice."""
    if in_size == out_size:
        return jax.lax.slice_in_dim(x, 0, keep, axis=axis % x.ndim)
    return _weighted_taps(x, axis, _bilinear_taps(in_size, out_size, keep))


def postprocess_masks(
    low_res_masks: jnp.ndarray,
    input_size: Sequence[int],
    original_size: Sequence[int],
    image_size: int,
) -> jnp.ndarray:
    """Upscales low-res mask logits to the original image size (official `Sam.postprocess_masks`).

    low_res_masks (..., 4g, 4g) float logits -> bilinear to (S, S) -> crop to input_size (h, w)
    -> bilinear to original_size (H, W). Returns float32 logits (..., H, W); threshold at 0.0 to
    get masks. Pure jax with static sizes (jit-able, vmap-able).
    """
    x = jnp.asarray(low_res_masks, jnp.float32)
    x = resize_bilinear(x, (image_size, image_size), crop=input_size)
    return resize_bilinear(x, original_size)


# ----------------------------------------------------------------------------- padded sizes
# Mask sizes are padded to multiples of MASK_SIZE_MULTIPLE (`padded_mask_sizes`) to bound the
# number of compiled versions (prompt counts are bucketed in `sam_jax.prompts`). Padded pixels
# never change the results of the real ones.

# Mask post-processing (`SamPredictor`, `functional.postprocess_masks_padded`, the automatic mask
# generator's crops) runs at output sizes, and over resized input extents, rounded up to this
# multiple, so that images (and crops) of similar sizes share one compiled version.
MASK_SIZE_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-int(n) // multiple) * multiple


def padded_mask_sizes(
    input_size: Sequence[int],
    output_size: Sequence[int],
    image_size: int,
    multiple: int = MASK_SIZE_MULTIPLE,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padded sizes of the post-processing of an `input_size` (h, w) -> `output_size` (H, W)
    resize: (padded (Hp, Wp) = output size rounded up to `multiple`, resized (h', w') = input size
    rounded up to `multiple`, at most image_size: the extent of the first resize computed)."""
    padded = (round_up(output_size[0], multiple), round_up(output_size[1], multiple))
    resized = tuple(min(int(image_size), round_up(n, multiple)) for n in input_size[:2])
    return padded, resized


def padded_taps(in_size: int, out_size: int, padded: int) -> tuple[np.ndarray, ...]:
    """Taps (i0, i1, w0, w1) of an in_size -> out_size bilinear resize (the official rule, see
    `_bilinear_taps`), zero-padded to `padded` outputs: padded outputs read index 0 with weight 0,
    so resizes to different sizes share one compiled function."""
    pad = padded - out_size
    if pad < 0:
        raise ValueError(f"padded size {padded} is smaller than the output size {out_size}")
    return tuple(np.pad(t, (0, pad)) for t in _bilinear_taps(in_size, out_size))


def resize_taps(
    in_hw: Sequence[int], out_hw: Sequence[int], padded_hw: Sequence[int]
) -> dict[str, tuple[np.ndarray, ...]]:
    """Row and column taps of an (h, w) -> (H, W) resize padded to padded_hw (`padded_taps`)."""
    return {
        "rows": padded_taps(in_hw[0], out_hw[0], padded_hw[0]),
        "cols": padded_taps(in_hw[1], out_hw[1], padded_hw[1]),
    }


def _row_major(x):
    """Pins x to the row-major layout. Without it XLA:CPU keeps the gathers' transposed layouts
    and the reductions that follow run some 20x slower."""
    if _layout is None:
        return x
    return _layout.with_layout_constraint(x, _layout.Layout(tuple(range(x.ndim))))


def interp_taps(x: jnp.ndarray, axis: int, taps) -> jnp.ndarray:
    """One bilinear pass along `axis` (-1 or -2) with taps (i0, i1, w0, w1) (numpy or traced
    arrays), computed as `resize_bilinear` does, with a row-major result."""
    return _row_major(_weighted_taps(x, axis, taps))


def postprocess_masks_with_taps(
    low_res_masks: jnp.ndarray, taps: dict, image_size: int, resized: Sequence[int]
) -> jnp.ndarray:
    """`postprocess_masks` with the second resize given as padded taps (`resize_taps` from the
    input size to the original size): float32 logits (..., Hp, Wp) whose top-left (H, W) equal
    `postprocess_masks`'s (padded rows and columns are 0). The first resize (to S x S) is computed
    over its top-left `resized` (h', w') >= the input size only."""
    x = jnp.asarray(low_res_masks, jnp.float32)
    m_h, m_w = x.shape[-2], x.shape[-1]
    x = interp_taps(x, -1, _bilinear_taps(m_w, image_size, int(resized[1])))
    x = interp_taps(x, -2, _bilinear_taps(m_h, image_size, int(resized[0])))
    x = interp_taps(x, -1, taps["cols"])
    return interp_taps(x, -2, taps["rows"])
