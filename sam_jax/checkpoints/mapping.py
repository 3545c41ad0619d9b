"""Mapping between official PyTorch SAM state_dicts and sam_jax params (pure numpy).

One table (`_module_table`) lists every module of a SAM built from a `SamConfig`, in official
state_dict order, with its PyTorch type and sizes. Everything else derives from it:

- torch key -> flax path (the naming rule): `a.b.3.c.weight` -> `a/b_3/c/<leaf>`, a numeric
  ModuleList/Sequential index joins the previous name with `_`;
- leaf name and layout per module type:
  Linear `weight (out, in)` -> `kernel (in, out)`; Conv2d `weight (out, in, kh, kw)` ->
  `kernel (kh, kw, in, out)`; ConvTranspose2d `weight (in, out, kh, kw)` ->
  `kernel (kh, kw, in, out)` (no spatial flip); LayerNorm(2d) `weight` -> `scale`;
  Embedding `weight` -> `embedding`; `bias` -> `bias`; plain tensors (pos_embed, rel_pos_h/w,
  the PE gaussian matrix) keep their name and layout;
- expected shapes, so that a missing, unexpected or mis-shaped key is named.

Only `.shape` of the state_dict values is read by `check_state_dict` and `infer_config`, so
they also accept torch tensors (including meta tensors).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from sam_jax.config import SamConfig
from sam_jax.modeling.tiny_vit import attention_bias_index

# Official decoder num_heads; it cannot be inferred from the weights.
DEFAULT_DECODER_NUM_HEADS = 8


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor: its torch key and shape, its flax path and how to change its layout."""

    torch_key: str
    torch_shape: tuple[int, ...]
    flax_path: tuple[str, ...]
    layout: str  # "same" | "linear" | "conv" | "conv_transpose"

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(_to_flax_axes(self.layout, self.torch_shape))


# Per layout: the axis permutation from torch to flax (None = unchanged).
_PERMUTATIONS = {
    "same": None,
    "linear": (1, 0),
    "conv": (2, 3, 1, 0),
    "conv_transpose": (2, 3, 0, 1),
}


def _to_flax_axes(layout: str, shape: tuple[int, ...]) -> list[int]:
    perm = _PERMUTATIONS[layout]
    return list(shape) if perm is None else [shape[i] for i in perm]


def to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
    perm = _PERMUTATIONS[layout]
    return x if perm is None else np.ascontiguousarray(np.transpose(x, perm))


def to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    perm = _PERMUTATIONS[layout]
    return x if perm is None else np.ascontiguousarray(np.transpose(x, np.argsort(perm)))


def flax_path(torch_key: str, leaf_name: str | None = None) -> tuple[str, ...]:
    """`a.b.3.c.weight` -> ('a', 'b_3', 'c', leaf_name or 'weight')."""
    parts = torch_key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    path.append(leaf_name or parts[-1])
    return tuple(path)


# ----------------------------------------------------------------------------------------------
# The module table.

# The text prompt's projection (SAM paper D.5; Meta released no text path, so no official key):
# `prompt_encoder.text_projection.{weight (D, E), bias (D,)}` in .pth files we write and read.
TEXT_PROJECTION = "text_projection"


def _linear(prefix: str, n_in: int, n_out: int, bias: bool = True):
    yield prefix + ".weight", (n_out, n_in), "kernel", "linear"
    if bias:
        yield prefix + ".bias", (n_out,), "bias", "same"


def _conv(prefix: str, n_in: int, n_out: int, k: int, bias: bool = True):
    yield prefix + ".weight", (n_out, n_in, k, k), "kernel", "conv"
    if bias:
        yield prefix + ".bias", (n_out,), "bias", "same"


def _conv_transpose(prefix: str, n_in: int, n_out: int, k: int):
    yield prefix + ".weight", (n_in, n_out, k, k), "kernel", "conv_transpose"
    yield prefix + ".bias", (n_out,), "bias", "same"


def _norm(prefix: str, dim: int):
    yield prefix + ".weight", (dim,), "scale", "same"
    yield prefix + ".bias", (dim,), "bias", "same"


def _embedding(prefix: str, num: int, dim: int):
    yield prefix + ".weight", (num, dim), "embedding", "same"


def _param(key: str, shape: tuple[int, ...]):
    yield key, tuple(shape), None, "same"


def _unused(key: str, shape: tuple[int, ...], fill: float | int):
    """A tensor of the official state_dict that the model never reads (not in params): optional
    when reading, written as `fill` (int64 when `fill` is an int, float32 otherwise)."""
    yield key, tuple(shape), fill, "unused"


def _batch_norm(prefix: str, dim: int):
    """BatchNorm2d: weight -> scale, bias, and the running statistics (buffers, kept by name).
    num_batches_tracked is read and dropped (no effect in inference mode, nor in training with
    the default momentum) and written as 0."""
    yield prefix + ".weight", (dim,), "scale", "same"
    yield prefix + ".bias", (dim,), "bias", "same"
    yield prefix + ".running_mean", (dim,), None, "same"
    yield prefix + ".running_var", (dim,), None, "same"
    yield from _unused(prefix + ".num_batches_tracked", (), 0)


def _conv_bn(prefix: str, n_in: int, n_out: int, k: int, groups: int = 1):
    """TinyViT's Conv2d_BN: `c` a bias-free Conv2d, `bn` a BatchNorm2d."""
    yield prefix + ".c.weight", (n_out, n_in // groups, k, k), "kernel", "conv"
    yield from _batch_norm(prefix + ".bn", n_out)


def _mlp(prefix: str, n_in: int, hidden: int, n_out: int, num_layers: int):
    """mask_decoder.MLP: `layers.{i}` Linear layers."""
    h = [hidden] * (num_layers - 1)
    for i, (a, b) in enumerate(zip([n_in] + h, h + [n_out], strict=True)):
        yield from _linear(f"{prefix}.layers.{i}", a, b)


def _decoder_attention(prefix: str, dim: int, downsample_rate: int):
    internal = dim // downsample_rate
    for name in ("q_proj", "k_proj", "v_proj"):
        yield from _linear(f"{prefix}.{name}", dim, internal)
    yield from _linear(f"{prefix}.out_proj", internal, dim)


def encoder_block_window(config: SamConfig, i: int) -> int:
    """Attention window of encoder block i: 0 for global attention (as in the official code)."""
    return 0 if i in config.encoder_global_attn_indexes else config.window_size


def _vit_encoder_table(c: SamConfig):
    """SAM's ViTDet image encoder (encoder_type "vit")."""
    e, g, d = c.encoder_embed_dim, c.embedding_size, c.prompt_embed_dim
    p = "image_encoder"
    yield from _param(f"{p}.pos_embed", (1, g, g, e))
    yield from _conv(f"{p}.patch_embed.proj", 3, e, c.patch_size)
    for i in range(c.encoder_depth):
        b = f"{p}.blocks.{i}"
        size = encoder_block_window(c, i) or g
        yield from _norm(f"{b}.norm1", e)
        yield from _param(f"{b}.attn.rel_pos_h", (2 * size - 1, c.encoder_head_dim))
        yield from _param(f"{b}.attn.rel_pos_w", (2 * size - 1, c.encoder_head_dim))
        yield from _linear(f"{b}.attn.qkv", e, 3 * e)
        yield from _linear(f"{b}.attn.proj", e, e)
        yield from _norm(f"{b}.norm2", e)
        yield from _linear(f"{b}.mlp.lin1", e, int(e * c.mlp_ratio))
        yield from _linear(f"{b}.mlp.lin2", int(e * c.mlp_ratio), e)
    yield from _conv(f"{p}.neck.0", e, d, 1, bias=False)
    yield from _norm(f"{p}.neck.1", d)
    yield from _conv(f"{p}.neck.2", d, d, 3, bias=False)
    yield from _norm(f"{p}.neck.3", d)


# TinyViT's unused classification head (kept in the official state_dict, never computed).
TINY_VIT_NUM_CLASSES = 1000


def _tiny_vit_encoder_table(c: SamConfig):
    """MobileSAM's TinyViT image encoder (encoder_type "tiny_vit"), official `tiny_vit_sam.py`.

    Torch keys: `patch_embed.seq.{0,2}`, `layers.{i}.blocks.{j}` (MBConv `conv{1,2,3}` in layer
    0; `attn.{attention_biases, norm, qkv, proj}`, `mlp.{norm, fc1, fc2}`, `local_conv` after),
    `layers.{i}.downsample.conv{1,2,3}`, `norm_head`, `head` (unused), `neck.{0..3}`."""

    p = "image_encoder"
    dims, d = c.tiny_vit_embed_dims, c.prompt_embed_dim
    yield from _conv_bn(f"{p}.patch_embed.seq.0", 3, dims[0] // 2, 3)
    yield from _conv_bn(f"{p}.patch_embed.seq.2", dims[0] // 2, dims[0], 3)
    for i, (dim, depth) in enumerate(zip(dims, c.tiny_vit_depths, strict=True)):
        layer = f"{p}.layers.{i}"
        for j in range(depth):
            b = f"{layer}.blocks.{j}"
            if i == 0:
                hidden = int(dim * c.tiny_vit_mbconv_expand_ratio)
                yield from _conv_bn(f"{b}.conv1", dim, hidden, 1)
                yield from _conv_bn(f"{b}.conv2", hidden, hidden, 3, groups=hidden)
                yield from _conv_bn(f"{b}.conv3", hidden, dim, 1)
                continue
            heads, ws = c.tiny_vit_num_heads[i], c.tiny_vit_window_sizes[i]
            yield from _param(
                f"{b}.attn.attention_biases", (heads, attention_bias_index((ws, ws))[1])
            )
            yield from _norm(f"{b}.attn.norm", dim)
            yield from _linear(f"{b}.attn.qkv", dim, 3 * dim)
            yield from _linear(f"{b}.attn.proj", dim, dim)
            hidden = int(dim * c.tiny_vit_mlp_ratio)
            yield from _norm(f"{b}.mlp.norm", dim)
            yield from _linear(f"{b}.mlp.fc1", dim, hidden)
            yield from _linear(f"{b}.mlp.fc2", hidden, dim)
            yield from _conv_bn(f"{b}.local_conv", dim, dim, c.tiny_vit_local_conv_size, dim)
        if i < len(dims) - 1:
            out = dims[i + 1]
            yield from _conv_bn(f"{layer}.downsample.conv1", dim, out, 1)
            yield from _conv_bn(f"{layer}.downsample.conv2", out, out, 3, groups=out)
            yield from _conv_bn(f"{layer}.downsample.conv3", out, out, 1)
    yield from _unused(f"{p}.norm_head.weight", (dims[-1],), 1.0)
    yield from _unused(f"{p}.norm_head.bias", (dims[-1],), 0.0)
    yield from _unused(f"{p}.head.weight", (TINY_VIT_NUM_CLASSES, dims[-1]), 0.0)
    yield from _unused(f"{p}.head.bias", (TINY_VIT_NUM_CLASSES,), 0.0)
    yield from _conv(f"{p}.neck.0", dims[-1], d, 1, bias=False)
    yield from _norm(f"{p}.neck.1", d)
    yield from _conv(f"{p}.neck.2", d, d, 3, bias=False)
    yield from _norm(f"{p}.neck.3", d)


# The torch tensors of each image encoder (SamConfig.encoder_type), in official order.
ENCODER_TABLES = {"vit": _vit_encoder_table, "tiny_vit": _tiny_vit_encoder_table}


def _module_table(c: SamConfig):
    """Yields (torch_key, torch_shape, flax_leaf_name or None, layout), official order."""
    d = c.prompt_embed_dim
    yield from ENCODER_TABLES[c.encoder_type](c)
    # Prompt encoder.
    p, m = "prompt_encoder", c.mask_in_chans
    yield from _param(f"{p}.pe_layer.positional_encoding_gaussian_matrix", (2, d // 2))
    for i in range(4):
        yield from _embedding(f"{p}.point_embeddings.{i}", 1, d)
    yield from _embedding(f"{p}.not_a_point_embed", 1, d)
    yield from _conv(f"{p}.mask_downscaling.0", 1, m // 4, 2)
    yield from _norm(f"{p}.mask_downscaling.1", m // 4)
    yield from _conv(f"{p}.mask_downscaling.3", m // 4, m, 2)
    yield from _norm(f"{p}.mask_downscaling.4", m)
    yield from _conv(f"{p}.mask_downscaling.6", m, d, 1)
    yield from _embedding(f"{p}.no_mask_embed", 1, d)
    if c.text_embed_dim:  # the text path (D.5): no official tensor; our name, after the rest
        yield from _linear(f"{p}.{TEXT_PROJECTION}", c.text_embed_dim, d)
    # Mask decoder.
    p, rate, n_tokens = "mask_decoder", c.attention_downsample_rate, c.num_multimask_outputs + 1
    t = f"{p}.transformer"
    for i in range(c.decoder_depth):
        layer = f"{t}.layers.{i}"
        yield from _decoder_attention(f"{layer}.self_attn", d, 1)
        yield from _norm(f"{layer}.norm1", d)
        yield from _decoder_attention(f"{layer}.cross_attn_token_to_image", d, rate)
        yield from _norm(f"{layer}.norm2", d)
        yield from _linear(f"{layer}.mlp.lin1", d, c.decoder_mlp_dim)
        yield from _linear(f"{layer}.mlp.lin2", c.decoder_mlp_dim, d)
        yield from _norm(f"{layer}.norm3", d)
        yield from _norm(f"{layer}.norm4", d)
        yield from _decoder_attention(f"{layer}.cross_attn_image_to_token", d, rate)
    yield from _decoder_attention(f"{t}.final_attn_token_to_image", d, rate)
    yield from _norm(f"{t}.norm_final_attn", d)
    yield from _embedding(f"{p}.iou_token", 1, d)
    yield from _embedding(f"{p}.mask_tokens", n_tokens, d)
    yield from _conv_transpose(f"{p}.output_upscaling.0", d, d // 4, 2)
    yield from _norm(f"{p}.output_upscaling.1", d // 4)
    yield from _conv_transpose(f"{p}.output_upscaling.3", d // 4, d // 8, 2)
    for i in range(n_tokens):
        yield from _mlp(f"{p}.output_hypernetworks_mlps.{i}", d, d, d // 8, 3)
    yield from _mlp(
        f"{p}.iou_prediction_head", d, c.iou_head_hidden_dim, n_tokens, c.iou_head_depth
    )


def expected_leaves(config: SamConfig) -> dict[str, Leaf]:
    """All params of a SAM with this config, keyed by torch key, in official state_dict order
    (without the tensors the model never reads: see `unused_tensors`)."""
    return {
        key: Leaf(key, shape, flax_path(key, leaf_name), layout)
        for key, shape, leaf_name, layout in _module_table(config)
        if layout != "unused"
    }


def unused_tensors(config: SamConfig) -> dict[str, np.ndarray]:
    """The tensors of the official state_dict that the model never reads and params do not hold
    (TinyViT's BatchNorm `num_batches_tracked` counters and its classification head), with the
    values `params_to_state_dict` writes for them. Reading, they are optional and dropped."""
    return {
        key: np.full(shape, fill, np.int64 if isinstance(fill, int) else np.float32)
        for key, shape, fill, layout in _module_table(config)
        if layout == "unused"
    }


def _state_dict_order(config: SamConfig) -> list[str]:
    return [key for key, *_ in _module_table(config)]


def expected_param_shapes(config: SamConfig) -> dict[str, Any]:
    """The params pytree of `config` as nested dicts of shape tuples (flax layout)."""
    return traverse_util.unflatten_dict(
        {leaf.flax_path: leaf.flax_shape for leaf in expected_leaves(config).values()}
    )


# ----------------------------------------------------------------------------------------------
# Checks.


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def describe_mismatch(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    """One line naming missing, unexpected and mis-shaped keys, or None if all match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            parts.append(f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''}: {_names(keys)}")
    return "; ".join(parts) or None


def check_state_dict(sd: Mapping[str, Any], config: SamConfig, what: str = "the config") -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped key of `sd` (the
    `unused_tensors` may be absent, but are shape-checked when present)."""
    expected = {k: leaf.torch_shape for k, leaf in expected_leaves(config).items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    for key, value in unused_tensors(config).items():
        if key in found:
            expected[key] = value.shape
    problem = describe_mismatch(found, expected)
    if problem:
        raise ValueError(f"state_dict does not match {what}: {problem}")


# ----------------------------------------------------------------------------------------------
# Conversion.


def flatten_params(params: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """Nested dicts (or FrozenDicts) -> {path tuple: leaf}; `traverse_util.unflatten_dict`
    inverts it."""
    return traverse_util.flatten_dict(params)


def _as_float32(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        raise ValueError(f"{name} has dtype {arr.dtype}, expected a floating point tensor")
    return arr.astype(np.float32, copy=False)


def state_dict_to_params(sd: Mapping[str, Any], config: SamConfig) -> dict[str, Any]:
    """Official state_dict (torch key -> array) -> params pytree (nested dicts of float32 numpy)."""
    check_state_dict(sd, config)
    return traverse_util.unflatten_dict(
        {
            leaf.flax_path: to_flax_layout(_as_float32(sd[key], key), leaf.layout)
            for key, leaf in expected_leaves(config).items()
        }
    )


def check_params(params: Mapping[str, Any], config: SamConfig, what: str = "the config") -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped params path."""
    found = {"/".join(p): _shape_of(v) for p, v in flatten_params(params).items()}
    expected = {"/".join(lf.flax_path): lf.flax_shape for lf in expected_leaves(config).values()}
    problem = describe_mismatch(found, expected)
    if problem:
        raise ValueError(f"params do not match {what}: {problem}")


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def params_to_state_dict(params: Mapping[str, Any], config: SamConfig) -> dict[str, np.ndarray]:
    """Params pytree -> official state_dict (torch key -> numpy, official order): float32, and
    the `unused_tensors` with their fill values, so that it loads with strict=True."""
    check_params(params, config)
    flat = flatten_params(params)
    leaves, unused = expected_leaves(config), unused_tensors(config)
    return {
        key: unused[key]
        if key in unused
        else to_torch_layout(_as_float32(flat[leaves[key].flax_path], key), leaves[key].layout)
        for key in _state_dict_order(config)
    }


# ----------------------------------------------------------------------------------------------
# Architecture inference.


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"cannot infer the SAM architecture: missing key {key}")
    return tuple(sd[key].shape)


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """A float r with int(dim * r) == hidden (as the official Block computes the MLP width)."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


# A key only MobileSAM's TinyViT encoder has (its first convolution).
TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"


def _infer_vit_encoder(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The SamConfig fields of SAM's ViTDet encoder, from its shapes."""
    enc = "image_encoder"
    _, g, g2, e = _shape(sd, f"{enc}.pos_embed")
    e2, in_chans, p, p2 = _shape(sd, f"{enc}.patch_embed.proj.weight")
    if g != g2 or p != p2 or e != e2 or in_chans != 3:
        raise ValueError(
            f"cannot infer the SAM architecture: non-square or inconsistent {enc}.pos_embed "
            f"{(1, g, g2, e)} / patch_embed.proj.weight {(e2, in_chans, p, p2)}"
        )
    blocks = _indices(sd, f"{enc}.blocks")
    if not blocks:
        raise ValueError(f"cannot infer the SAM architecture: no {enc}.blocks.* keys")
    depth = blocks[-1] + 1
    sizes = {}
    for i in blocks:
        rows, head_dim = _shape(sd, f"{enc}.blocks.{i}.attn.rel_pos_h")
        sizes[i] = (rows + 1) // 2
    if e % head_dim:
        raise ValueError(
            f"cannot infer the SAM architecture: head dim {head_dim} (rel_pos_h) does not divide "
            f"the encoder width {e}"
        )
    windows = sorted({s for s in sizes.values() if s != g})
    if len(windows) > 1:
        raise ValueError(f"cannot infer the SAM architecture: several window sizes {windows}")
    if windows:
        window_size = windows[0]
        global_indexes = tuple(i for i in blocks if sizes[i] == g)
    else:  # every block attends globally
        window_size, global_indexes = 0, tuple(range(depth))
    mlp_hidden = _shape(sd, f"{enc}.blocks.{blocks[0]}.mlp.lin1.weight")[0]
    return dict(
        image_size=g * p,
        patch_size=p,
        encoder_embed_dim=e,
        encoder_depth=depth,
        encoder_num_heads=e // head_dim,
        encoder_global_attn_indexes=global_indexes,
        window_size=window_size,
        mlp_ratio=mlp_ratio_for(mlp_hidden, e),
    )


def _infer_tiny_vit_encoder(sd: Mapping[str, Any]) -> dict[str, Any]:
    """The SamConfig fields of MobileSAM's TinyViT encoder, from its shapes. The image size is
    not in the weights: it is the official 1024 (the only size the official code runs)."""
    enc = "image_encoder"
    layers = _indices(sd, f"{enc}.layers")
    if layers != [0, 1, 2, 3]:
        raise ValueError(f"cannot infer the MobileSAM architecture: layers {layers}, expected 0..3")
    dims, depths, heads, windows = [], [], [], []
    for i in layers:
        blocks = _indices(sd, f"{enc}.layers.{i}.blocks")
        if not blocks:
            raise ValueError(f"cannot infer the MobileSAM architecture: no layers.{i}.blocks")
        depths.append(blocks[-1] + 1)
        b = f"{enc}.layers.{i}.blocks.0"
        if i == 0:
            dims.append(_shape(sd, f"{b}.conv3.c.weight")[0])
            expand = _shape(sd, f"{b}.conv1.c.weight")[0]
            heads.append(SamConfig.tiny_vit_num_heads[0])
            windows.append(SamConfig.tiny_vit_window_sizes[0])
            continue
        dims.append(_shape(sd, f"{b}.attn.norm.weight")[0])
        n_heads, n_offsets = _shape(sd, f"{b}.attn.attention_biases")
        ws = math.isqrt(n_offsets)
        if ws * ws != n_offsets:
            raise ValueError(
                f"cannot infer the MobileSAM architecture: {b}.attn.attention_biases has "
                f"{n_offsets} offsets, not those of a square window"
            )
        heads.append(n_heads)
        windows.append(ws)
        mlp_hidden = _shape(sd, f"{b}.mlp.fc1.weight")[0]
        local = _shape(sd, f"{b}.local_conv.c.weight")[-1]
    return dict(
        encoder_type="tiny_vit",
        image_size=SamConfig.image_size,
        tiny_vit_embed_dims=tuple(dims),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
        tiny_vit_mlp_ratio=mlp_ratio_for(mlp_hidden, dims[-1]),
        tiny_vit_mbconv_expand_ratio=mlp_ratio_for(expand, dims[0]),
        tiny_vit_local_conv_size=local,
    )


def infer_config(sd: Mapping[str, Any], decoder_num_heads: int | None = None) -> SamConfig:
    """Infers the `SamConfig` of an official-class state_dict (SAM or MobileSAM, told apart by
    TINY_VIT_KEY) from its tensor shapes.

    The decoder's num_heads is not visible in the weights: it defaults to the official 8.
    A window size equal to the embedding grid is indistinguishable from global attention and
    is read as global (the two compute the same). Raises ValueError if the shapes are not those
    of any SAM; the full key/shape check is `check_state_dict`.
    """
    enc, dec = "image_encoder", "mask_decoder"
    if TINY_VIT_KEY in sd:
        encoder = _infer_tiny_vit_encoder(sd)
    else:
        encoder = _infer_vit_encoder(sd)
    d = _shape(sd, f"{enc}.neck.0.weight")[0]
    mask_in_chans = _shape(sd, "prompt_encoder.mask_downscaling.3.weight")[0]
    layers = _indices(sd, f"{dec}.transformer.layers")
    attn = _shape(sd, f"{dec}.transformer.final_attn_token_to_image.q_proj.weight")
    internal = attn[0]
    if internal <= 0 or d % internal:
        raise ValueError(
            f"cannot infer the SAM architecture: decoder attention width {internal} does not "
            f"divide prompt_embed_dim {d}"
        )
    decoder_mlp_dim = SamConfig.decoder_mlp_dim
    if layers:
        decoder_mlp_dim = _shape(sd, f"{dec}.transformer.layers.{layers[0]}.mlp.lin1.weight")[0]
    num_tokens = _shape(sd, f"{dec}.mask_tokens.weight")[0]
    iou_layers = _indices(sd, f"{dec}.iou_prediction_head.layers")
    if not iou_layers:
        raise ValueError(f"cannot infer the SAM architecture: no {dec}.iou_prediction_head keys")
    iou_hidden = SamConfig.iou_head_hidden_dim
    if len(iou_layers) > 1:
        iou_hidden = _shape(sd, f"{dec}.iou_prediction_head.layers.0.weight")[0]
    heads = DEFAULT_DECODER_NUM_HEADS if decoder_num_heads is None else decoder_num_heads
    if heads <= 0 or internal % heads:
        raise ValueError(
            f"decoder_num_heads {heads} does not divide the decoder attention width {internal} "
            "(the number of heads is not stored in the weights: pass it explicitly)"
        )
    text = f"prompt_encoder.{TEXT_PROJECTION}.weight"
    return SamConfig(
        **encoder,
        text_embed_dim=_shape(sd, text)[1] if text in sd else 0,
        prompt_embed_dim=d,
        mask_in_chans=mask_in_chans,
        decoder_depth=layers[-1] + 1 if layers else 0,
        decoder_mlp_dim=decoder_mlp_dim,
        decoder_num_heads=heads,
        attention_downsample_rate=d // internal,
        num_multimask_outputs=num_tokens - 1,
        iou_head_depth=iou_layers[-1] + 1,
        iou_head_hidden_dim=iou_hidden,
    )
