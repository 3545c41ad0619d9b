"""ONNX graphs of SAM written node by node from the params pytree (the `onnx` helper API).

`decoder_model` is Meta's `segment_anything.utils.onnx.SamOnnxModel` (prompt encoder + mask
decoder + mask post-processing), with the inputs and outputs of Meta's
`scripts/export_onnx_model.py`:

    image_embeddings  float32 (1, D, g, g)    the image encoder output, channels first
    point_coords      float32 (1, N, 2)       xy in the resized S x S input frame; N is dynamic
    point_labels      float32 (1, N)          1 fg, 0 bg, 2/3 box corners, -1 padding point
    mask_input        float32 (1, 1, 4g, 4g)  low-res logits of a previous prediction
    has_mask_input    float32 (1,)            1 to use mask_input, 0 to ignore it
    orig_im_size      float32 (2,)            (H, W) of the original image
 -> masks             float32 (1, K, H, W)    logits at the original size (H, W from the VALUE
                                              of orig_im_size, computed in the graph)
    iou_predictions   float32 (1, K)
    low_res_masks     float32 (1, K, 4g, 4g)

A model with a text path (config.text_embed_dim = E > 0) takes one more input, and its graph the
text token of `Sam.decode` (sam_jax's own; Meta's export has no text):

    text_embeddings   float32 (1, T, E)       a CLIP embedding (T = 1) or none (T = 0: the
                                              outputs of a prompt without text)

K = 4 (the single-mask output, then the three multimask outputs) or 1 with return_single_mask.
With return_extra_metrics the outputs are masks, iou_predictions, stability_scores (1, K),
areas int64 (1, K), low_res_masks.

`encoder_model` is the image encoder with the interface of Meta's encoder export: `x` float32
(B, 3, S, S) normalised and zero-padded -> `image_embeddings` (B, D, g, g), B dynamic.

Every initializer is named by its params path (`mask_decoder/transformer/layers_0/self_attn/
q_proj/kernel`) and every node by the module it belongs to, so the graph reads like the model.
`onnx` is imported inside the functions (an optional dependency).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sam_jax import __version__
from sam_jax.config import SamConfig
from sam_jax.export.signature import MASK_THRESHOLD, STABILITY_SCORE_OFFSET
from sam_jax.modeling.image_encoder import get_rel_pos

DEFAULT_OPSET = 17  # Meta's export script's default; LayerNormalization needs >= 17
MAX_OPSET = 21
IR_VERSIONS = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10}
# Above this many bytes of weights, `sam_jax.export.save` writes them to a separate file
# (protobuf files cannot exceed 2 GiB): vit_h's image encoder.
EXTERNAL_DATA_ABOVE = 1_800_000_000


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset must be an integer, got {opset!r}")
    if not DEFAULT_OPSET <= int(opset) <= MAX_OPSET:
        raise ValueError(f"opset must be in {DEFAULT_OPSET}..{MAX_OPSET}, got {opset}")
    return int(opset)


def _np(x) -> np.ndarray:
    return np.asarray(x, np.float32)


class GraphBuilder:
    """A small writer of ONNX graphs: scoped names, initializers from arrays, one call per node.

    `op("MatMul", a, b)` adds a node and returns its output name; `param(array, "kernel")`
    adds an initializer named by the current scope; `scope("mask_decoder")` nests names.
    """

    def __init__(self, opset: int):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._scope: list[str] = []
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.weight_bytes = 0

    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        name = "/".join([*self._scope, base])
        if name not in self._used:
            self._used.add(name)
            return name
        i = 1
        while f"{name}_{i}" in self._used:
            i += 1
        self._used.add(f"{name}_{i}")
        return f"{name}_{i}"

    def param(self, array, name: str) -> str:
        """An initializer holding `array` (float32 unless integer), named scope/name."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        full = self._unique(name)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(array), full))
        self.weight_bytes += array.nbytes
        return full

    def const(self, value, dtype=np.float32) -> str:
        """A small shared constant (scalars, shapes, axes), named by its value."""
        array = np.asarray(value, dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            text = "_".join(f"{v:g}" if array.dtype.kind == "f" else str(v) for v in array.flat)
            kind = "i" if array.dtype.kind in "iu" else ""
            name = f"const/{kind}{text}" if array.size <= 8 else f"const/{len(self._consts)}"
            if name in self._used:
                name = f"{name}_{array.dtype.name}"
            self._used.add(name)
            self.initializers.append(self._numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        node_name = self._unique(name or op_type)
        outs = [node_name] if outputs == 1 else [f"{node_name}:{i}" for i in range(outputs)]
        self.nodes.append(
            self._helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs)
        )
        return outs[0] if outputs == 1 else outs

    def output(self, value: str, name: str) -> None:
        """Makes `value` the graph output `name` (an Identity node)."""
        self._used.add(name)
        self.nodes.append(self._helper.make_node("Identity", [value], [name], name=name))

    # ------------------------------------------------------------------ layers

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1) -> str:
        """Reduce* over `axes`: an input from opset 18 (ReduceSum: 13), an attribute before."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.ints(*axes), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def dense(self, x: str, p: Mapping[str, Any], name: str) -> str:
        """A Flax Dense: x @ kernel (in, out) + bias."""
        with self.scope(name):
            y = self.op("MatMul", x, self.param(p["kernel"], "kernel"))
            if "bias" in p:
                y = self.op("Add", y, self.param(p["bias"], "bias"))
        return y

    def layer_norm(self, x: str, p: Mapping[str, Any], eps: float, name: str) -> str:
        """LayerNorm over the last axis (LayerNormalization)."""
        with self.scope(name):
            scale, bias = self.param(p["scale"], "scale"), self.param(p["bias"], "bias")
            return self.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=eps)

    def layer_norm_2d(self, x: str, p: Mapping[str, Any], eps: float, name: str) -> str:
        """The official LayerNorm2d over the channels of an NCHW map (its own arithmetic)."""
        with self.scope(name):
            c = np.shape(p["scale"])[0]
            u = self.reduce("ReduceMean", x, [1])
            d = self.op("Sub", x, u)
            var = self.reduce("ReduceMean", self.op("Mul", d, d), [1])
            y = self.op("Div", d, self.op("Sqrt", self.op("Add", var, self.const(eps))))
            y = self.op("Mul", y, self.param(_np(p["scale"]).reshape(c, 1, 1), "scale"))
            return self.op("Add", y, self.param(_np(p["bias"]).reshape(c, 1, 1), "bias"))

    def gelu(self, x: str, approximate: bool) -> str:
        """torch.nn.GELU(): exact (erf) or, with approximate, the tanh form."""
        with self.scope("gelu"):
            if approximate:
                cube = self.op("Mul", self.op("Mul", x, x), x)
                inner = self.op("Add", x, self.op("Mul", cube, self.const(0.044715)))
                inner = self.op("Mul", inner, self.const(math.sqrt(2.0 / math.pi)))
                t = self.op("Add", self.op("Tanh", inner), self.const(1.0))
            else:
                erf = self.op("Erf", self.op("Div", x, self.const(math.sqrt(2.0))))
                t = self.op("Add", erf, self.const(1.0))
            return self.op("Mul", self.op("Mul", x, t), self.const(0.5))

    def conv(self, x: str, p: Mapping[str, Any], name: str, stride: int = 1, pad: int = 0):
        """A Flax Conv (kernel (kh, kw, in, out)) on an NCHW map."""
        with self.scope(name):
            w = self.param(np.transpose(_np(p["kernel"]), (3, 2, 0, 1)), "kernel")
            inputs = [x, w] + ([self.param(p["bias"], "bias")] if "bias" in p else [])
            kh, kw = np.shape(p["kernel"])[:2]
            return self.op(
                "Conv",
                *inputs,
                kernel_shape=[kh, kw],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )

    def conv_transpose_2x2(self, x: str, p: Mapping[str, Any], name: str) -> str:
        """ConvTranspose2d(kernel 2, stride 2) (our kernel (2, 2, in, out) -> (in, out, 2, 2))."""
        with self.scope(name):
            w = self.param(np.transpose(_np(p["kernel"]), (2, 3, 0, 1)), "kernel")
            b = self.param(p["bias"], "bias")
            return self.op("ConvTranspose", x, w, b, kernel_shape=[2, 2], strides=[2, 2])

    def mlp(self, x: str, p: Mapping[str, Any], num_layers: int, name: str) -> str:
        """The mask decoder's MLP: Dense layers with ReLU between."""
        with self.scope(name):
            for i in range(num_layers):
                x = self.dense(x, p[f"layers_{i}"], f"layers_{i}")
                if i < num_layers - 1:
                    x = self.op("Relu", x)
        return x

    def model(self, inputs, outputs, doc: str, metadata: Mapping[str, str]):
        from onnx import helper

        graph = helper.make_graph(
            self.nodes, "sam_jax", inputs, outputs, initializer=self.initializers, doc_string=doc
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="sam_jax",
            producer_version=_version(),
            doc_string=doc,
        )
        # The oldest IR version that has the opset, for older runtimes (onnxruntime-web).
        model.ir_version = IR_VERSIONS[self.opset]
        helper.set_model_props(model, dict(metadata))
        return model


def _version() -> str:
    return __version__


def _tensor(name: str, dtype, shape) -> Any:
    from onnx import TensorProto, helper

    elem = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64}[dtype]
    return helper.make_tensor_value_info(name, elem, list(shape))


# ---------------------------------------------------------------------------------- decoder


def _attention(b: GraphBuilder, q, k, v, p, num_heads: int, name: str) -> str:
    """The mask decoder's Attention (official `transformer.Attention`): (1, T, C) tokens."""
    with b.scope(name):
        internal = np.shape(p["q_proj"]["kernel"])[1]
        hd = internal // num_heads

        def heads(x, proj, perm):
            x = b.dense(x, p[proj], proj)
            x = b.op("Reshape", x, b.ints(0, -1, num_heads, hd))
            return b.op("Transpose", x, perm=perm)

        qh = heads(q, "q_proj", [0, 2, 1, 3])  # (1, h, T, hd)
        kt = heads(k, "k_proj", [0, 2, 3, 1])  # (1, h, hd, S)
        vh = heads(v, "v_proj", [0, 2, 1, 3])  # (1, h, S, hd)
        logits = b.op("Div", b.op("MatMul", qh, kt), b.const(math.sqrt(hd)))
        out = b.op("MatMul", b.op("Softmax", logits, axis=-1), vh)
        out = b.op("Transpose", out, perm=[0, 2, 1, 3])
        out = b.op("Reshape", out, b.ints(0, -1, internal))
        return b.dense(out, p["out_proj"], "out_proj")


def _two_way_transformer(b: GraphBuilder, image, image_pe, tokens, p, config: SamConfig):
    """Official `TwoWayTransformer.forward`: image (1, HW, C), tokens (1, T, C)."""
    heads = config.decoder_num_heads
    queries, keys = tokens, image
    for i in range(config.decoder_depth):
        lp = p[f"layers_{i}"]
        with b.scope(f"layers_{i}"):
            if i == 0:  # skip_first_layer_pe
                queries = _attention(
                    b, queries, queries, queries, lp["self_attn"], heads, "self_attn"
                )
            else:
                q = b.op("Add", queries, tokens)
                attn = _attention(b, q, q, queries, lp["self_attn"], heads, "self_attn")
                queries = b.op("Add", queries, attn)
            queries = b.layer_norm(queries, lp["norm1"], 1e-5, "norm1")

            q, k = b.op("Add", queries, tokens), b.op("Add", keys, image_pe)
            name = "cross_attn_token_to_image"
            queries = b.op("Add", queries, _attention(b, q, k, keys, lp[name], heads, name))
            queries = b.layer_norm(queries, lp["norm2"], 1e-5, "norm2")

            with b.scope("mlp"):
                y = b.op("Relu", b.dense(queries, lp["mlp"]["lin1"], "lin1"))
                y = b.dense(y, lp["mlp"]["lin2"], "lin2")
            queries = b.layer_norm(b.op("Add", queries, y), lp["norm3"], 1e-5, "norm3")

            q, k = b.op("Add", queries, tokens), b.op("Add", keys, image_pe)
            name = "cross_attn_image_to_token"
            keys = b.op("Add", keys, _attention(b, k, q, queries, lp[name], heads, name))
            keys = b.layer_norm(keys, lp["norm4"], 1e-5, "norm4")
    q, k = b.op("Add", queries, tokens), b.op("Add", keys, image_pe)
    name = "final_attn_token_to_image"
    queries = b.op("Add", queries, _attention(b, q, k, keys, p[name], heads, name))
    queries = b.layer_norm(queries, p["norm_final_attn"], 1e-5, "norm_final_attn")
    return queries, keys


def _stability_score(b: GraphBuilder, masks: str) -> str:
    """Official `calculate_stability_score(masks, 0.0, 1.0)` over the last two axes."""
    with b.scope("stability_score"):

        def count(threshold):
            above = b.op("Cast", b.op("Greater", masks, b.const(threshold)), to=6)  # int32
            return b.op("Cast", b.reduce("ReduceSum", above, [-2, -1], keepdims=0), to=1)

        inter = count(MASK_THRESHOLD + STABILITY_SCORE_OFFSET)
        union = count(MASK_THRESHOLD - STABILITY_SCORE_OFFSET)
        return b.op("Div", inter, union)


def dense_positional_encoding(model, params) -> np.ndarray:
    """The prompt encoder's positional encoding of the embedding grid, (g, g, D) float32."""
    return np.asarray(
        model.apply({"params": params}, method=lambda m: m.prompt_encoder.get_dense_pe())
    )


def decoder_model(
    model,
    params,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    gelu_approximate: bool = False,
    opset: int = DEFAULT_OPSET,
):
    """The ONNX `ModelProto` of `SamOnnxModel(sam, return_single_mask, use_stability_score,
    return_extra_metrics)` for a Flax `Sam` and its params (see the module docstring)."""
    opset = check_opset(opset)
    c: SamConfig = model.config
    s, g, d, m = c.image_size, c.embedding_size, c.prompt_embed_dim, c.low_res_size
    k_out = 1 if return_single_mask else c.num_multimask_outputs + 1
    params = _host(params)
    pe_p, md_p = params["prompt_encoder"], params["mask_decoder"]
    b = GraphBuilder(opset)
    gelu = lambda x: b.gelu(x, gelu_approximate)

    with b.scope("prompt_encoder"):
        with b.scope("points"):  # SamOnnxModel._embed_points
            gauss = pe_p["pe_layer"]["positional_encoding_gaussian_matrix"]
            coords = b.op("Div", b.op("Add", "point_coords", b.const(0.5)), b.const(float(s)))
            coords = b.op("Sub", b.op("Mul", coords, b.const(2.0)), b.const(1.0))
            with b.scope("pe_layer"):
                coords = b.op(
                    "MatMul", coords, b.param(gauss, "positional_encoding_gaussian_matrix")
                )
            coords = b.op("Mul", coords, b.const(2 * math.pi))
            pe = b.op("Concat", b.op("Sin", coords), b.op("Cos", coords), axis=-1)
            labels = b.op("Unsqueeze", "point_labels", b.ints(-1))  # (1, N, 1)

            def is_label(value):
                return b.op("Cast", b.op("Equal", labels, b.const(float(value))), to=1)

            padding = b.op("Equal", labels, b.const(-1.0))
            sparse = b.op("Mul", pe, b.op("Cast", b.op("Not", padding), to=1))
            not_a_point = b.param(pe_p["not_a_point_embed"]["embedding"], "not_a_point_embed")
            sparse = b.op("Add", sparse, b.op("Mul", not_a_point, is_label(-1)))
            for i in range(4):
                emb = b.param(pe_p[f"point_embeddings_{i}"]["embedding"], f"point_embeddings_{i}")
                sparse = b.op("Add", sparse, b.op("Mul", emb, is_label(i)))
        if c.text_embed_dim:  # Sam.decode: the text token before the points
            with b.scope("text"):
                x = "text_embeddings"  # (1, T, E), l2-normalised as PromptEncoder.embed_text
                norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", x, x), [-1]))
                x = b.op("Div", x, b.op("Max", norm, b.const(1e-6)))
                text = b.dense(x, pe_p["text_projection"], "text_projection")
                sparse = b.op("Concat", text, sparse, axis=1)
        with b.scope("masks"):  # SamOnnxModel._embed_masks
            x = b.conv("mask_input", pe_p["mask_downscaling_0"], "mask_downscaling_0", stride=2)
            x = gelu(b.layer_norm_2d(x, pe_p["mask_downscaling_1"], 1e-6, "mask_downscaling_1"))
            x = b.conv(x, pe_p["mask_downscaling_3"], "mask_downscaling_3", stride=2)
            x = gelu(b.layer_norm_2d(x, pe_p["mask_downscaling_4"], 1e-6, "mask_downscaling_4"))
            x = b.conv(x, pe_p["mask_downscaling_6"], "mask_downscaling_6")
            no_mask = _np(pe_p["no_mask_embed"]["embedding"]).reshape(1, d, 1, 1)
            no_mask = b.op(
                "Mul",
                b.op("Sub", b.const(1.0), "has_mask_input"),
                b.param(no_mask, "no_mask_embed"),
            )
            dense = b.op("Add", b.op("Mul", "has_mask_input", x), no_mask)

    with b.scope("mask_decoder"):  # MaskDecoder.predict_masks
        num_tokens = c.num_multimask_outputs + 1
        iou_token = _np(md_p["iou_token"]["embedding"]).reshape(1, 1, d)
        mask_tokens = _np(md_p["mask_tokens"]["embedding"]).reshape(1, num_tokens, d)
        tokens = b.op(
            "Concat",
            b.param(iou_token, "iou_token"),
            b.param(mask_tokens, "mask_tokens"),
            sparse,
            axis=1,
        )
        src = b.op("Add", "image_embeddings", dense)
        src = b.op("Transpose", b.op("Reshape", src, b.ints(1, d, g * g)), perm=[0, 2, 1])
        image_pe = dense_positional_encoding(model, params).reshape(1, g * g, d)
        image_pe = b.param(image_pe, "image_pe")
        with b.scope("transformer"):
            hs, src = _two_way_transformer(b, src, image_pe, tokens, md_p["transformer"], c)
        iou_token_out = b.op("Gather", hs, b.const(0, np.int64), axis=1)  # (1, C)
        x = b.op("Reshape", b.op("Transpose", src, perm=[0, 2, 1]), b.ints(1, d, g, g))
        x = b.conv_transpose_2x2(x, md_p["output_upscaling_0"], "output_upscaling_0")
        x = gelu(b.layer_norm_2d(x, md_p["output_upscaling_1"], 1e-6, "output_upscaling_1"))
        x = gelu(b.conv_transpose_2x2(x, md_p["output_upscaling_3"], "output_upscaling_3"))
        hyper = []
        for i in range(num_tokens):
            name = f"output_hypernetworks_mlps_{i}"
            token = b.op("Gather", hs, b.const(1 + i, np.int64), axis=1)
            hyper.append(b.op("Unsqueeze", b.mlp(token, md_p[name], 3, name), b.ints(1)))
        hyper = b.op("Concat", *hyper, axis=1)  # (1, K, C/8)
        x = b.op("Reshape", x, b.ints(1, d // 8, m * m))
        masks = b.op("Reshape", b.op("MatMul", hyper, x), b.ints(1, num_tokens, m, m))
        head = "iou_prediction_head"
        scores = b.mlp(iou_token_out, md_p[head], c.iou_head_depth, head)

    if use_stability_score:
        scores = _stability_score(b, masks)
    if return_single_mask:
        with b.scope("select_masks"):
            num_points = b.op("Gather", b.op("Shape", "point_coords"), b.const(1, np.int64))
            num_points = b.op("Cast", num_points, to=1)
            reweight = np.zeros((1, num_tokens), np.float32)
            reweight[0, 0] = 1000.0
            offset = b.op("Mul", b.op("Sub", num_points, b.const(2.5)), b.const(reweight))
            best = b.op("ArgMax", b.op("Add", scores, offset), axis=1, keepdims=0)  # (1,)
            masks = b.op("Gather", masks, best, axis=1)
            scores = b.op("Gather", scores, best, axis=1)
    with b.scope("postprocess"):  # SamOnnxModel.mask_postprocessing
        resize = dict(mode="linear", coordinate_transformation_mode="half_pixel")
        up = b.op("Resize", masks, "", "", b.ints(1, k_out, s, s), **resize)
        longest = b.reduce("ReduceMax", "orig_im_size", [0], keepdims=0)
        scaled = b.op("Mul", b.op("Div", b.const(float(s)), longest), "orig_im_size")
        prepadded = b.op("Cast", b.op("Floor", b.op("Add", scaled, b.const(0.5))), to=7)
        up = b.op("Slice", up, b.ints(0, 0), prepadded, b.ints(2, 3))
        size = b.op("Concat", b.ints(1, k_out), b.op("Cast", "orig_im_size", to=7), axis=0)
        up = b.op("Resize", up, "", "", size, **resize)

    outputs = [
        _tensor("masks", np.float32, [1, k_out, "height", "width"]),
        _tensor("iou_predictions", np.float32, [1, k_out]),
    ]
    b.output(up, "masks")
    b.output(scores, "iou_predictions")
    if return_extra_metrics:
        with b.scope("extra_metrics"):
            b.output(_stability_score(b, up), "stability_scores")
            area = b.op("Cast", b.op("Greater", up, b.const(MASK_THRESHOLD)), to=7)
            b.output(b.reduce("ReduceSum", area, [-2, -1], keepdims=0), "areas")
        outputs += [
            _tensor("stability_scores", np.float32, [1, k_out]),
            _tensor("areas", np.int64, [1, k_out]),
        ]
    b.output(masks, "low_res_masks")
    outputs.append(_tensor("low_res_masks", np.float32, [1, k_out, m, m]))

    inputs = [
        _tensor("image_embeddings", np.float32, [1, d, g, g]),
        _tensor("point_coords", np.float32, [1, "num_points", 2]),
        _tensor("point_labels", np.float32, [1, "num_points"]),
        _tensor("mask_input", np.float32, [1, 1, m, m]),
        _tensor("has_mask_input", np.float32, [1]),
        _tensor("orig_im_size", np.float32, [2]),
    ]
    if c.text_embed_dim:
        inputs.append(_tensor("text_embeddings", np.float32, [1, "num_texts", c.text_embed_dim]))
    options = dict(
        return_single_mask=bool(return_single_mask),
        use_stability_score=bool(use_stability_score),
        return_extra_metrics=bool(return_extra_metrics),
        gelu_approximate=bool(gelu_approximate),
    )
    doc = (
        "SAM prompt encoder + mask decoder (segment_anything.utils.onnx.SamOnnxModel) exported "
        f"by sam_jax; options {json.dumps(options)}"
    )
    meta = {"sam_jax.part": "decoder", "sam_jax.config": c.to_json(), **_meta_options(options)}
    return b.model(inputs, outputs, doc, meta)


def _meta_options(options: Mapping[str, bool]) -> dict[str, str]:
    return {f"sam_jax.{k}": json.dumps(v) for k, v in options.items()}


# ---------------------------------------------------------------------------------- encoder


def _window_partition(b: GraphBuilder, x: str, hw: tuple[int, int], c: int, w: int):
    """(B, H, W, C) -> (B * nW, w, w, C), zero-padding H and W to multiples of w."""
    h, wd = hw
    ph, pw = (-h) % w, (-wd) % w
    if ph or pw:
        x = b.op("Pad", x, b.ints(0, 0, 0, 0, 0, ph, pw, 0), mode="constant")
    hp, wp = h + ph, wd + pw
    x = b.op("Reshape", x, b.ints(-1, hp // w, w, wp // w, w, c))
    x = b.op("Transpose", x, perm=[0, 1, 3, 2, 4, 5])
    return b.op("Reshape", x, b.ints(-1, w, w, c)), (hp, wp)


def _window_unpartition(b: GraphBuilder, x: str, pad_hw, hw, c: int, w: int) -> str:
    hp, wp = pad_hw
    x = b.op("Reshape", x, b.ints(-1, hp // w, wp // w, w, w, c))
    x = b.op("Transpose", x, perm=[0, 1, 3, 2, 4, 5])
    x = b.op("Reshape", x, b.ints(-1, hp, wp, c))
    if (hp, wp) != tuple(hw):
        x = b.op("Slice", x, b.ints(0, 0), b.ints(*hw), b.ints(1, 2))
    return x


def _encoder_attention(b: GraphBuilder, x: str, p, heads: int, size: tuple[int, int], c: int):
    """Official `image_encoder.Attention` with the decomposed rel-pos bias: x (B, h, w, C)."""

    h, w = size
    hd = c // heads
    with b.scope("attn"):
        qkv = b.dense(x, p["qkv"], "qkv")
        qkv = b.op("Reshape", qkv, b.ints(-1, h * w, 3, heads, hd))
        qkv = b.op("Transpose", qkv, perm=[2, 0, 3, 1, 4])  # (3, B, heads, hw, hd)
        q, k, v = (b.op("Gather", qkv, b.const(i, np.int64), axis=0) for i in range(3))
        kt = b.op("Transpose", k, perm=[0, 1, 3, 2])
        logits = b.op("MatMul", b.op("Mul", q, b.const(hd**-0.5)), kt)  # (B, heads, hw, hw)
        with b.scope("rel_pos"):
            r_h = b.param(np.asarray(get_rel_pos(h, h, _np(p["rel_pos_h"]))), "rel_pos_h")
            r_w = b.param(np.asarray(get_rel_pos(w, w, _np(p["rel_pos_w"]))), "rel_pos_w")
            r_q = b.op("Reshape", q, b.ints(-1, heads, h, w, hd))
            rel_h = b.op("Einsum", r_q, r_h, equation="bnhwc,hkc->bnhwk")
            rel_w = b.op("Einsum", r_q, r_w, equation="bnhwc,wkc->bnhwk")
            logits = b.op("Reshape", logits, b.ints(-1, heads, h, w, h, w))
            logits = b.op("Add", logits, b.op("Unsqueeze", rel_h, b.ints(5)))
            logits = b.op("Add", logits, b.op("Unsqueeze", rel_w, b.ints(4)))
            logits = b.op("Reshape", logits, b.ints(-1, heads, h * w, h * w))
        out = b.op("MatMul", b.op("Softmax", logits, axis=-1), v)  # (B, heads, hw, hd)
        out = b.op("Transpose", out, perm=[0, 2, 1, 3])
        out = b.op("Reshape", out, b.ints(-1, h, w, c))
        return b.dense(out, p["proj"], "proj")


def encoder_model(model, params, gelu_approximate: bool = False, opset: int = DEFAULT_OPSET):
    """The ONNX `ModelProto` of the image encoder: `x` (B, 3, S, S) -> `image_embeddings`."""
    opset = check_opset(opset)
    c: SamConfig = model.config
    s, g, d, e = c.image_size, c.embedding_size, c.prompt_embed_dim, c.encoder_embed_dim
    params = _host(params)
    p = params["image_encoder"]
    b = GraphBuilder(opset)
    with b.scope("image_encoder"):
        with b.scope("patch_embed"):
            x = b.conv("x", p["patch_embed"]["proj"], "proj", stride=c.patch_size)
        x = b.op("Transpose", x, perm=[0, 2, 3, 1])  # (B, g, g, C)
        x = b.op("Add", x, b.param(p["pos_embed"], "pos_embed"))
        for i in range(c.encoder_depth):
            bp = p[f"blocks_{i}"]
            window = 0 if i in c.encoder_global_attn_indexes else c.window_size
            with b.scope(f"blocks_{i}"):
                shortcut = x
                y = b.layer_norm(x, bp["norm1"], 1e-6, "norm1")
                if window:
                    y, pad_hw = _window_partition(b, y, (g, g), e, window)
                    y = _encoder_attention(b, y, bp["attn"], c.encoder_num_heads, (window,) * 2, e)
                    y = _window_unpartition(b, y, pad_hw, (g, g), e, window)
                else:
                    y = _encoder_attention(b, y, bp["attn"], c.encoder_num_heads, (g, g), e)
                x = b.op("Add", shortcut, y)
                y = b.layer_norm(x, bp["norm2"], 1e-6, "norm2")
                with b.scope("mlp"):
                    y = b.gelu(b.dense(y, bp["mlp"]["lin1"], "lin1"), gelu_approximate)
                    y = b.dense(y, bp["mlp"]["lin2"], "lin2")
                x = b.op("Add", x, y)
        x = b.op("Transpose", x, perm=[0, 3, 1, 2])  # (B, C, g, g)
        x = b.conv(x, p["neck_0"], "neck_0")
        x = b.layer_norm_2d(x, p["neck_1"], 1e-6, "neck_1")
        x = b.conv(x, p["neck_2"], "neck_2", pad=1)
        x = b.layer_norm_2d(x, p["neck_3"], 1e-6, "neck_3")
    b.output(x, "image_embeddings")
    inputs = [_tensor("x", np.float32, ["batch", 3, s, s])]
    outputs = [_tensor("image_embeddings", np.float32, ["batch", d, g, g])]
    options = {"gelu_approximate": bool(gelu_approximate)}
    doc = (
        "SAM image encoder exported by sam_jax: x (B, 3, S, S) normalised with the pixel "
        "mean/std and zero-padded bottom/right -> image_embeddings (B, D, g, g)"
    )
    meta = {"sam_jax.part": "encoder", "sam_jax.config": c.to_json(), **_meta_options(options)}
    return b.model(inputs, outputs, doc, meta)


def _host(params) -> dict:
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), dict(params))


# ---------------------------------------------------------------------------------- files


def weight_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def needs_external_data(proto) -> bool:
    return weight_bytes(proto) > EXTERNAL_DATA_ABOVE


def externalize(proto, location: str, file, threshold: int = 1024) -> int:
    """Moves the initializers of at least `threshold` bytes into `file` (opened for writing),
    recorded in `proto` as external data at `location` (a path relative to the model file), as
    onnx's own external-data format. Returns the bytes written."""
    from onnx import TensorProto
    from onnx.external_data_helper import set_external_data

    offset = 0
    for tensor in proto.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < threshold:
            continue
        data = tensor.raw_data
        file.write(data)
        set_external_data(tensor, location=location, offset=offset, length=len(data))
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        offset += len(data)
    return offset
