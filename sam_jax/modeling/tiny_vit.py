"""MobileSAM's image encoder: TinyViT with SAM's neck (official `tiny_vit_sam.py`), NHWC.

Shapes: S image side, g = S / 16 embedding grid, C_i the stage widths (`embed_dims`).

    images (B, S, S, 3)
    patch_embed: Conv2d_BN 3x3 s2, GELU, Conv2d_BN 3x3 s2         -> (B, S/4, S/4, C0)
    layers_0: MBConv blocks, then PatchMerging (stride 2)         -> (B, S/8, S/8, C1)
    layers_1: TinyViT blocks (window 7), PatchMerging (stride 2)  -> (B, g, g, C2)
    layers_2: TinyViT blocks (window 14), PatchMerging (stride 1) -> (B, g, g, C3)
    layers_3: TinyViT blocks (window 7)                           -> (B, g, g, C3)
    neck: conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d        -> (B, g, g, out_chans)

Faithful details of the official code:
- Every Conv2d_BN is a bias-free convolution followed by BatchNorm2d (eps 1e-5) in inference
  mode. The BatchNorm's weight, bias, running_mean and running_var are leaves of the one `params`
  pytree (`.../bn/{scale, bias, running_mean, running_var}`); the running statistics are buffers
  (never trained: `BN_STATISTICS` names them for the optimizer).
- The official PatchMerging uses stride 1 when its output width is 320, 448 or 576 (MobileSAM's
  last merge) and stride 2 otherwise; the official model only runs when that makes the last
  merge (and only it) stride 1, which is what this module always does.
- Attention is windowed; a window's logits get a learned bias per head and per *absolute*
  offset (|dy|, |dx|) between query and key (`attention_biases` (heads, n_offsets), gathered
  with `attention_bias_index`). qkv is laid out per head as [q | k | v].
- Windows are zero-padded (bottom, right) *before* the attention's LayerNorm, so padded tokens
  enter attention as the norm's bias; no mask. A map of exactly one window is not padded.
- A TinyViT block is x + attn(x), then a depthwise Conv2d_BN (`local_conv`, no activation),
  then x + mlp(x) with the MLP's own LayerNorm (eps 1e-5). GELU is exact (erf).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.modeling.common import Dense, DropPath, Dtype, attention, layer_norm
from sam_jax.modeling.image_encoder import (
    LOGITS_BLOCK_BYTES_DEFAULT,
    REMAT_POLICIES,
    neck,
    window_partition,
    window_unpartition,
)

BN_EPS = 1e-5
# The leaves of each BatchNorm that the official model keeps as buffers (not trained).
BN_STATISTICS = ("running_mean", "running_var")
# Output widths for which the official PatchMerging uses stride 1 (`tiny_vit_sam.py`).
STRIDE_ONE_MERGE_DIMS = (320, 448, 576)
# Bytes of float32 logits one group of windows computes at once (`blocked_window_attention`). On
# this project's 2-core CPU, 1 MiB ran MobileSAM's three window shapes 1.3-2.8x faster than
# jax.nn.dot_product_attention (which broadcasts the bias over every window) and 8 MiB up to 1.4x
# slower than 1 MiB.
WINDOW_LOGITS_BLOCK_BYTES = {"cpu": 1 << 20}


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in torch's form, x * (1 + erf(x / sqrt(2))) / 2 (max error 1.1e-6 against
    float64, torch's own 1.3e-6). jax.nn.gelu(approximate=False) goes through erfc, which XLA's
    CPU backend splits into three passes over the tensor: on MBConv's 256-channel maps this form
    is 1.5x faster."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * np.float32(1 / np.sqrt(2)).astype(x.dtype)))


@functools.cache
def attention_bias_index(resolution: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The official index (N, N) of each (query, key) pair of an h x w window into the bias
    table, N = h * w, and the table's length (the number of distinct absolute offsets).

    Offsets (|dy|, |dx|) are numbered in the order the official loop meets them (queries, then
    keys, in row-major order). The returned array is read-only (cached)."""
    h, w = resolution
    points = np.array(list(itertools.product(range(h), range(w))))
    offsets = np.abs(points[:, None, :] - points[None, :, :])  # (N, N, 2)
    codes = (offsets[..., 0] * w + offsets[..., 1]).reshape(-1)
    uniques, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(uniques), np.int32)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniques), dtype=np.int32)
    n = len(points)
    idx = rank[inverse].reshape(n, n)
    idx.flags.writeable = False
    return idx, len(uniques)


def blocked_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block_bytes: int | None = None
) -> jax.Array:
    """Window attention a group of windows at a time: q, k, v (W, N, heads, hd), bias (heads, N,
    N) float32 added to the scaled logits -> (W, N, heads, hd).

    The same function as `attention` with that bias; each group's float32 logits (g, heads, N,
    N) stay under `block_bytes` (WINDOW_LOGITS_BLOCK_BYTES: in the cache on a CPU), the bias is
    added inside the group (never broadcast over all windows), and the softmax's normalisation
    comes after the value product."""
    n_win, n, heads, hd = q.shape
    if block_bytes is None:
        backend = jax.default_backend()
        block_bytes = WINDOW_LOGITS_BLOCK_BYTES.get(backend, LOGITS_BLOCK_BYTES_DEFAULT)
    f32, scale = jnp.float32, np.float32(hd**-0.5)
    if isinstance(n_win, int):
        g = max(1, min(n_win, block_bytes // (4 * heads * n * n)))
        while n_win % g:
            g -= 1
    else:  # a symbolic batch (shape-polymorphic export): one group
        g = n_win

    def group(args):  # (g, N, heads, hd) x3
        qc, kc, vc = args
        s = jnp.einsum("gnhd,gmhd->ghnm", qc, kc, preferred_element_type=f32) * scale + bias
        p = jnp.exp(s - s.max(-1, keepdims=True))
        o = jnp.einsum("ghnm,gmhd->gnhd", p.astype(vc.dtype), vc, preferred_element_type=f32)
        return (o / p.sum(-1).transpose(0, 2, 1)[..., None]).astype(q.dtype)

    if g == n_win:
        return group((q, k, v))
    split = lambda x: x.reshape(n_win // g, g, *x.shape[1:])  # noqa: E731
    return jax.lax.map(group, (split(q), split(k), split(v))).reshape(q.shape)


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in inference mode over the last axis, from stored statistics (float32), as the
    affine map it is: `__call__` returns (a, b), y = x * a + b, a = scale / sqrt(running_var +
    eps), b = bias - running_mean * a (Conv2dBN folds them into its convolution).

    With mean 0, var 1 and scale = sqrt(1 + eps) (float32), a is exactly 1 and b exactly `bias`,
    so a convolution whose BatchNorm was folded into it keeps its kernel and folded bias exactly.
    """

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        f = features
        scale = self.param("scale", nn.initializers.ones, (f,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (f,), jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros, (f,), jnp.float32)
        var = self.param("running_var", nn.initializers.ones, (f,), jnp.float32)
        a = scale / jnp.sqrt(var + self.eps)
        return a, bias - mean * a


class ConvKernel(nn.Module):
    """A convolution's weight, stored as nn.Conv stores it (`kernel`, (k, k, C_in / groups,
    C_out), float32, LeCun-normal init), returned for a computation of the caller's own."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Depthwise convolution, zero padding k // 2: x (B, H, W, C), kernel (k, k, 1, C) ->
    (B, H', W', C) float32, as k * k shifted products summed in float32 (row-major taps).

    The same function as lax.conv_general_dilated with feature_group_count=C up to float32
    rounding, written out because XLA's CPU backend runs grouped convolutions about 6x slower
    than this one elementwise fusion (1 x 256 x 256 x 256, 3 x 3: 0.52 s against 0.08 s)."""
    k = kernel.shape[0]
    p = k // 2
    b, h, w, c = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    kernel = kernel.astype(jnp.float32)
    out = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                (1, stride, stride, 1),
            )
            term = tap.astype(jnp.float32) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class Conv2dBN(nn.Module):
    """Official Conv2d_BN: bias-free Conv2d (padding kernel_size // 2) then BatchNorm2d in
    inference mode. x (B, H, W, C_in) -> (B, H / stride, W / stride, features), compute dtype.

    The BatchNorm is folded into the convolution where it is traced (kernel * a, bias b), as the
    official model's `fuse()` and ONNX exports do: one pass over the output instead of two.
    Params as nn.Conv + BatchNorm store them: `c/kernel`, `bn/{scale, bias, running_*}`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p, s = self.kernel_size, self.kernel_size // 2, self.stride
        c_in = x.shape[-1]
        kernel = ConvKernel((k, k, c_in // self.groups, self.features), name="c")()
        a, b = FrozenBatchNorm(name="bn")(self.features)
        x, kernel = x.astype(self.dtype), (kernel * a).astype(self.dtype)
        if self.groups == c_in == self.features and self.groups > 1:  # depthwise
            y = depthwise_conv(x, kernel, s)
        elif k == 1 and s == 1 and self.groups == 1:  # pointwise: a matmul over the channels
            # (XLA's CPU backend runs it about 1.9x faster as a dot than as a convolution:
            # 1 x 256 x 256, 64 -> 256 channels, 39 ms against 73 ms)
            y = jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0], preferred_element_type=jnp.float32)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (s, s),
                ((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
                preferred_element_type=jnp.float32,
            )
        return (y + b).astype(self.dtype)


class PatchEmbed(nn.Module):
    """(B, S, S, 3) -> (B, S/4, S/4, embed_dim): Conv2d_BN 3x3 s2 -> GELU -> Conv2d_BN 3x3 s2."""

    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.embed_dim
        x = gelu(Conv2dBN(n // 2, 3, 2, dtype=self.dtype, name="seq_0")(x))
        return Conv2dBN(n, 3, 2, dtype=self.dtype, name="seq_2")(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, GELU, depthwise 3x3, GELU, 1x1, + x, GELU. (B, H, W, C)."""

    expand_ratio: float
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(Conv2dBN(hidden, 1, dtype=self.dtype, name="conv1")(x))
        y = gelu(Conv2dBN(hidden, 3, groups=hidden, dtype=self.dtype, name="conv2")(y))
        y = Conv2dBN(c, 1, dtype=self.dtype, name="conv3")(y)
        y = DropPath(self.drop_path)(y, deterministic)
        return gelu(x + y)


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H / stride, W / stride, out_dim): Conv2d_BN 1x1, GELU, depthwise
    Conv2d_BN 3x3 with `stride`, GELU, Conv2d_BN 1x1."""

    out_dim: int
    stride: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.out_dim
        x = gelu(Conv2dBN(d, 1, dtype=self.dtype, name="conv1")(x))
        x = gelu(Conv2dBN(d, 3, self.stride, groups=d, dtype=self.dtype, name="conv2")(x))
        return Conv2dBN(d, 1, dtype=self.dtype, name="conv3")(x)


class Attention(nn.Module):
    """TinyViT window attention over a map: x (B, H, W, C) -> (B, H, W, C), in windows of
    `window_size` (the map zero-padded at the bottom and right to whole windows, before the norm).

    LayerNorm (eps 1e-5), qkv per head [q | k | v], logits * hd**-0.5 + the learned bias
    `attention_biases[:, attention_bias_index]` (heads, N, N), N = window_size**2, softmax
    (float32), proj.

    The official function, computed with less work: a padded token is the norm of zeros, i.e.
    the norm's bias, so its qkv is one vector (qkv of that bias), computed once and placed where
    the padding is instead of running the norm and qkv over the padding; proj, per token, runs
    only on the tokens kept.
    """

    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bsz, h, w, c = x.shape
        ws, heads = self.window_size, self.num_heads
        hd = c // heads
        idx, n_offsets = attention_bias_index((ws, ws))
        biases = self.param(
            "attention_biases", nn.initializers.zeros, (heads, n_offsets), jnp.float32
        )
        norm = layer_norm(1e-5, "norm")
        qkv_dense = Dense(3 * c, dtype=self.dtype, name="qkv")
        qkv = qkv_dense(norm(x).astype(self.dtype))  # (B, H, W, 3C)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            padded_token = qkv_dense(norm(jnp.zeros((1, c), x.dtype)).astype(self.dtype))[0]
            qkv = jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
            rows, cols = np.arange(h + pad_h) < h, np.arange(w + pad_w) < w
            keep = jnp.asarray(rows[:, None] & cols[None, :])[None, :, :, None]
            qkv = jnp.where(keep, qkv, padded_token)
        windows, _ = window_partition(qkv, ws)  # (B * nW, ws, ws, 3C), no further padding
        qkv = windows.reshape(-1, ws * ws, heads, 3, hd)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # (B', N, heads, hd)
        bias = biases[:, jnp.asarray(idx)]  # (heads, N, N)
        blocked = lambda q, k, v: blocked_window_attention(q, k, v, bias)
        whole = lambda q, k, v: attention(q, k, v, bias=bias[None], impl=self.attention_impl)
        if self.attention_impl == "xla":
            out = blocked(q, k, v)
        elif self.attention_impl == "auto":  # chosen when lowered for the platform
            out = jax.lax.platform_dependent(q, k, v, cpu=blocked, default=whole)
        else:
            out = whole(q, k, v)
        out = out.reshape(-1, ws, ws, c)
        out = window_unpartition(out, ws, (h + pad_h, w + pad_w), (h, w))
        return Dense(c, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """LayerNorm (eps 1e-5) -> fc1 -> GELU -> fc2 (TinyViT's Mlp, with its own norm)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = layer_norm(1e-5, "norm")(x).astype(self.dtype)
        x = gelu(Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x))
        return Dense(c, dtype=self.dtype, name="fc2")(x)


class TinyViTBlock(nn.Module):
    """x + window_attn(x); depthwise local Conv2d_BN; x + mlp(x). x (B, H, W, C) float32."""

    num_heads: int
    window_size: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = x.shape[-1]
        drop = DropPath(self.drop_path)
        attn = Attention(
            self.num_heads, self.window_size, self.dtype, self.attention_impl, name="attn"
        )
        y = attn(x)
        x = x + drop(y.astype(jnp.float32), deterministic)
        x = Conv2dBN(c, self.local_conv_size, groups=c, dtype=self.dtype, name="local_conv")(
            x
        ).astype(jnp.float32)
        y = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")(x)
        return x + drop(y.astype(jnp.float32), deterministic)


class Stage(nn.Module):
    """One official layer (`layers_{i}`): `depth` blocks (MBConv for the first stage, the
    official ConvLayer; TinyViT blocks otherwise, BasicLayer), then an optional PatchMerging
    (`downsample`) to `out_dim` with `merge_stride`. x (B, H, W, C) -> (B, H', W', out_dim)."""

    depth: int
    conv: bool
    num_heads: int = 1
    window_size: int = 7
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_paths: Sequence[float] = ()
    out_dim: int | None = None
    merge_stride: int = 2
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        block_cls = TinyViTBlock
        if self.remat_policy is not None:
            block_cls = nn.remat(
                TinyViTBlock, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2,)
            )
        for j in range(self.depth):
            rate = float(self.drop_paths[j]) if self.drop_paths else 0.0
            if self.conv:
                block = MBConv(self.mbconv_expand_ratio, rate, self.dtype, name=f"blocks_{j}")
                x = block(x, deterministic)
            else:
                block = block_cls(
                    num_heads=self.num_heads,
                    window_size=self.window_size,
                    mlp_ratio=self.mlp_ratio,
                    local_conv_size=self.local_conv_size,
                    drop_path=rate,
                    dtype=self.dtype,
                    attention_impl=self.attention_impl,
                    name=f"blocks_{j}",
                )
                x = block(x.astype(jnp.float32), deterministic)
        if self.out_dim is not None:
            x = PatchMerging(self.out_dim, self.merge_stride, self.dtype, name="downsample")(x)
        return x


class TinyViT(nn.Module):
    """MobileSAM's image encoder: images (B, S, S, 3) normalised -> (B, S/16, S/16, out_chans)
    float32 (see the module docstring). Param names follow the official state_dict
    (`layers_{i}/blocks_{j}/...`, `layers_{i}/downsample/...`, `neck_{k}`)."""

    img_size: int = 1024
    embed_dims: Sequence[int] = (64, 128, 160, 320)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (2, 4, 5, 10)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        s = self.img_size
        if x.shape[1:] != (s, s, 3):
            raise ValueError(f"images must have shape (B, {s}, {s}, 3), got {x.shape}")
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}, "
                f"got {self.remat_policy!r}"
            )
        dims, depths = tuple(self.embed_dims), tuple(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).tolist()
        x = PatchEmbed(dims[0], self.dtype, name="patch_embed")(x)
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            drop_paths = tuple(rates[first : first + depth])
            x = encoder_stage(self, i, drop_paths, name=f"layers_{i}")(x, deterministic)
        return neck(x, self.out_chans, self.dtype)


def encoder_stage(
    encoder: TinyViT, i: int, drop_paths: Sequence[float] = (), name: str | None = None
) -> Stage:
    """Layer i of `encoder` as `TinyViT.__call__` builds it (there, `layers_{i}` of the encoder);
    called outside a module, an unbound Stage that runs alone (benchmarks/tiny_vit_stages.py)."""
    dims, last = tuple(encoder.embed_dims), len(encoder.embed_dims) - 1
    return Stage(
        depth=encoder.depths[i],
        conv=i == 0,
        num_heads=encoder.num_heads[i],
        window_size=encoder.window_sizes[i],
        mlp_ratio=encoder.mlp_ratio,
        mbconv_expand_ratio=encoder.mbconv_expand_ratio,
        local_conv_size=encoder.local_conv_size,
        drop_paths=tuple(drop_paths),
        out_dim=dims[i + 1] if i < last else None,
        merge_stride=1 if i == last - 1 else 2,
        dtype=encoder.dtype,
        attention_impl=encoder.attention_impl,
        remat_policy=encoder.remat_policy,
        name=name,
    )
