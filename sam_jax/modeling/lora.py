"""Low-rank adapters (LoRA, Hu et al. 2021) for SAM's linear layers.

Adapters are their own pytree beside the frozen params, keyed by the module path of the layer
they adapt: `adapters["image_encoder"]["blocks_3"]["attn"]["qkv"] = {"a": (in, r), "b": (r, out)}`.
The layer computes y = x W + bias + (alpha / r) (x a) b (`sam_jax.modeling.common.Dense`, which
reads them from the `lora` variable collection); `merge` folds them into W, giving an ordinary
SAM params tree (what training exports, so the predictor, AMG, eval, the converter and export do
not know adapters exist). `a` starts as kaiming-uniform, `b` as zeros (the adapted model starts
equal to the base, as in the paper and peft).

Targets (names for `config.lora.targets`), in either image encoder: SAM's ViT
(`blocks_{i}`) or MobileSAM's TinyViT (`layers_{i}/blocks_{j}`, its attention stages only; the
first stage's MBConv blocks are convolutions):
    qkv           image encoder attention qkv projection     (SAMed: rank 4 on these)
    proj          image encoder attention output projection
    mlp           image encoder MLP (ViT lin1 and lin2, TinyViT fc1 and fc2)
    decoder_attn  the two-way transformer's q/k/v/out projections (every attention)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.errors import ConfigError

_ENCODER_BLOCK = r"^image_encoder/(layers_\d+/)?blocks_\d+"  # ViT | TinyViT
TARGETS = {
    "qkv": re.compile(_ENCODER_BLOCK + r"/attn/qkv$"),
    "proj": re.compile(_ENCODER_BLOCK + r"/attn/proj$"),
    "mlp": re.compile(_ENCODER_BLOCK + r"/mlp/(lin[12]|fc[12])$"),
    "decoder_attn": re.compile(r"^mask_decoder/transformer/.+/(q|k|v|out)_proj$"),
}


def _kernels(param_shapes: Any) -> dict[str, tuple[int, int]]:
    """'module/path' -> (in, out) of every Dense kernel in a params tree."""
    out = {}

    def visit(tree, prefix):
        for name, sub in tree.items():
            if name == "kernel" and not isinstance(sub, dict) and len(sub.shape) == 2:
                out[prefix] = tuple(int(d) for d in sub.shape)
            elif isinstance(sub, dict):
                visit(sub, f"{prefix}/{name}" if prefix else name)

    visit(param_shapes, "")
    return out


def target_layers(
    param_shapes: Any, targets: Sequence[str], rank: int
) -> dict[str, tuple[int, int]]:
    """The adapted layers: 'module/path' -> (in, out), sorted. ConfigError (one line) for an
    unknown target name, a target that matches no layer of this model, or a rank larger than
    a layer's smaller side."""
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"config field lora.targets must be a non-empty tuple, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(
            f"config field lora.targets: unknown target(s) {unknown}; choose from {list(TARGETS)}"
        )
    kernels = _kernels(param_shapes)
    layers = {}
    for t in targets:
        found = {p: s for p, s in kernels.items() if TARGETS[t].match(p)}
        if not found:
            raise ConfigError(f"config field lora.targets: {t!r} matches no layer of this model")
        layers.update(found)
    for path, (d_in, d_out) in layers.items():
        if rank > min(d_in, d_out):
            raise ConfigError(
                f"config field lora.rank {rank} is larger than layer {path} ({d_in} x {d_out}); "
                f"use at most {min(d_in, d_out)}"
            )
    return dict(sorted(layers.items()))


def num_adapter_params(layers: dict[str, tuple[int, int]], rank: int) -> int:
    """r * (in + out) summed over the adapted layers."""
    return sum(rank * (d_in + d_out) for d_in, d_out in layers.values())


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def flatten(adapters: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Nested adapters -> {'module/path': {"a", "b"}}."""
    out = {}

    def visit(tree, prefix):
        if "a" in tree and "b" in tree and not isinstance(tree["a"], dict):
            out[prefix] = tree
            return
        for name, sub in tree.items():
            visit(sub, f"{prefix}/{name}" if prefix else name)

    visit(adapters, "")
    return out


def init_adapters(key: jax.Array, layers: dict[str, tuple[int, int]], rank: int) -> dict:
    """Float32 adapters: a ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), b = 0."""
    keys = jax.random.split(key, max(len(layers), 1))
    flat = {}
    for k, (path, (d_in, d_out)) in zip(keys, layers.items(), strict=False):
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(k, (d_in, rank), jnp.float32, -bound, bound)
        flat[path] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
    return _nest(flat)


def lora_variables(adapters: dict, scale: float, dropout: float = 0.0) -> dict:
    """The `lora` variable collection for `model.apply`: b scaled by alpha / r (differentiable,
    so gradients reach a and b), plus the dropout rate when it is > 0."""
    extra = {"rate": jnp.asarray(dropout, jnp.float32)} if dropout > 0 else {}
    flat = {p: {"a": ab["a"], "b": ab["b"] * scale, **extra} for p, ab in flatten(adapters).items()}
    return _nest(flat)


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """params with each adapted kernel W replaced by W + scale * a b (float32); the rest shared."""
    flat = flatten(adapters)
    if not flat:
        return params

    def visit(tree, prefix):
        out = {}
        for name, sub in tree.items():
            path = f"{prefix}/{name}" if prefix else name
            if isinstance(sub, dict):
                out[name] = visit(sub, path)
            elif name == "kernel" and prefix in flat:
                ab = flat[prefix]
                delta = jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)
                out[name] = jnp.asarray(sub, jnp.float32) + scale * delta
            else:
                out[name] = sub
        return out

    missing = [p for p in flat if p not in _kernels(params)]
    if missing:
        raise ValueError(f"adapters for layers the params do not have: {missing[:3]}")
    return visit(params, "")


def scale_of(lora_config: Any) -> float:
    """alpha / rank of a `config.lora` block."""
    return float(lora_config.alpha) / float(lora_config.rank)
