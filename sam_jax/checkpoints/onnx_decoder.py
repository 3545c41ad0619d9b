"""The prompt encoder and mask decoder of a `SamOnnxModel` ONNX file, matched by structure.

Meta's `scripts/export_onnx_model.py` layout (single- or multi-mask, torch-exported or written
by `sam-jax-export`). Parallel branches are told apart by what they do, not by node order:

- Fourier PE: the MatMul with a constant (2, D/2) matrix (used for points and the dense PE);
- point embeddings: the (1, D) constants multiplied by `labels == c`, c the label (-1: not a
  point, 0..3: point_embeddings[c]);
- no-mask embedding: the (1, D, 1, 1) constant; mask downscaling: the Convs in order, and the
  channels-first norms fed by a Conv;
- tokens: the (1, K, D) constant(s) concatenated before the prompts (iou token first);
- attention: each Softmax in order (self, token->image, image->token per layer, then final);
  q and k are the projections its logits MatMul reads, v the one its output multiplies, out the
  projection that reads the result; heads from the logits' scale (1/sqrt(head dim));
- LayerNorms over the last axis in order (norm1..4 per layer, then norm_final_attn);
- text projection (sam-jax-export of a model with a text path): the linear reading the input
  `text_embeddings` over its norm;
- MLPs: chains of linears joined by ReLU; a chain reading token t of the transformer output
  (Gather / Slice on it) is the IoU head (t = 0) or hypernetwork MLP t - 1; the others are the
  transformer MLPs in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_jax.checkpoints.onnx_graph import LAYOUT_OPS, Graph, GraphMismatch, Op
from sam_jax.config import SamConfig

PE, MD = "prompt_encoder", "mask_decoder"


def _lin(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"] = np.ascontiguousarray(op.arrays["weight"].T)
    if "bias" in op.arrays:
        sd[key + ".bias"] = op.arrays["bias"]


def _norm(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"], sd[key + ".bias"] = op.arrays["scale"], op.arrays["bias"]


def _conv(sd: dict, key: str, op: Op) -> None:
    sd[key + ".weight"] = op.arrays["weight"]
    sd[key + ".bias"] = op.arrays.get(
        "bias", np.zeros(op.shape()[1 if op.kind == "conv_transpose" else 0], np.float32)
    )


def _label_of(g: Graph, name: str) -> float | None:
    """The label c of a `labels == c` mask (through Cast / Unsqueeze), None if not one."""
    node, _ = g.trace_back(name)
    if node is None or node.op_type != "Equal":
        return None
    value, _ = g.const_operand(node)
    return None if value is None or value.size != 1 else float(value.reshape(()))


def _token_index(g: Graph, name: str) -> int | None:
    """Which token of the transformer output a head MLP reads: Gather(axis 1, t) possibly on a
    Slice(start s, axis 1): s + t."""
    node, _ = g.trace_back(name, ("Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"))
    if node is None or node.op_type != "Gather" or g.attrs(node).get("axis", 0) != 1:
        return None
    t = g.const(node.input[1])
    if t is None or t.size != 1:
        return None
    index = int(t.reshape(()))
    src = g.producer.get(node.input[0])
    if src is not None and src.op_type == "Slice":
        starts, axes = g.const(src.input[1]), g.const(src.input[3]) if len(src.input) > 3 else None
        if starts is not None and (axes is None or int(np.ravel(axes)[0]) == 1):
            index += int(np.ravel(starts)[0])
    return index


def _attention(g: Graph, softmax: Any, by_out: dict[str, Op], by_x: dict[str, list[Op]]):
    """(q, k, v, out projections, head dim) of the attention around `softmax`."""
    node = g.producer.get(softmax.input[0])
    head_dim = None
    if node is not None and node.op_type in ("Div", "Mul"):
        scale, rest = g.const_operand(node)
        if scale is not None and scale.size == 1:
            s = float(scale.reshape(()))
            head_dim = round(s * s) if node.op_type == "Div" else round(1 / (s * s))
            node = g.producer.get(rest)
    if node is None or node.op_type != "MatMul":
        raise GraphMismatch("an attention's logits are not a MatMul of projections")

    def projection(name: str) -> Op:
        _, src = g.trace_back(name, LAYOUT_OPS + ("Split",))
        if src not in by_out:
            raise GraphMismatch("an attention input is not a linear projection")
        return by_out[src]

    q, k = projection(node.input[0]), projection(node.input[1])
    av = [n for n in g.consumers.get(softmax.output[0], []) if n.op_type == "MatMul"]
    if len(av) != 1:
        raise GraphMismatch("an attention's probabilities do not multiply one value tensor")
    v = projection(av[0].input[1])
    outs = by_x.get(_last(g, av[0].output[0]), [])
    if len(outs) != 1:
        raise GraphMismatch("an attention's output has no single output projection")
    if head_dim is None or head_dim <= 0:
        raise GraphMismatch("an attention's logits are not scaled by 1/sqrt(head dim)")
    return q, k, v, outs[0], head_dim


def _last(g: Graph, name: str) -> str:
    """The tensor reached from `name` through layout ops with one consumer each."""
    while True:
        users = g.data_consumers(name)
        if len(users) == 1 and users[0].op_type in LAYOUT_OPS:
            name = users[0].output[0]
            continue
        return name


def _reads_text_input(g: Graph, name: str) -> bool:
    """`name` is the graph input text_embeddings divided by something (its norm)."""
    node, _ = g.trace_back(name)
    return node is not None and node.op_type == "Div" and node.input[0] == "text_embeddings"


def decoder_state_dict(g: Graph) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """-> (config fields, prompt-encoder + mask-decoder state_dict, info {grid, notes})."""
    linears = g.linears()
    sd: dict[str, np.ndarray] = {}
    # Fourier PE matrix (2, D/2): every use must hold the same values.
    gauss = [op for op in linears if op.shape()[0] == 2]
    if not gauss:
        raise GraphMismatch("not a SAM decoder: no Fourier positional-encoding matrix (2, D/2)")
    if any(not np.array_equal(op.arrays["weight"], gauss[0].arrays["weight"]) for op in gauss):
        raise GraphMismatch("two different positional-encoding matrices")
    sd[f"{PE}.pe_layer.positional_encoding_gaussian_matrix"] = gauss[0].arrays["weight"]
    d = 2 * gauss[0].shape()[1]
    linears = [op for op in linears if op.shape()[0] != 2]

    # Point embeddings by the label that gates them; the no-mask embedding.
    labels: dict[float, np.ndarray] = {}
    no_mask = None
    for node in g.nodes_of("Mul"):
        value, other = g.const_operand(node)
        if value is None:
            continue
        if value.shape in ((1, d), (d,)):
            c = _label_of(g, other)
            if c is not None:
                labels[c] = value.reshape(1, d)
        elif value.shape == (1, d, 1, 1):
            no_mask = value.reshape(1, d)
    names = {-1.0: "not_a_point_embed", 0.0: "point_embeddings.0", 1.0: "point_embeddings.1"}
    names |= {2.0: "point_embeddings.2", 3.0: "point_embeddings.3"}
    missing = [names[c] for c in names if c not in labels]
    if missing or no_mask is None:
        missing += [] if no_mask is not None else ["no_mask_embed"]
        raise GraphMismatch(f"not a SAM decoder: no {', '.join(missing)} in the prompt encoder")
    for c, name in names.items():
        sd[f"{PE}.{name}.weight"] = labels[c]
    sd[f"{PE}.no_mask_embed.weight"] = no_mask

    # Mask downscaling (Conv, norm2d, GELU, Conv, norm2d, GELU, Conv) and output upscaling.
    conv_ops = g.convs()
    convs = [op for op in conv_ops if op.kind == "conv"]
    ups = [op for op in conv_ops if op.kind == "conv_transpose"]
    norms = g.norms()
    by_out = {op.out: op for op in conv_ops}
    norm2d = {"conv": [], "conv_transpose": []}
    for op in (o for o in norms if o.attrs["channels_first"]):
        src = g.producer.get(op.x)
        if src is not None and src.output[0] in by_out:
            norm2d[by_out[src.output[0]].kind].append(op)
    if len(convs) != 3 or len(norm2d["conv"]) != 2:
        raise GraphMismatch(
            f"not a SAM decoder: {len(convs)} mask-downscaling convolutions and "
            f"{len(norm2d['conv'])} of its norms (expected 3 and 2)"
        )
    for j, op in zip((0, 3, 6), convs, strict=True):
        _conv(sd, f"{PE}.mask_downscaling.{j}", op)
    for j, op in zip((1, 4), norm2d["conv"], strict=True):
        _norm(sd, f"{PE}.mask_downscaling.{j}", op)
    if len(ups) != 2 or len(norm2d["conv_transpose"]) != 1:
        raise GraphMismatch(
            f"not a SAM decoder: {len(ups)} transposed convolutions (expected 2 with a norm)"
        )
    _conv(sd, f"{MD}.output_upscaling.0", ups[0])
    _norm(sd, f"{MD}.output_upscaling.1", norm2d["conv_transpose"][0])
    _conv(sd, f"{MD}.output_upscaling.3", ups[1])

    # Tokens: (1, K, D) constants feeding a Concat / Expand (not the (1, g*g, D) dense PE).
    tokens = []
    for name, value in g.consts.items():
        if value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == d and value.shape[1] <= 16:
            users = g.consumers.get(name, [])
            if any(u.op_type in ("Concat", "Expand") for u in users):
                tokens.append((min(g.node_pos(u) for u in users), name, value[0]))
    tokens.sort(key=lambda t: t[0])
    if len(tokens) == 2:  # iou token and mask tokens apart: in the order they are concatenated
        concats = {id(u): u for _, name, _ in tokens for u in g.consumers[name]}
        both = [u for u in concats.values() if all(name in u.input for _, name, _ in tokens)]
        if len(both) == 1:
            tokens.sort(key=lambda t: list(both[0].input).index(t[1]))
    if len(tokens) == 1 and tokens[0][2].shape[0] >= 2:
        iou_token, mask_tokens = tokens[0][2][:1], tokens[0][2][1:]
    elif len(tokens) == 2 and tokens[0][2].shape[0] == 1:
        iou_token, mask_tokens = tokens[0][2], tokens[1][2]
    else:
        raise GraphMismatch("not a SAM decoder: no output tokens (iou token + mask tokens)")
    sd[f"{MD}.iou_token.weight"], sd[f"{MD}.mask_tokens.weight"] = iou_token, mask_tokens
    num_tokens = mask_tokens.shape[0]

    # Attention, in order.
    by_lin_out = {op.out: op for op in linears}
    by_x: dict[str, list[Op]] = {}
    for op in linears:
        by_x.setdefault(op.x, []).append(op)
    softmaxes = g.nodes_of("Softmax")
    if len(softmaxes) < 1 or (len(softmaxes) - 1) % 3:
        raise GraphMismatch(f"not a SAM two-way transformer: {len(softmaxes)} attentions")
    depth = (len(softmaxes) - 1) // 3
    modules = [
        f"layers.{i}.{m}"
        for i in range(depth)
        for m in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    ] + ["final_attn_token_to_image"]
    used: set[int] = set()
    head_dims = {}
    for module, sm in zip(modules, softmaxes, strict=True):
        q, k, v, out, head_dim = _attention(g, sm, by_lin_out, by_x)
        for name, op in zip(
            ("q_proj", "k_proj", "v_proj", "out_proj"), (q, k, v, out), strict=True
        ):
            _lin(sd, f"{MD}.transformer.{module}.{name}", op)
            used.add(id(op))
        head_dims[module] = (q.shape()[1], head_dim)
    rest = [op for op in linears if id(op) not in used]

    # The text projection (sam-jax-export of a model with a text path): the linear that reads
    # the graph input `text_embeddings` divided by its norm.
    text = [op for op in rest if _reads_text_input(g, op.x)]
    if len(text) > 1:
        raise GraphMismatch("two linears read text_embeddings")
    if text:
        _lin(sd, f"{PE}.text_projection", text[0])
        rest = [op for op in rest if op is not text[0]]

    # LayerNorms over the last axis, in order.
    token_norms = [op for op in norms if not op.attrs["channels_first"]]
    names = [f"layers.{i}.norm{j}" for i in range(depth) for j in (1, 2, 3, 4)]
    names.append("norm_final_attn")
    if len(token_norms) != len(names):
        raise GraphMismatch(
            f"not a SAM two-way transformer: {len(token_norms)} LayerNorms (expected {len(names)})"
        )
    for name, op in zip(names, token_norms, strict=True):
        _norm(sd, f"{MD}.transformer.{name}", op)

    # MLP chains (linears joined by ReLU).
    nxt = {}
    for op in rest:
        users = [u for u in g.consumers.get(op.out, []) if u.op_type == "Relu"]
        if len(users) == 1:
            for follower in by_x.get(users[0].output[0], []):
                nxt[id(op)] = follower
    followers = {id(f) for f in nxt.values()}
    chains = []
    for op in rest:
        if id(op) in followers:
            continue
        chain = [op]
        while id(chain[-1]) in nxt:
            chain.append(nxt[id(chain[-1])])
        chains.append(chain)
    heads: dict[int, list[Op]] = {}
    mlps = []
    for chain in sorted(chains, key=lambda c: c[0].pos):
        t = _token_index(g, chain[0].x)
        if t is None:
            mlps.append(chain)
        elif t in heads:
            raise GraphMismatch(f"two MLPs read output token {t}")
        else:
            heads[t] = chain
    if len(mlps) != depth or any(len(c) != 2 for c in mlps):
        raise GraphMismatch(
            f"not a SAM two-way transformer: MLPs of lengths {[len(c) for c in mlps]} "
            f"(expected {depth} of 2)"
        )
    for i, (lin1, lin2) in enumerate(mlps):
        _lin(sd, f"{MD}.transformer.layers.{i}.mlp.lin1", lin1)
        _lin(sd, f"{MD}.transformer.layers.{i}.mlp.lin2", lin2)
    missing = [
        f"output_hypernetworks_mlps.{t - 1}" for t in range(1, num_tokens + 1) if t not in heads
    ]
    if 0 not in heads:
        missing.insert(0, "iou_prediction_head")
    if missing:
        raise GraphMismatch(f"the file lacks {', '.join(missing)}")
    for t, chain in heads.items():
        if t > num_tokens:
            raise GraphMismatch(
                f"an MLP reads output token {t}, beyond the {num_tokens} mask tokens"
            )
        prefix = (
            f"{MD}.iou_prediction_head" if t == 0 else f"{MD}.output_hypernetworks_mlps.{t - 1}"
        )
        for j, op in enumerate(chain):
            _lin(sd, f"{prefix}.layers.{j}", op)

    # Config fields.
    self_dim, self_hd = head_dims[modules[0]] if depth else head_dims[modules[-1]]
    cross_dim, cross_hd = head_dims[modules[-1]]
    num_heads = cross_dim // cross_hd
    if depth and self_dim // self_hd != num_heads:
        raise GraphMismatch(f"heads differ: {self_dim // self_hd} vs {num_heads}")
    iou = heads[0]
    fields = dict(
        prompt_embed_dim=d,
        mask_in_chans=convs[1].shape()[0],
        decoder_depth=depth,
        decoder_mlp_dim=mlps[0][0].shape()[1] if mlps else 2048,
        decoder_num_heads=num_heads,
        attention_downsample_rate=d // cross_dim,
        num_multimask_outputs=num_tokens - 1,
        iou_head_depth=len(iou),
        iou_head_hidden_dim=iou[0].shape()[1] if len(iou) > 1 else 256,
    )
    if text:
        fields["text_embed_dim"] = text[0].shape()[0]
    # LayerNorm epsilons: set only where the graph's differ from the defaults (in float32).
    for field, op in (
        ("decoder_layer_norm_eps", token_norms[0]),
        ("prompt_layer_norm_eps", norm2d["conv"][0]),
    ):
        eps = op.attrs["eps"]
        if np.float32(eps) != np.float32(getattr(SamConfig, field)):
            fields[field] = eps
    grid = None
    for dims in g.inputs.values():
        if len(dims) == 4 and dims[1] == d and isinstance(dims[2], int) and dims[2] > 0:
            grid = dims[2]
    notes = []
    k_out = [dims[1] for name, dims in g.outputs.items() if name == "iou_predictions"]
    if k_out and k_out[0] == 1:
        notes.append(
            "single-mask decoder: its multimask weights (the mask tokens, "
            f"{num_tokens} hypernetwork MLPs, the {num_tokens}-output IoU head) are all present"
        )
    return fields, sd, {"grid": grid, "notes": notes}
