"""Pallas TPU flash attention with SAM's decomposed relative-position bias.

The image encoder's global attention (official `attention(..., use_rel_pos=True)`) adds to the
logit of query q = (qh, qw) and key (kh, kw) the bias rel_h[q, kh] + rel_w[q, kw] (the two
factors of `image_encoder.rel_pos_factors`). Written out, the logits of one vit_b global block
are 12 x 4096 x 4096 floats per image (805 MB) and go to HBM and back several times in the
forward pass, the remat and the backward pass. These kernels keep them in VMEM: one (bq, bk)
block of logits at a time, with the bias built from the factors inside the block, an online
softmax in the forward pass (flash attention) and the standard recomputation in the backward
pass, which also returns the gradients of the two factors (row sums of the logits' gradient over
each key row, and over each key column).

Shapes: N items (images x heads), T = h * w tokens, d head dim. A key block holds bk keys, whole
rows of the key grid (bk a multiple of w); the column factor is passed tiled to bk lanes
(rel_w_t[n, q, j] = rel_w[n, q, j % w]), the row factor whole. Logits, softmax and accumulators
are float32; q, k, v and the probabilities multiplied by v are in the input dtype (bfloat16 in
training). `interpret=True` runs the same kernels in plain JAX (CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
NT = (((1,), (1,)), ((), ()))  # x @ y.T
# The MXU's own precision for the input dtype, whatever jax_default_matmul_precision says (Mosaic
# takes no float32-contract precision for bfloat16 operands).
PREC = lax.Precision.DEFAULT
BLOCK_Q = 512
BLOCK_K = 256


def block_sizes(
    size: tuple[int, int], block_q: int = BLOCK_Q, block_k: int = BLOCK_K
) -> tuple[int, int] | None:
    """(bq, bk) for an (h, w) grid, or None when the kernel does not suit it: bk whole key rows
    and a multiple of 128 lanes (at least, up to block_k), bq up to block_q, both dividing
    T = h * w."""
    h, w = size
    t = h * w
    bk = math.lcm(w, LANES)
    while bk < block_k and t % (2 * bk) == 0:
        bk *= 2
    bq = block_q
    while bq > 8 and t % bq:
        bq //= 2
    if t % bk or t % bq or bq < 8 or t < 2 * LANES:
        return None
    return bq, bk


def supports(size: tuple[int, int], head_dim: int) -> bool:
    """Whether the kernels take an (h, w) attention grid (the 64 x 64 global blocks do; the
    14 x 14 windows do not: they stay on the XLA path)."""
    return block_sizes(size) is not None and (head_dim <= LANES or head_dim % LANES == 0)


def _key_row(bq: int, bk: int, w: int):
    """(bq, bk) int32: the key row (within the block) of each key lane, lane // w (a truncating
    division: floor division lowers through `sign`, which Mosaic's compile-only path lacks)."""
    return lax.div(lax.broadcasted_iota(jnp.int32, (bq, bk), 1), jnp.int32(w))


def _row_bias(rh, j, w: int, rows: int, bk: int):
    """(bq, bk) bias of key block j from the row factor rh (bq, h): key lane l is key row
    j * rows + l // w."""
    bq, h = rh.shape
    col = lax.broadcasted_iota(jnp.int32, (bq, h), 1)
    seg = _key_row(bq, bk, w)
    out = None
    for r in range(rows):
        c = jnp.sum(jnp.where(col == j * rows + r, rh, 0.0), axis=1, keepdims=True)  # (bq, 1)
        out = jnp.broadcast_to(c, (bq, bk)) if out is None else jnp.where(seg >= r, c, out)
    return out


def _logits(q_ref, k_ref, rh_ref, rw_ref, j, w, rows):
    s = lax.dot_general(
        q_ref[...], k_ref[...], NT, precision=PREC, preferred_element_type=jnp.float32
    )
    return s + rw_ref[...] + _row_bias(rh_ref[...], j, w, rows, s.shape[1])


def _wide(x, n: int):
    """(bq, 128) lane-replicated statistics -> (bq, n)."""
    return jnp.tile(x, (1, n // LANES)) if n >= LANES else x[:, :n]


def _fwd_kernel(q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, w):
    j, last = pl.program_id(2), pl.num_programs(2) - 1
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    s = _logits(q_ref, k_ref, rh_ref, rw_ref, j, w, bk // w)
    m_prev, l_prev = m_sc[...], l_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
    p = jnp.exp(s - _wide(m_next, bk))
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_next
    pv = lax.dot(
        p.astype(v_ref.dtype), v_ref[...], precision=PREC, preferred_element_type=jnp.float32
    )
    d = acc_sc.shape[1]
    acc_sc[...] = acc_sc[...] * _wide(alpha, d) + pv

    @pl.when(j == last)
    def _store():
        denom = l_sc[...]
        o_ref[...] = (acc_sc[...] / _wide(denom, d)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(denom)


def _dq_kernel(
    q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, do_ref, lse_ref,  # inputs
    dq_ref, drh_ref, drw_ref,  # outputs
    di_sc, dq_sc, drh_sc, drw_sc,  # scratch
    *, w,
):  # fmt: skip
    j, last = pl.program_id(2), pl.num_programs(2) - 1
    bk = k_ref.shape[0]
    rows = bk // w

    @pl.when(j == 0)
    def _init():
        do, o = do_ref[...].astype(jnp.float32), o_ref[...].astype(jnp.float32)
        di_sc[...] = jnp.broadcast_to(jnp.sum(do * o, axis=1, keepdims=True), di_sc.shape)
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        drh_sc[...] = jnp.zeros(drh_sc.shape, jnp.float32)
        drw_sc[...] = jnp.zeros(drw_sc.shape, jnp.float32)

    s = _logits(q_ref, k_ref, rh_ref, rw_ref, j, w, rows)
    p = jnp.exp(s - _wide(lse_ref[...], bk))
    dp = lax.dot_general(
        do_ref[...], v_ref[...], NT, precision=PREC, preferred_element_type=jnp.float32
    )
    ds = p * (dp - _wide(di_sc[...], bk))  # (bq, bk) gradient of the logits
    dq_sc[...] += lax.dot(
        ds.astype(k_ref.dtype), k_ref[...], precision=PREC, preferred_element_type=jnp.float32
    )
    drw_sc[...] += ds
    bq, h = drh_sc.shape
    col = lax.broadcasted_iota(jnp.int32, (bq, h), 1)
    seg = _key_row(bq, bk, w)
    drh = drh_sc[...]
    for r in range(rows):  # key row j * rows + r: the sum of its w logits' gradients
        row_sum = jnp.sum(jnp.where(seg == r, ds, 0.0), axis=1, keepdims=True)
        drh = drh + jnp.where(col == j * rows + r, row_sum, 0.0)
    drh_sc[...] = drh

    @pl.when(j == last)
    def _store():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
        drh_ref[...] = drh_sc[...]
        drw_ref[...] = drw_sc[...]


def _dkv_kernel(
    q_ref, k_ref, v_ref, rh_ref, rw_ref, o_ref, do_ref, lse_ref,  # inputs
    dk_ref, dv_ref,  # outputs
    dk_sc, dv_sc,  # scratch
    *, w,
):  # fmt: skip
    j, i, last = pl.program_id(1), pl.program_id(2), pl.num_programs(2) - 1
    bk = k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    s = _logits(q_ref, k_ref, rh_ref, rw_ref, j, w, bk // w)
    p = jnp.exp(s - _wide(lse_ref[...], bk))
    do = do_ref[...]
    dv_sc[...] += lax.dot(
        p.T.astype(do.dtype), do, precision=PREC, preferred_element_type=jnp.float32
    )
    di = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1, keepdims=True)
    dp = lax.dot_general(do, v_ref[...], NT, precision=PREC, preferred_element_type=jnp.float32)
    ds = p * (dp - di)
    dk_sc[...] += lax.dot(
        ds.T.astype(q_ref.dtype), q_ref[...], precision=PREC, preferred_element_type=jnp.float32
    )

    @pl.when(i == last)
    def _store():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(bq, bk, d, h, q_major: bool):
    """BlockSpecs of (q, k, v, rh, rw_t, o, do, lse) for a grid (N, outer, inner): q blocks
    outside (q_major) or inside."""
    if q_major:
        qi = lambda n, i, j: (n, i, 0)  # noqa: E731
        kj = lambda n, i, j: (n, j, 0)  # noqa: E731
    else:
        qi = lambda n, j, i: (n, i, 0)  # noqa: E731
        kj = lambda n, j, i: (n, j, 0)  # noqa: E731
    q = pl.BlockSpec((None, bq, d), qi)
    kv = pl.BlockSpec((None, bk, d), kj)
    return {
        "q": q,
        "k": kv,
        "v": kv,
        "rh": pl.BlockSpec((None, bq, h), qi),
        "rw": pl.BlockSpec((None, bq, bk), qi),
        "o": q,
        "do": q,
        "lse": pl.BlockSpec((None, bq, LANES), qi),
    }


def _params(interpret: bool):
    if interpret:
        return {"interpret": True}
    sem = ("parallel", "parallel", "arbitrary")
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=sem)}


def _cost(n, t, d, h, bk, passes: int, itemsize: int) -> pl.CostEstimate:
    """Matmul FLOPs (`passes` T x T x d products per item) and the bytes the kernel moves."""
    flops = passes * 2 * n * t * t * d
    io = n * t * (4 * d * itemsize + 4 * (h + bk + LANES))
    return pl.CostEstimate(flops=flops, transcendentals=n * t * t, bytes_accessed=io)


def _forward(q, k, v, rh, rw_t, w, blocks, interpret):
    n, t, d = q.shape
    h = rh.shape[-1]
    bq, bk = blocks
    sp = _specs(bq, bk, d, h, q_major=True)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, w=w),
        grid=(n, t // bq, t // bk),
        in_specs=[sp["q"], sp["k"], sp["v"], sp["rh"], sp["rw"]],
        out_specs=[sp["o"], sp["lse"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((n, t, LANES), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        cost_estimate=_cost(n, t, d, h, bk, 2, q.dtype.itemsize),
        **_params(interpret),
    )(q, k, v, rh, rw_t)


def _backward(w, blocks, interpret, res, g):
    q, k, v, rh, rw_t, o, lse = res
    do = g.astype(q.dtype)
    n, t, d = q.shape
    h = rh.shape[-1]
    bq, bk = blocks
    args = (q, k, v, rh, rw_t, o, do, lse)
    sp = _specs(bq, bk, d, h, q_major=True)
    dq, drh, drw_t = pl.pallas_call(
        functools.partial(_dq_kernel, w=w),
        grid=(n, t // bq, t // bk),
        in_specs=[sp[x] for x in ("q", "k", "v", "rh", "rw", "o", "do", "lse")],
        out_specs=[sp["q"], sp["rh"], sp["rw"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(rh.shape, jnp.float32),
            jax.ShapeDtypeStruct(rw_t.shape, jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
            pltpu.VMEM((bq, bk), jnp.float32),
        ],
        cost_estimate=_cost(n, t, d, h, bk, 3, q.dtype.itemsize),
        **_params(interpret),
    )(*args)
    sp = _specs(bq, bk, d, h, q_major=False)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, w=w),
        grid=(n, t // bk, t // bq),
        in_specs=[sp[x] for x in ("q", "k", "v", "rh", "rw", "o", "do", "lse")],
        out_specs=[sp["k"], sp["v"]],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        cost_estimate=_cost(n, t, d, h, bk, 4, q.dtype.itemsize),
        **_params(interpret),
    )(*args)
    return dq, dk, dv, drh, drw_t


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, rh, rw_t, w, blocks, interpret):
    return _forward(q, k, v, rh, rw_t, w, blocks, interpret)[0]


def _attention_fwd(q, k, v, rh, rw_t, w, blocks, interpret):
    o, lse = _forward(q, k, v, rh, rw_t, w, blocks, interpret)
    return o, (q, k, v, rh, rw_t, o, lse)


_attention.defvjp(_attention_fwd, _backward)


def flash_rel_pos_attention(
    q, k, v, rel_h, rel_w, interpret: bool = False, block_q: int = BLOCK_Q, block_k: int = BLOCK_K
):
    """softmax(q k^T + bias) v with bias[q, (kh, kw)] = rel_h[q, kh] + rel_w[q, kw].

    q (scaled), k, v: (..., T, d) with T = h * w; rel_h (..., T, h), rel_w (..., T, w) float32.
    Returns (..., T, d) in q's dtype. Differentiable in all five (custom VJP: the backward
    kernels recompute each block of logits). The grid must satisfy `supports`; block_q and
    block_k bound the block sizes (`block_sizes`).
    """
    lead, (t, d) = q.shape[:-2], q.shape[-2:]
    h, w = rel_h.shape[-1], rel_w.shape[-1]
    blocks = block_sizes((h, w), block_q, block_k)
    if h * w != t or blocks is None:
        raise ValueError(f"the attention kernel does not take a {h} x {w} grid")
    bk = blocks[1]
    n = math.prod(lead)
    rw_t = jnp.tile(rel_w.astype(jnp.float32), (1,) * len(lead) + (1, bk // w))
    out = _attention(
        q.reshape(n, t, d),
        k.reshape(n, t, d),
        v.reshape(n, t, d),
        rel_h.astype(jnp.float32).reshape(n, t, h),
        rw_t.reshape(n, t, bk),
        w,
        blocks,
        interpret,
    )
    return out.reshape(q.shape)
