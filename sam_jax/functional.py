"""Functional SAM inference: pure functions of (model, params, arrays).

Shapes and layouts (S = config.image_size, g = S / patch_size, D = prompt_embed_dim, m = 4g):

- images: uint8 (H, W, 3) RGB originals; model inputs float32 (B, S, S, 3), normalised and
  zero-padded bottom/right (`preprocess_images`).
- embeddings: float32 (B, g, g, D) (`encode_images`); images larger than the model input can be
  encoded per tile (`encode_image_tiled`, `sam_jax.tiling`).
- prompts: points (B, P, N, 2) float32 (x, y) in the S x S input frame and labels (B, P, N) int32:
  B images, P prompts per image, N tokens per prompt. Labels: 1 fg point, 0 bg point, -1 official
  padding point, 2/3 box top-left/bottom-right corner, PAD_LABEL (-10) ignored slot. Prompts of
  different kinds or sizes are padded to a common N with PAD_LABEL (`pack_image_prompts`,
  `stack_prompts`), which does not change their results.
- decoder outputs: low-res logits (B, P, C, m, m), IoU predictions (B, P, C); C = 3 with
  multimask_output else 1 (`decode_prompts`).
- masks: logits or bool (..., H, W) at the original image size (`postprocess_masks`).

`encode_images`, `decode_prompts` and `postprocess_masks` are jitted (one cache per model and
static arguments; flax modules are hashable) and may be called inside a user's `jax.jit` or under
`jax.vmap`. The pre-processing helpers are numpy (host side); prompts are checked and packed in
`sam_jax.prompts` (`pack_image_prompts`, `stack_prompts` and `bucket_size` are re-exported here).
Many prompts go through the decoder and the post-processing `prompt_chunk()` at a time (64 on a
CPU), so memory stays bounded whatever their number.

`decode_image_prompts` is the one decode path of checked prompts on one image (buckets, the
absent-mask default, post-processing, numpy outputs): `SamPredictor`, `SamModel.__call__` and,
through the predictor, the evaluation protocols and the annotation tool call it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import tiling, transforms
from sam_jax.errors import ConfigError, check_bool
from sam_jax.prompts import (
    ImagePrompts,
    bucket_size,
    bucketed_tokens,
    pack_image_prompts,
    pad_rows,
    stack_prompts,
)
from sam_jax.text import check_text_path
from sam_jax.transforms import MASK_SIZE_MULTIPLE

__all__ = [
    "bucket_size",
    "decode_image_prompts",
    "decode_prompts",
    "encode_image_tiled",
    "encode_images",
    "encode_tiles",
    "pack_image_prompts",
    "postprocess_masks",
    "postprocess_masks_padded",
    "preprocess_images",
    "stack_prompts",
]


# --------------------------------------------------------------------------- images


def preprocess_images(
    images: Sequence[np.ndarray], image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize-longest-side, normalise and pad a list of uint8 (H_i, W_i, 3) RGB images.

    Returns images float32 (B, S, S, 3), input_sizes int32 (B, 2) (resized (h, w) before padding)
    and original_sizes int32 (B, 2) ((H, W) of each original).
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise ValueError("preprocess_images takes a list of (H, W, 3) images, got one image")
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    out = np.zeros((len(images), image_size, image_size, 3), np.float32)
    input_sizes = np.zeros((len(images), 2), np.int32)
    original_sizes = np.zeros((len(images), 2), np.int32)
    for i, image in enumerate(images):
        image = transforms.check_image(image, f"images[{i}]")
        out[i], input_sizes[i] = transforms.preprocess_image(image, image_size)
        original_sizes[i] = image.shape[:2]
    return out, input_sizes, original_sizes


@functools.partial(jax.jit, static_argnames=("model", "one_at_a_time"))
def _encode(model, params, images, one_at_a_time=False):
    if one_at_a_time and images.shape[0] > 1:
        one = lambda x: model.apply({"params": params}, x[None], method=model.encode)[0]  # noqa: E731
        return jax.lax.map(one, images)
    return model.apply({"params": params}, images, method=model.encode)


def encode_images(model, params, images: jax.Array, one_at_a_time: bool | None = None) -> jax.Array:
    """Image encoder: images (B, S, S, 3) float32 (from `preprocess_images`) -> (B, g, g, D).

    one_at_a_time: encode the batch one image after the other inside the one jitted call
    (`lax.map`), the same function; None: on a CPU only, where one image's activations stay in
    cache (8 MobileSAM images took 16.9 s this way against 21.5 s as one batch on this project's
    2-core AMD EPYC, 2026-12-06, loaded); accelerators take the batch at once."""
    s = model.config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
        raise ValueError(f"images must have shape (B, {s}, {s}, 3), got {tuple(images.shape)}")
    if one_at_a_time is None:
        one_at_a_time = jax.default_backend() == "cpu"
    return _encode(model, params, images, one_at_a_time=bool(one_at_a_time))


def encode_image_tiled(
    model, params, image: np.ndarray, tile_shape: Sequence[int], halo: Sequence[int]
) -> tiling.TiledEmbeddings:
    """Tiled image encoder (micro_sam's tiled embeddings) for images larger than the model input.

    image uint8 (H, W, 3) RGB; tile_shape and halo (h, w) pixels (`tiling.check_tiling`). Every
    tile-with-halo `grid.outer[t]` is resized, normalised and padded to one (1, S, S, 3) input
    and encoded on its own, so every image size compiles the encoder once and device memory
    holds one tile's activations at a time. Returns `tiling.TiledEmbeddings`: features[t]
    (1, g, g, D). To decode: `tiling.choose_tiles`, then the prompts shifted by the tile's
    (x0, y0) through `pack_image_prompts` / `decode_prompts` / `postprocess_masks` with the
    tile's outer size, then `tiling.paste` (what `SamPredictor(..., tile_shape, halo)` does).
    """
    spec = tiling.check_tiling(tile_shape, halo)
    if spec is None:
        raise ConfigError("encode_image_tiled needs tile_shape and halo")
    image = transforms.check_image(transforms.to_host(image))
    return encode_tiles(model, params, image, tiling.TileGrid.build(image.shape[:2], *spec))


def encode_tiles(model, params, image: np.ndarray, grid: tiling.TileGrid):
    """`encode_image_tiled` of an image that passed `transforms.check_image`, on a built grid."""
    features, input_sizes = [], []
    for t in range(grid.num_tiles):
        x, input_size = transforms.preprocess_image(grid.crop(image, t), model.config.image_size)
        features.append(encode_images(model, params, jnp.asarray(x[None])))
        input_sizes.append(input_size)
        if t:  # at most two tiles in flight
            features[t - 1].block_until_ready()
    return tiling.TiledEmbeddings(grid, features, input_sizes)


# --------------------------------------------------------------------------- prompts


# Prompts (and their masks) go through the mask decoder and the post-processing this many at a
# time, under `lax.map`: every prompt carries its own copy of the (g, g, D) image embedding and a
# (4g, 4g, D / 8) upscaled map, and its masks at the original size. On a CPU a chunk of 64 (the
# official automatic mask generator's points_per_batch) bounds memory, so that 1024 prompts at
# 768 x 1024 fit in a few GB; elsewhere larger chunks keep an accelerator busy. On a TPU, 1024
# prompts at once need 23.7 GiB (vit_h's decoder, compiled for one v5e: 16 GiB), 256 fit.
PROMPT_CHUNK = {"cpu": 64, "tpu": 256}
PROMPT_CHUNK_DEFAULT = 1024


def prompt_chunk() -> int:
    """Prompts per pass of the mask decoder and post-processing on the default backend."""
    return PROMPT_CHUNK.get(jax.default_backend(), PROMPT_CHUNK_DEFAULT)


def map_prompt_chunks(fn, args: Sequence, axis: int, chunk: int):
    """fn(*args) computed `chunk` prompts at a time along `axis` of every array in args (None
    passes through) under `lax.map`, with the outputs (a pytree, prompts along the same axis)
    put back together. The prompt count is padded to a multiple of chunk with copies of prompt
    0, whose outputs are dropped. With at most `chunk` prompts: fn(*args) itself."""
    p = next(a.shape[axis] for a in args if a is not None)
    if p <= chunk:
        return fn(*args)
    n = -(-p // chunk)

    def split(a):  # (..., P, ...) -> (n, ..., chunk, ...)
        if a is None:
            return None
        if n * chunk != p:
            first = jax.lax.slice_in_dim(a, 0, 1, axis=axis)
            reps = [1] * a.ndim
            reps[axis] = n * chunk - p
            a = jnp.concatenate([a, jnp.tile(first, reps)], axis=axis)
        a = a.reshape(*a.shape[:axis], n, chunk, *a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    def join(o):  # (n, ..., chunk, ...) -> (..., P, ...)
        o = jnp.moveaxis(o, 0, axis)
        o = o.reshape(*o.shape[:axis], n * chunk, *o.shape[axis + 2 :])
        return jax.lax.slice_in_dim(o, 0, p, axis=axis)

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
    return jax.tree.map(join, out)


@functools.partial(jax.jit, static_argnames=("model", "multimask_output", "chunk"))
def _decode(
    model, params, emb, points, labels, mask_input, has_mask, multimask_output, chunk,
    text=None, has_text=None,
):  # fmt: skip
    def decode(points, labels, mask_input, has_mask, text, has_text):
        return model.apply(
            {"params": params},
            emb,
            points,
            labels,
            mask_input,
            has_mask,
            multimask_output,
            text,
            has_text,
            method=model.decode,
        )

    args = (points, labels, mask_input, has_mask, text, has_text)
    return map_prompt_chunks(decode, args, 1, chunk)


def decode_prompts(
    model,
    params,
    image_embeddings: jax.Array,
    points: jax.Array,
    labels: jax.Array,
    mask_input: jax.Array | None = None,
    has_mask: jax.Array | None = None,
    multimask_output: bool | None = True,
    text_embeddings: jax.Array | None = None,
    has_text: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Prompt encoder + mask decoder for P prompts on each of B images.

    image_embeddings (B, g, g, D); points (B, P, N, 2) float32 xy in the input frame; labels
    (B, P, N) int32; mask_input (B, P, m, m) float32 logits or None; has_mask (B, P) bool or None
    (None: every prompt has its mask). multimask_output: True (C = 3 masks), False (C = 1) or None
    (C = 4 from one decoder pass: the single-mask output, then the three multimask outputs).
    text_embeddings (B, P, E) CLIP embeddings (`sam_jax.text.TextEncoder.embed_texts`) for a
    model with a text path (config.text_embed_dim = E), has_text (B, P) bool or None (all):
    one more token per prompt (a text-only prompt is points of the padding point alone, label
    -1, as `pack_image_prompts` makes it). Returns low_res (B, P, C, m, m) logits and iou (B, P, C).
    """
    _check_decode_inputs(model, image_embeddings, points, labels, mask_input, has_mask)
    _check_text_inputs(model, labels, text_embeddings, has_text)
    if multimask_output is not None:
        check_bool("multimask_output", multimask_output)
    return _decode_prompts(
        model, params, image_embeddings, points, labels, mask_input, has_mask, multimask_output,
        text_embeddings, has_text,
    )  # fmt: skip


def _check_text_inputs(model, labels, text_embeddings, has_text) -> None:
    if text_embeddings is None:
        if has_text is not None:
            raise ValueError("has_text given without text_embeddings")
        return
    check_text_path(model)
    e = model.config.text_embed_dim
    if tuple(text_embeddings.shape) != (*labels.shape[:2], e):
        raise ValueError(
            f"text_embeddings must be {(*labels.shape[:2], e)}, got {tuple(text_embeddings.shape)}"
        )
    if has_text is not None and tuple(has_text.shape) != tuple(labels.shape[:2]):
        raise ValueError(f"has_text must be {tuple(labels.shape[:2])}, got {has_text.shape}")


def _check_decode_inputs(model, image_embeddings, points, labels, mask_input, has_mask) -> None:
    c = model.config
    g, d, m = c.embedding_size, c.prompt_embed_dim, c.low_res_size
    if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != (g, g, d):
        raise ValueError(
            f"image_embeddings must be (B, {g}, {g}, {d}), got {tuple(image_embeddings.shape)}"
        )
    b = image_embeddings.shape[0]
    if labels.ndim != 3 or labels.shape[0] != b:
        raise ValueError(f"labels must be ({b}, P, N), got {tuple(labels.shape)}")
    if tuple(points.shape) != (*labels.shape, 2):
        raise ValueError(f"points must be {(*labels.shape, 2)}, got {tuple(points.shape)}")
    if mask_input is not None and tuple(mask_input.shape) != (*labels.shape[:2], m, m):
        raise ValueError(
            f"mask_input must be {(*labels.shape[:2], m, m)}, got {tuple(mask_input.shape)}"
        )
    if has_mask is not None:
        if mask_input is None:
            raise ValueError("has_mask given without mask_input")
        if tuple(has_mask.shape) != tuple(labels.shape[:2]):
            raise ValueError(f"has_mask must be {tuple(labels.shape[:2])}, got {has_mask.shape}")


def _decode_prompts(
    model, params, image_embeddings, points, labels, mask_input, has_mask, multimask_output,
    text=None, has_text=None,
):  # fmt: skip
    """`decode_prompts` without checks: the shapes must be those its docstring gives."""
    points = jnp.asarray(points, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if mask_input is not None:
        mask_input = jnp.asarray(mask_input, jnp.float32)
    if has_mask is not None:
        has_mask = jnp.asarray(has_mask, bool)
    if text is not None:
        text = jnp.asarray(text, jnp.float32)
        has_text = None if has_text is None else jnp.asarray(has_text, bool)
    return _decode(
        model,
        params,
        image_embeddings,
        points,
        labels,
        mask_input,
        has_mask,
        None if multimask_output is None else bool(multimask_output),
        prompt_chunk(),
        text,
        has_text,
    )


@functools.lru_cache(maxsize=32)
def _absent_masks(num: int, m: int) -> jax.Array:
    """Zero mask prompts (1, num, m, m) flagged absent, made once per size on the device."""
    return jnp.zeros((1, num, m, m), jnp.float32)


def decode_image_prompts(
    model,
    params,
    image_embedding: jax.Array,
    prompts: ImagePrompts,
    original_size: Sequence[int],
    input_size: Sequence[int],
    multimask_output: bool = True,
    return_logits: bool = False,
    min_bucket: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks for P checked prompts on one image: the one decode path of an image's prompts.

    image_embedding (1, g, g, D) of an image of original (H, W) `original_size` resized to
    (h, w) `input_size`; prompts from `sam_jax.prompts.ImagePrompts` (original-image pixels or,
    with prompts.input_frame, the input frame). Token counts are padded to power-of-two buckets
    and P to bucket_size(P, min_bucket) (padded rows are dropped), and prompts without a mask
    get the official no-mask embedding, so prompts of many kinds and counts share a few compiled
    decoders. prompts.text_embeddings (a model with a text path only) add the text token.
    Returns numpy masks (P, C, H, W) (bool, or float32 logits with return_logits),
    iou (P, C) and low-res logits (P, C, m, m); C = 3 with multimask_output, else 1.
    """
    multimask_output = check_bool("multimask_output", multimask_output)
    return_logits = check_bool("return_logits", return_logits)
    image_size, m = model.config.image_size, model.config.low_res_size
    points, labels, size = bucketed_tokens(prompts, original_size, image_size, min_bucket)
    # Always pass a mask prompt (zeros flagged absent when there is none: the official
    # no_mask_embed), so that prompts with and without masks share one compiled decoder.
    if prompts.mask_input is None:
        mask_in, has_mask = _absent_masks(size, m), np.zeros((1, size), bool)
    else:
        mask_in = pad_rows(prompts.mask_input, size)[None]
        has_mask = np.ones((1, size), bool)
    text = None
    if prompts.text_embeddings is not None:
        check_text_path(model)
        text = pad_rows(prompts.text_embeddings, size)[None]
    low_res, iou = _decode_prompts(
        model,
        params,
        image_embedding,
        points[None],
        labels[None],
        mask_in,
        has_mask,
        multimask_output,
        text,
    )
    # Padded post-processing: images of similar sizes share one compiled version.
    out = _postprocess_masks_padded(
        low_res[0],
        input_size,
        original_size,
        image_size,
        None if return_logits else 0.0,
        MASK_SIZE_MULTIPLE,
    )
    h, w, num = int(original_size[0]), int(original_size[1]), prompts.num
    masks = np.ascontiguousarray(np.asarray(out)[:num, ..., :h, :w])
    return masks, np.asarray(iou[0][:num]), np.asarray(low_res[0][:num])


# --------------------------------------------------------------------------- masks


@functools.partial(
    jax.jit,
    static_argnames=("input_size", "original_size", "image_size", "mask_threshold", "chunk"),
)
def _postprocess(low_res, input_size, original_size, image_size, mask_threshold, chunk):
    def upscale(x):
        return transforms.postprocess_masks(x, input_size, original_size, image_size)

    return _map_mask_chunks(upscale, low_res, mask_threshold, chunk)


def _map_mask_chunks(upscale, low_res, mask_threshold, chunk):
    """upscale ((L, m, m) -> (L, H, W) logits) over chunks of the (..., m, m) low-res masks, 3
    masks for each of `chunk` prompts at a time, thresholded (when mask_threshold is not None)
    and reshaped back to (..., H, W)."""

    def run(x):
        logits = upscale(x)
        return logits if mask_threshold is None else logits > mask_threshold

    lead = low_res.shape[:-2]
    out = map_prompt_chunks(run, (low_res.reshape(-1, *low_res.shape[-2:]),), 0, 3 * chunk)
    return out.reshape(*lead, *out.shape[1:])


def _postprocess_sizes(low_res_masks, input_size, original_size, image_size):
    input_size = (int(input_size[0]), int(input_size[1]))
    original_size = (int(original_size[0]), int(original_size[1]))
    if low_res_masks.ndim < 2:
        raise ValueError(f"low_res_masks must be (..., m, m), got {tuple(low_res_masks.shape)}")
    if not (0 < input_size[0] <= image_size and 0 < input_size[1] <= image_size):
        raise ValueError(f"input_size {input_size} must fit in the {image_size} model input")
    if min(original_size) <= 0:
        raise ValueError(f"original_size must be positive, got {original_size}")
    return input_size, original_size


def postprocess_masks(
    low_res_masks: jax.Array,
    input_size: Sequence[int],
    original_size: Sequence[int],
    image_size: int,
    mask_threshold: float | None = None,
) -> jax.Array:
    """Low-res logits (..., m, m) -> logits (..., H, W) at original_size (official post-processing).

    Bilinear to (S, S), crop to input_size (h, w), bilinear to original_size (H, W); no
    antialiasing. With mask_threshold (SAM uses 0.0) returns bool masks `logits > threshold`.
    Sizes are static (Python ints): each new size compiles a new version (see
    `postprocess_masks_padded` for many image sizes).
    """
    input_size, original_size = _postprocess_sizes(
        low_res_masks, input_size, original_size, image_size
    )
    thr = None if mask_threshold is None else float(mask_threshold)
    return _postprocess(
        low_res_masks, input_size, original_size, int(image_size), thr, prompt_chunk()
    )


@functools.partial(jax.jit, static_argnames=("image_size", "resized", "mask_threshold", "chunk"))
def _postprocess_padded(low_res, taps, image_size, resized, mask_threshold, chunk):
    def upscale(x):
        return transforms.postprocess_masks_with_taps(x, taps, image_size, resized)

    return _map_mask_chunks(upscale, low_res, mask_threshold, chunk)


def postprocess_masks_padded(
    low_res_masks: jax.Array,
    input_size: Sequence[int],
    original_size: Sequence[int],
    image_size: int,
    mask_threshold: float | None = None,
    multiple: int = MASK_SIZE_MULTIPLE,
) -> jax.Array:
    """`postprocess_masks` at sizes rounded up to `multiple`, for images of many sizes.

    Returns (..., Hp, Wp) with (Hp, Wp) = original_size rounded up to `multiple`; its top-left
    (H, W) corner is `postprocess_masks`'s result (slice it off on the host); padded logits are 0.
    The resize taps are arguments rather than constants, so all images whose padded
    sizes agree share one compiled version (eval.py over COCO, `SamPredictor`).
    """
    input_size, original_size = _postprocess_sizes(
        low_res_masks, input_size, original_size, image_size
    )
    return _postprocess_masks_padded(
        low_res_masks, input_size, original_size, image_size, mask_threshold, multiple
    )


def _postprocess_masks_padded(
    low_res_masks, input_size, original_size, image_size, mask_threshold, multiple
):
    """`postprocess_masks_padded` without checks: input_size within the model input, positive
    original_size (pairs of ints)."""
    padded, resized = transforms.padded_mask_sizes(input_size, original_size, image_size, multiple)
    taps = transforms.resize_taps(input_size, original_size, padded)
    thr = None if mask_threshold is None else float(mask_threshold)
    return _postprocess_padded(low_res_masks, taps, int(image_size), resized, thr, prompt_chunk())


def compiled_versions() -> dict[str, int]:
    """Number of compiled versions of each jitted function (for tests and diagnostics)."""
    return {
        "encode": _encode._cache_size(),
        "decode": _decode._cache_size(),
        "postprocess": _postprocess._cache_size(),
        "postprocess_padded": _postprocess_padded._cache_size(),
    }
