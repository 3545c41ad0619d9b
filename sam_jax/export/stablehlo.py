"""`jax.export` (serialized StableHLO) of the decoder and the image encoder.

The decoder is the function of Meta's `SamOnnxModel` with a symbolic number of points N, up to
its mask post-processing: an output whose size is an input's VALUE (the original image size)
cannot be expressed with jax's static or symbolic shapes, so it returns the low-resolution
logits and the client resizes them (see `postprocess_masks` for the recipe):

    decoder(image_embeddings (1, D, g, g), point_coords (1, N, 2), point_labels (1, N),
            mask_input (1, 1, m, m), has_mask_input (1,))
        -> {"iou_predictions": (1, K), "low_res_masks": (1, K, m, m)}
    encoder(x (B, 3, S, S)) -> {"image_embeddings": (B, D, g, g)}

K = 4 (single-mask output first, then the three multimask outputs), or 1 with
return_single_mask; use_stability_score replaces the IoU predictions by the stability score of
the low-res masks, as `SamOnnxModel`. The files need only jax to run:

    exp = jax.export.deserialize(open("decoder.stablehlo", "rb").read())
    out = exp.call(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)

Weights. By default they are constants inside the serialization, which jax.export (a
flatbuffer) caps at 2 GiB: vit_h's encoder (2.5 GB) does not fit. With `weights_as_arguments`
the function takes the part's weights as its first arguments instead (`weight_arrays(params,
part)`: jax's flattening order of the params pytree), the serialization holds the graph only, and
`write_weights` stores them in a safetensors file beside it (a JSON header and raw
little-endian float32 data: readable with numpy and json alone, see `read_weights`, or with any
safetensors library in C++, Rust or JS):

    names, weights, _ = read_weights("encoder.stablehlo.safetensors")
    out = exp.call(*weights, x)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from sam_jax.amg.masks import calculate_stability_score
from sam_jax.export.signature import (
    MASK_THRESHOLD,
    SINGLE_MASK_MIN_POINTS,
    SINGLE_MASK_REWEIGHT,
    STABILITY_SCORE_OFFSET,
    STABLEHLO_WEIGHTS_SUFFIX,
)

# Lowered for all three by default, so a file written on a laptop runs on a GPU or TPU server.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# jax.export's serialization is a flatbuffer, which cannot exceed 2 GiB.
MAX_SERIALIZED_BYTES = 2**31 - 1
# Weights over this many bytes go to a file beside the export (vit_h's encoder, 2.5 GB; vit_l's,
# 1.2 GB, stays inside): this leaves room under the 2 GiB limit for the graph.
EXTERNAL_WEIGHTS_ABOVE = 1_500_000_000
# safetensors dtype names -> numpy (little-endian); the export writes F32 only.
SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}
PART_KEYS = {"encoder": ("image_encoder",), "decoder": ("prompt_encoder", "mask_decoder")}


def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
    if platforms is None:
        return DEFAULT_PLATFORMS
    if isinstance(platforms, str):
        platforms = [p for p in platforms.split(",") if p.strip()]
    out = tuple(p.strip().lower() for p in platforms)
    bad = [p for p in out if p not in PLATFORMS]
    if not out or bad:
        raise ValueError(f"platforms must be some of {PLATFORMS}, got {list(platforms)}")
    return tuple(dict.fromkeys(out))


def _decode(
    sam,
    image_embeddings,
    point_coords,
    point_labels,
    mask_input,
    has_mask_input,
    return_single_mask,
    use_stability_score,
):
    """`SamOnnxModel.forward` up to its post-processing, on a bound Flax `Sam` (NCHW in)."""
    pe = sam.prompt_encoder
    s = sam.config.image_size
    labels = point_labels[..., None]
    f32 = lambda cond: cond.astype(jnp.float32)
    sparse = pe.pe_layer.with_coords(point_coords + 0.5, (s, s)) * f32(labels != -1)
    sparse = sparse + pe.not_a_point_embed.embedding[0] * f32(labels == -1)
    for i in range(4):
        sparse = sparse + pe.point_embeddings[i].embedding[0] * f32(labels == i)
    dense = pe.embed_masks(mask_input[:, 0])  # (1, g, g, D)
    no_mask = pe.no_mask_embed.embedding[0]
    dense = has_mask_input * dense + (1 - has_mask_input) * no_mask
    src = jnp.transpose(image_embeddings, (0, 2, 3, 1))
    valid = jnp.ones(sparse.shape[:2], bool)
    masks, scores = sam.mask_decoder(src, pe.get_dense_pe(), sparse, valid, dense, None)
    if use_stability_score:
        scores = calculate_stability_score(masks, MASK_THRESHOLD, STABILITY_SCORE_OFFSET)
    if return_single_mask:
        num_points = jnp.asarray(point_coords.shape[1], jnp.float32)
        reweight = jnp.zeros(scores.shape[1], jnp.float32).at[0].set(SINGLE_MASK_REWEIGHT)
        best = jnp.argmax(scores + (num_points - SINGLE_MASK_MIN_POINTS) * reweight, axis=1)
        masks = jnp.take_along_axis(masks, best[:, None, None, None], axis=1)
        scores = jnp.take_along_axis(scores, best[:, None], axis=1)
    return {"iou_predictions": scores, "low_res_masks": masks}


def decoder_function(model, params, return_single_mask: bool = False, use_stability_score=False):
    """The decoder as a jax function of the five arrays (params closed over)."""

    def decoder(image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        return model.apply(
            {"params": params},
            image_embeddings,
            point_coords,
            point_labels,
            mask_input,
            has_mask_input,
            bool(return_single_mask),
            bool(use_stability_score),
            method=_decode,
        )

    return decoder


def encoder_function(model, params):
    """The image encoder as a jax function x (B, 3, S, S) -> {"image_embeddings": (B, D, g, g)}."""

    def encoder(x):
        emb = model.apply({"params": params}, jnp.transpose(x, (0, 2, 3, 1)), method=model.encode)
        return {"image_embeddings": jnp.transpose(emb, (0, 3, 1, 2))}

    return encoder


def _device_params(params):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def part_params(params, part: str) -> dict:
    """The params a part uses: the encoder's `image_encoder`, the decoder's `prompt_encoder` and
    `mask_decoder`."""
    return {k: params[k] for k in PART_KEYS[part]}


def weight_arrays(params, part: str) -> list[tuple[str, object]]:
    """(name, array) of each weight of `part` in the order of the exported function's arguments
    (jax's flattening order of `part_params`), named by its params path
    (`image_encoder/blocks_0/attn/qkv/kernel`, as the ONNX initializers)."""
    leaves = jax.tree_util.tree_flatten_with_path(part_params(params, part))[0]
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _export(make_fn, params, part, args, platforms, weights_as_arguments: bool):
    """`jax.export` of `make_fn(params)(*args)`: params closed over (constants in the file), or
    the part's taken as the first arguments (only their shapes are used: they may be
    ShapeDtypeStructs)."""

    platforms = check_platforms(platforms)
    if not weights_as_arguments:
        return export.export(jax.jit(make_fn(_device_params(params))), platforms=platforms)(*args)
    leaves, treedef = jax.tree_util.tree_flatten(part_params(params, part))
    n = len(leaves)

    def fn(*flat):
        return make_fn(jax.tree_util.tree_unflatten(treedef, flat[:n]))(*flat[n:])

    specs = [jax.ShapeDtypeStruct(np.shape(x), jnp.float32) for x in leaves]
    return export.export(jax.jit(fn), platforms=platforms)(*specs, *args)


def export_decoder(
    model,
    params,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    platforms: Sequence[str] | None = None,
    weights_as_arguments: bool = False,
):
    """`jax.export.Exported` of the decoder, N symbolic ("num_points"); with
    `weights_as_arguments`, `weight_arrays(params, "decoder")` come first."""

    c = model.config
    d, g, m = c.prompt_embed_dim, c.embedding_size, c.low_res_size
    (n,) = export.symbolic_shape("num_points")
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (f32(1, d, g, g), f32(1, n, 2), f32(1, n), f32(1, 1, m, m), f32(1))
    make = lambda p: decoder_function(model, p, return_single_mask, use_stability_score)
    return _export(make, params, "decoder", args, platforms, weights_as_arguments)


def export_encoder(
    model, params, platforms: Sequence[str] | None = None, weights_as_arguments: bool = False
):
    """`jax.export.Exported` of the image encoder, the batch B symbolic ("batch"); with
    `weights_as_arguments`, `weight_arrays(params, "encoder")` come first."""

    s = model.config.image_size
    (batch,) = export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, 3, s, s), jnp.float32)
    make = lambda p: encoder_function(model, p)
    return _export(make, params, "encoder", (spec,), platforms, weights_as_arguments)


def serialize(exported) -> bytes:
    """The bytes of a `jax.export.Exported` (ValueError, one line, past the 2 GiB limit)."""
    try:
        data = exported.serialize()
    except Exception as e:  # flatbuffers raises its own types on overflow
        raise ValueError(f"cannot serialize the export: {type(e).__name__}: {e}") from None
    if len(data) > MAX_SERIALIZED_BYTES:
        raise ValueError(f"the export is {len(data)} bytes, over jax.export's 2 GiB limit")
    return bytes(data)


def weights_path(path: str | os.PathLike) -> str:
    """Where an export's external weights go: `<path>.safetensors` beside it."""
    return f"{os.fspath(path)}{STABLEHLO_WEIGHTS_SUFFIX}"


def write_weights(file, named_arrays, metadata: dict[str, str] | None = None) -> int:
    """Writes (name, array) pairs to `file` (opened for writing) as safetensors, as float32, the
    data in the given order; `__metadata__` gets `metadata` and `sam_jax.arguments` (the names in
    that order, as JSON). One array is converted at a time. Returns the bytes written.

    The format (https://huggingface.co/docs/safetensors): an unsigned little-endian 64-bit
    header size H; H bytes of JSON {name: {"dtype": "F32", "shape": [...], "data_offsets":
    [begin, end]}, "__metadata__": {str: str}}, padded with spaces so the data starts at a
    multiple of 8; then the data, offsets relative to its start (8 + H), no gaps."""
    named_arrays = list(named_arrays)
    names = [name for name, _ in named_arrays]
    if len(set(names)) != len(names):
        raise ValueError("weight names must be unique")
    meta = {**(metadata or {}), "sam_jax.arguments": json.dumps(names)}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("safetensors metadata must map str to str")
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, x in named_arrays:
        shape = [int(d) for d in np.shape(x)]
        size = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    file.write(len(raw).to_bytes(8, "little"))
    file.write(raw)
    for _, x in named_arrays:
        file.write(memoryview(np.ascontiguousarray(np.asarray(x), "<f4")).cast("B"))
    return 8 + len(raw) + offset


def read_weights(path: str | os.PathLike) -> tuple[list[str], list[np.ndarray], dict[str, str]]:
    """(names, arrays, metadata) of a safetensors file, the arrays in the order of their data
    in the file: for an export's weights file, its arguments' order. numpy and json only (the
    recipe a client without sam_jax follows)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = header.pop("__metadata__", {})
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    arrays = []
    for _, entry in entries:
        begin, end = entry["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        count = (end - begin) // dtype.itemsize
        x = np.fromfile(path, dtype, count=count, offset=8 + size + begin)
        arrays.append(x.reshape(entry["shape"]))
    return [name for name, _ in entries], arrays, metadata


def postprocess_masks(low_res_masks, orig_im_size, image_size: int) -> np.ndarray:
    """What the ONNX graph does after the decoder, for clients of the StableHLO file (numpy):
    bilinear (half-pixel, no antialiasing) to (S, S), crop to the resized size
    floor(S / max(H, W) * (H, W) + 0.5), bilinear to (H, W). Returns float32 logits."""
    x = np.asarray(low_res_masks, np.float32)
    h, w = (int(v) for v in orig_im_size)
    scale = np.float32(image_size) / np.float32(max(h, w))
    ph, pw = (int(np.floor(scale * np.float32(v) + np.float32(0.5))) for v in (h, w))
    x = resize_bilinear(x, (image_size, image_size))[..., :ph, :pw]
    return resize_bilinear(x, (h, w))


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch `F.interpolate(x, size, mode="bilinear", align_corners=False)` in numpy (the last
    two axes; half-pixel centres, source index clamped at 0, no antialiasing)."""
    out = np.asarray(x, np.float32)
    for axis, new in ((-2, size[0]), (-1, size[1])):
        old = out.shape[axis]
        src = (np.arange(new, dtype=np.float32) + 0.5) * np.float32(old / new) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), old - 1)
        i1 = np.minimum(i0 + 1, old - 1)
        frac = (src - i0).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = new
        frac = frac.reshape(shape)
        a, b = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
        out = a * (1 - frac) + b * frac
    return out.astype(np.float32)
