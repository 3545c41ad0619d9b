"""ViTDet-style image encoder of SAM (official `image_encoder.py`), NHWC."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.sharding import PartitionSpec as P

from sam_jax.modeling import attention_kernels
from sam_jax.modeling.common import Dense, DropPath, Dtype, MLPBlock, attention, layer_norm

REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """Index (q_size, k_size) into a table of length 2 * max(q, k) - 1 (official get_rel_pos)."""
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel.astype(np.int64)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative positional embeddings (q_size, k_size, hd) gathered from the (L, hd) table.

    The table is linearly resized (half-pixel centres, as torch F.interpolate) when its length is
    not 2 * max(q, k) - 1.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = jax.image.resize(
            rel_pos, (max_rel_dist, rel_pos.shape[1]), method="linear", antialias=False
        )
    return rel_pos[rel_pos_index(q_size, k_size)]


def rel_pos_factors(q: jax.Array, rel_pos_h, rel_pos_w) -> tuple[jax.Array, jax.Array]:
    """The two factors of the decomposed rel-pos bias, float32, for unscaled queries.

    q: (..., h, w, hd) on the query grid; rel_pos_h/w the (L, hd) tables. Returns rel_h
    (..., h, w, h) and rel_w (..., h, w, w) with rel_h[.., i, j, k] = q[.., i, j] . R_h[i, k] and
    rel_w[.., i, j, l] = q[.., i, j] . R_w[j, l]; the bias of key (k, l) is their sum.
    """
    h, w = q.shape[-3:-1]
    r_h = get_rel_pos(h, h, rel_pos_h).astype(jnp.float32)
    r_w = get_rel_pos(w, w, rel_pos_w).astype(jnp.float32)
    q, hp = q.astype(jnp.float32), jax.lax.Precision.HIGHEST
    rel_h = jnp.einsum("...hwc,hkc->...hwk", q, r_h, precision=hp)
    rel_w = jnp.einsum("...hwc,wkc->...hwk", q, r_w, precision=hp)
    return rel_h, rel_w


def decomposed_rel_pos_bias(q: jax.Array, rel_pos_h, rel_pos_w, size: tuple[int, int]):
    """Decomposed relative-position bias (B, heads, h*w, h*w) for unscaled queries.

    q: (B, h*w, heads, hd). bias[b, n, (qh, qw), (kh, kw)] = q . R_h[qh, kh] + q . R_w[qw, kw].
    """
    h, w = size
    b, t, heads, hd = q.shape
    q = q.reshape(b, h, w, heads, hd).transpose(0, 3, 1, 2, 4)  # (B, heads, h, w, hd)
    rel_h, rel_w = rel_pos_factors(q, rel_pos_h, rel_pos_w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, t, t)


# The XLA path computes attention one block of items (heads, windows) and queries at a time, with
# the rel-pos bias added inside the block, so neither the (heads, T, T) logits nor their bias exist
# at once. The block's float32 logits are kept to about this many bytes: on a CPU small enough to
# stay in the cache (2 MiB L2 per core), elsewhere only bounded. On a CPU a block may hold items
# of several images; elsewhere the blocks of each image are its own (`rel_pos_attention`), so that
# a batch split over devices stays split (a loop over blocks that mix images would make every
# device compute every image).
LOGITS_BLOCK_BYTES = {"cpu": 8 << 20}
LOGITS_BLOCK_BYTES_DEFAULT = 256 << 20


def rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, size, impl: str = "xla"):
    """Attention with the decomposed rel-pos bias, the path chosen for the platform that runs it.

    q, k, v: (B, heads, T, hd) with T = h * w (B: images, or windows of images) -> (B, heads,
    T, hd). The choice is made when the program is lowered for its platform
    (`lax.platform_dependent`), so a program compiled ahead of time for a TPU takes the TPU path
    on any host:
      cpu           blocks of B * heads items sized for the cache (`blocked_rel_pos_attention`);
      tpu, "auto"   the Pallas kernel (`attention_kernels.flash_rel_pos_attention`) when the
                    grid suits it (the global blocks), else the per-image blocks below;
      other / "xla" `blocked_rel_pos_attention` over each image's heads (vmapped over B);
      other, "auto" `jax.nn.dot_product_attention` with the dense bias (cuDNN on a GPU).
    """
    b, heads, t, hd = q.shape

    def cpu(q, k, v):
        flat = [x.reshape(-1, t, hd) for x in (q, k, v)]
        out = blocked_rel_pos_attention(
            *flat, rel_pos_h, rel_pos_w, size, LOGITS_BLOCK_BYTES["cpu"]
        )
        return out.reshape(q.shape)

    def per_image(q, k, v):
        one = lambda q, k, v: blocked_rel_pos_attention(
            q, k, v, rel_pos_h, rel_pos_w, size, LOGITS_BLOCK_BYTES_DEFAULT
        )
        return jax.vmap(one)(q, k, v)

    def dense(q, k, v):
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, T, heads, hd)
        bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size)
        return attention(q, k, v, bias=bias, impl="auto").transpose(0, 2, 1, 3)

    def tpu(q, k, v):
        if not attention_kernels.supports(size, hd):
            return per_image(q, k, v)

        def kernel(q, k, v, table_h, table_w):
            n = q.shape[0]
            rel_h, rel_w = rel_pos_factors(q.reshape(n, heads, *size, hd), table_h, table_w)
            q = q * jnp.asarray(hd**-0.5, q.dtype)
            rel_h, rel_w = rel_h.reshape(n, heads, t, size[0]), rel_w.reshape(n, heads, t, size[1])
            return attention_kernels.flash_rel_pos_attention(q, k, v, rel_h, rel_w)

        # A Pallas kernel is not partitioned by XLA: over a device mesh (the train step sets
        # it), each device runs it on its own images (shard_map), else on all of them.
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return kernel(q, k, v, rel_pos_h, rel_pos_w)
        spec = P(tuple(mesh.axis_names)) if b % mesh.size == 0 else P()
        return jax.shard_map(
            kernel,
            mesh=mesh,
            in_specs=(spec, spec, spec, P(), P()),
            out_specs=spec,
            check_vma=False,
        )(q, k, v, rel_pos_h, rel_pos_w)

    if impl == "xla":
        return jax.lax.platform_dependent(q, k, v, cpu=cpu, default=per_image)
    return jax.lax.platform_dependent(q, k, v, cpu=cpu, tpu=tpu, default=dense)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is at most max(limit, 1)."""
    d = max(1, min(n, limit))
    while n % d:
        d -= 1
    return d


def blocked_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, size, block_bytes=None):
    """Attention with the decomposed rel-pos bias, a block of items and queries at a time.

    q, k, v: (N, h*w, hd), one item per (image or window, head) -> (N, h*w, hd). Same function
    as `attention` with the bias `decomposed_rel_pos_bias`: the bias is kept as its two factors,
    rel_h (N, T, h) and rel_w (N, T, w), and broadcast into each block of logits. Logits and
    softmax are float32. The probabilities are rounded to the compute dtype once; that copy is
    multiplied by the values and summed (in float32) for the normalisation, which comes after the
    value product (one pass less over the logits).
    """
    h, w = size
    n, t, hd = q.shape
    if block_bytes is None:
        block_bytes = LOGITS_BLOCK_BYTES.get(jax.default_backend(), LOGITS_BLOCK_BYTES_DEFAULT)
    f32 = jnp.float32
    rel_h, rel_w = rel_pos_factors(q.reshape(n, h, w, hd), rel_pos_h, rel_pos_w)
    rel_h, rel_w = rel_h.reshape(n, t, h), rel_w.reshape(n, t, w)
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    bq = _largest_divisor(t, block_bytes // (4 * t))  # queries per block
    n_chunks = t // bq
    if isinstance(n, int):
        g = _largest_divisor(n, block_bytes // (4 * t * bq))  # items per block
        n_groups = n // g
    else:  # a symbolic batch (shape-polymorphic export): all items in every block
        g, n_groups = n, 1

    def block(kc, vc, qc, rh, rw):  # (g, T, hd) x2, (g, bq, hd), (g, bq, h), (g, bq, w)
        s = jnp.einsum("gqd,gkd->gqk", qc, kc, preferred_element_type=f32)
        s = (s.reshape(g, bq, h, w) + rh[..., :, None] + rw[..., None, :]).reshape(g, bq, t)
        p = jnp.exp(s - s.max(-1, keepdims=True)).astype(vc.dtype)
        o = jnp.einsum("gqk,gkd->gqd", p, vc, preferred_element_type=f32)
        return (o / p.sum(-1, keepdims=True, dtype=f32)).astype(q.dtype)

    def group(args):
        kc, vc, *per_chunk = args
        return jax.lax.map(lambda a: block(kc, vc, *a), tuple(per_chunk))

    def chunks(x):  # (N, T, d) -> (groups, chunks, g, bq, d)
        return x.reshape(n_groups, g, n_chunks, bq, x.shape[-1]).transpose(0, 2, 1, 3, 4)

    def grouped(x):
        return x.reshape(n_groups, g, t, x.shape[-1])

    out = jax.lax.map(group, (grouped(k), grouped(v), chunks(q), chunks(rel_h), chunks(rel_w)))
    return out.transpose(0, 2, 1, 3, 4).reshape(n, t, hd)  # from (groups, chunks, g, bq, hd)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, window, window, C), zero-padding H and W to multiples of window."""
    h, w = x.shape[1:3]
    pad_h, pad_w = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    windows = rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) wh ww c", wh=window, ww=window)
    return windows, (h + pad_h, w + pad_w)


def window_unpartition(x: jax.Array, window: int, pad_hw, hw) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding: -> (B, H, W, C)."""
    (hp, wp), (h, w) = pad_hw, hw
    x = rearrange(x, "(b nh nw) wh ww c -> b (nh wh) (nw ww) c", nh=hp // window, nw=wp // window)
    return x[:, :h, :w]


class Attention(nn.Module):
    """Multi-head attention with the decomposed relative-position bias, over the whole map
    (window_size 0) or in non-overlapping windows. x: (B, H, W, C) -> (B, H, W, C).

    input_size is the grid one attention runs over: (window_size,) * 2 for windowed attention.
    """

    num_heads: int
    input_size: tuple[int, int]
    window_size: int = 0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, w, c = x.shape[1:]
        heads, hd = self.num_heads, c // self.num_heads
        if self.window_size > 0:
            x, pad_hw = window_partition(x, self.window_size)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(x)
        nb, gh, gw = qkv.shape[:3]
        zeros = nn.initializers.zeros
        rel_pos_h = self.param("rel_pos_h", zeros, (2 * self.input_size[0] - 1, hd), jnp.float32)
        rel_pos_w = self.param("rel_pos_w", zeros, (2 * self.input_size[1] - 1, hd), jnp.float32)
        if self.attention_impl == "cudnn":
            q, k, v = rearrange(qkv, "b h w (three n d) -> three b (h w) n d", three=3, n=heads)
            bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (gh, gw))
            out = attention(q, k, v, bias=bias, impl=self.attention_impl)
            out = out.reshape(nb, gh, gw, c)
        else:
            q, k, v = rearrange(qkv, "b h w (three n d) -> three b n (h w) d", three=3, n=heads)
            out = rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, (gh, gw), self.attention_impl)
            out = rearrange(out, "b n (h w) d -> b h w (n d)", h=gh)
        if self.window_size > 0:
            out = window_unpartition(out, self.window_size, pad_hw, (h, w))
        return Dense(c, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    """Transformer block with windowed (window_size > 0) or global attention."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    input_size: tuple[int, int]
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        c = x.shape[-1]
        shortcut = x
        x = layer_norm(1e-6, "norm1")(x).astype(self.dtype)
        size = (self.window_size,) * 2 if self.window_size > 0 else self.input_size
        attn = Attention(
            self.num_heads, size, self.window_size, self.dtype, self.attention_impl, name="attn"
        )
        x = attn(x)
        drop = DropPath(self.drop_path)
        x = shortcut + drop(x, deterministic)
        y = layer_norm(1e-6, "norm2")(x).astype(self.dtype)
        y = MLPBlock(int(c * self.mlp_ratio), c, "gelu", self.dtype, name="mlp")(y)
        return x + drop(y, deterministic)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, S, S, 3) -> (B, S/p, S/p, C)."""

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        conv = nn.Conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
        )
        return conv(x.astype(self.dtype))


def neck(x: jax.Array, out_chans: int, dtype: Dtype) -> jax.Array:
    """SAM's encoder neck, called inside an encoder's compact `__call__` (its params are the
    caller's neck_0..neck_3): (B, h, w, C) -> 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d ->
    (B, h, w, out_chans)."""
    x = nn.Conv(out_chans, (1, 1), use_bias=False, dtype=dtype, name="neck_0")(x.astype(dtype))
    x = layer_norm(1e-6, "neck_1")(x)
    x = nn.Conv(
        out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype, name="neck_2"
    )(x.astype(dtype))
    return layer_norm(1e-6, "neck_3")(x)


class ImageEncoderViT(nn.Module):
    """images (B, S, S, 3) normalised -> embeddings (B, S/p, S/p, out_chans), float32."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        grid = self.img_size // self.patch_size
        if x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"images must have shape (B, {self.img_size}, {self.img_size}, 3), got {x.shape}"
            )
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(x)
        pos_embed = self.param(
            "pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim), jnp.float32
        )
        x = x.astype(jnp.float32) + pos_embed
        block_cls = Block
        if self.remat_policy is not None:
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(
                    f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}, "
                    f"got {self.remat_policy!r}"
                )
            block_cls = nn.remat(
                Block, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2,)
            )
        rates = np.linspace(0.0, self.drop_path_rate, self.depth)
        for i in range(self.depth):
            is_global = i in tuple(self.global_attn_indexes)
            x = block_cls(
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                window_size=0 if is_global else self.window_size,
                input_size=(grid, grid),
                drop_path=float(rates[i]),
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"blocks_{i}",
            )(x, deterministic)
        return neck(x, self.out_chans, self.dtype)
