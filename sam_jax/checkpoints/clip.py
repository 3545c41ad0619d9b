"""CLIP checkpoints: transformers' `CLIPModel` (a folder with config.json and safetensors, or a
Hub id) and open_clip's state_dicts, read into (ClipConfig, params) of `sam_jax.modeling.clip`
through one table (`clip_leaves`: transformers key -> flax path and layout); open_clip's names
are first renamed to transformers' (`open_clip_to_hf`: its packed q/k/v split, its projection
matrices transposed), so the table is the one place that knows the layout.

What CLIP computes differently between the two is in the config: transformers' configs say
their activation (OpenAI's models QuickGELU), open_clip's models mostly use GELU (`-quickgelu`
names QuickGELU); both pool the text at the end-of-text token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from sam_jax import paths
from sam_jax.checkpoints import hf
from sam_jax.checkpoints.mapping import (
    Leaf,
    describe_mismatch,
    flax_path,
    to_flax_layout,
    to_torch_layout,
)
from sam_jax.errors import CheckpointError, one_line  # noqa: F401 - CheckpointError re-exported
from sam_jax.modeling.clip import ClipConfig


def _linear(key: str, n_in: int, n_out: int, bias: bool = True):
    yield key + ".weight", (n_out, n_in), "kernel", "linear"
    if bias:
        yield key + ".bias", (n_out,), "bias", "same"


def _norm(key: str, dim: int):
    yield key + ".weight", (dim,), "scale", "same"
    yield key + ".bias", (dim,), "bias", "same"


def _encoder(prefix: str, width: int, mlp: int, layers: int):
    for i in range(layers):
        layer = f"{prefix}.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{layer}.self_attn.{name}", width, width)
        yield from _norm(f"{layer}.layer_norm1", width)
        yield from _linear(f"{layer}.mlp.fc1", width, mlp)
        yield from _linear(f"{layer}.mlp.fc2", mlp, width)
        yield from _norm(f"{layer}.layer_norm2", width)


def _table(c: ClipConfig):
    """(transformers key, torch shape, flax leaf name or None, layout) of every tensor."""
    v, t = "vision_model", "text_model"
    w, p = c.vision_width, c.patch_size
    yield f"{v}.embeddings.class_embedding", (w,), None, "same"
    yield f"{v}.embeddings.patch_embedding.weight", (w, 3, p, p), "kernel", "conv"
    yield f"{v}.embeddings.position_embedding.weight", (c.grid**2 + 1, w), None, "same"
    yield from _norm(f"{v}.pre_layrnorm", w)
    yield from _encoder(v, w, c.vision_mlp_dim, c.vision_layers)
    yield from _norm(f"{v}.post_layernorm", w)
    tw = c.text_width
    yield f"{t}.embeddings.token_embedding.weight", (c.vocab_size, tw), None, "same"
    yield f"{t}.embeddings.position_embedding.weight", (c.context_length, tw), None, "same"
    yield from _encoder(t, tw, c.text_mlp_dim, c.text_layers)
    yield from _norm(f"{t}.final_layer_norm", tw)
    yield from _linear("visual_projection", w, c.embed_dim, bias=False)
    yield from _linear("text_projection", tw, c.embed_dim, bias=False)
    yield "logit_scale", (), None, "same"


def _flax_path(key: str, leaf: str | None) -> tuple[str, ...]:
    """transformers key -> our path: embeddings' parameters sit on the tower itself, the layer
    index joins its list name (layers_3), the MLP's Dense layers sit on the layer."""
    key = key.replace(".embeddings.class_embedding", ".class_embedding")
    key = key.replace(".embeddings.position_embedding.weight", ".position_embedding")
    key = key.replace(".embeddings.token_embedding.weight", ".token_embedding")
    key = key.replace(".embeddings.patch_embedding.", ".patch_embedding.")
    key = key.replace(".mlp.", ".")
    if leaf is None:  # a bare parameter: its own name ends the path
        return flax_path(key + ".x")[:-1]
    return flax_path(key, leaf)


def clip_leaves(config: ClipConfig) -> dict[str, Leaf]:
    """Every tensor of a CLIPModel with this config, keyed by its transformers name."""
    return {
        key: Leaf(key, shape, _flax_path(key, leaf), layout)
        for key, shape, leaf, layout in _table(config)
    }


def hf_to_params(sd: Mapping[str, Any], config: ClipConfig, where: str = "the checkpoint"):
    """transformers CLIPModel tensors -> our params (float32 numpy); CheckpointError naming the
    missing, unexpected or mis-shaped keys. position_ids buffers are ignored."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    leaves = clip_leaves(config)
    found = {k: tuple(np.shape(v)) for k, v in sd.items()}
    problem = describe_mismatch(found, {k: leaf.torch_shape for k, leaf in leaves.items()})
    if problem:
        raise CheckpointError(f"{where} does not match its CLIP config: {problem}")
    flat = {
        leaf.flax_path: to_flax_layout(np.asarray(sd[k], np.float32), leaf.layout)
        for k, leaf in leaves.items()
    }
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: Mapping[str, Any], config: ClipConfig) -> dict[str, np.ndarray]:
    """Our params -> transformers CLIPModel tensors (float32 numpy), the inverse of
    `hf_to_params`."""
    flat = traverse_util.flatten_dict(dict(params))
    return {
        k: np.array(to_torch_layout(np.asarray(flat[leaf.flax_path], np.float32), leaf.layout))
        for k, leaf in clip_leaves(config).items()
    }


def config_to_hf(config: ClipConfig) -> dict[str, Any]:
    """The transformers CLIP config.json (a dict) of `config` (`config_from_hf` reads it back)."""
    c = config
    common = {"hidden_act": c.hidden_act, "layer_norm_eps": c.layer_norm_eps}
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": c.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": {
            **common,
            "model_type": "clip_vision_model",
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "hidden_size": c.vision_width,
            "num_hidden_layers": c.vision_layers,
            "num_attention_heads": c.vision_heads,
            "intermediate_size": c.vision_mlp_dim,
            "projection_dim": c.embed_dim,
        },
        "text_config": {
            **common,
            "model_type": "clip_text_model",
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.context_length,
            "hidden_size": c.text_width,
            "num_hidden_layers": c.text_layers,
            "num_attention_heads": c.text_heads,
            "intermediate_size": c.text_mlp_dim,
            "projection_dim": c.embed_dim,
            "eos_token_id": 2 if c.eos_token_id is None else c.eos_token_id,
            "bos_token_id": c.vocab_size - 2,  # OpenAI's order: start, then end of text last
            "pad_token_id": c.vocab_size - 1,
        },
    }


def save_hf_clip(folder: str | os.PathLike, config: ClipConfig, params: Mapping[str, Any]) -> None:
    """Writes a transformers CLIPModel folder (config.json, model.safetensors) that
    `load_hf_clip` and transformers' `CLIPModel.from_pretrained` read; tokenizer files are the
    caller's to add."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = params_to_hf(params, config)
    save_file(tensors, os.path.join(folder, hf.SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(folder, hf.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config), f, indent=2, sort_keys=True)


def config_from_hf(doc: Mapping[str, Any], where: str = hf.CONFIG_FILE) -> ClipConfig:
    """The ClipConfig of a transformers CLIP config.json (a dict)."""
    if not isinstance(doc, Mapping) or doc.get("model_type") != "clip":
        raise CheckpointError(f"{where} is not a CLIP: model_type {doc.get('model_type')!r}")
    try:
        v, t = doc["vision_config"], doc["text_config"]
        acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
        if len(acts) != 1:
            raise ValueError(f"the towers use different activations {sorted(acts)}")
        eos = t.get("eos_token_id", 2)
        return ClipConfig(
            embed_dim=int(doc.get("projection_dim", 512)),
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            vision_width=int(v["hidden_size"]),
            vision_layers=int(v["num_hidden_layers"]),
            vision_heads=int(v["num_attention_heads"]),
            vision_mlp_dim=int(v["intermediate_size"]),
            vocab_size=int(t["vocab_size"]),
            context_length=int(t["max_position_embeddings"]),
            text_width=int(t["hidden_size"]),
            text_layers=int(t["num_hidden_layers"]),
            text_heads=int(t["num_attention_heads"]),
            text_mlp_dim=int(t["intermediate_size"]),
            hidden_act=acts.pop(),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
            eos_token_id=None if eos == 2 else int(eos),  # 2: argmax pooling (transformers)
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"bad CLIP config in {where}: {one_line(e)}") from None


# A CLIP folder's tokenizer files (transformers' names; a Hub download fetches them too).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def clip_folder(path: str | os.PathLike) -> str:
    """The local folder of a transformers CLIP: a folder as it is, a Hub id through the Hugging
    Face cache (config, weights and tokenizer files; `hf.download_hf`)."""
    name = os.fspath(path)
    return paths.resolve(name) if paths.isdir(name) else hf.download_hf(name, TOKENIZER_FILES)


def load_hf_clip(path: str | os.PathLike) -> tuple[ClipConfig, dict[str, Any]]:
    """A transformers CLIPModel folder or Hub id -> (config, params as float32 numpy)."""
    name = os.fspath(path)
    folder = clip_folder(name)
    config_file = paths.join(folder, hf.CONFIG_FILE)
    if not paths.isfile(config_file):
        raise CheckpointError(f"{name} is not a transformers checkpoint: it has no config.json")
    try:
        doc = json.loads(paths.read_text(config_file))
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not JSON: {one_line(e)}") from None
    config = config_from_hf(doc, config_file)
    tensors = hf.read_weights(folder)
    return config, hf_to_params(tensors, config, name)


def open_clip_to_hf(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An open_clip CLIP state_dict (numpy) -> transformers CLIPModel names and layouts."""
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        x = np.asarray(value)
        tower, rest = (
            ("vision_model", key[len("visual.") :])
            if key.startswith("visual.")
            else ("text_model", key)
        )
        if rest == "attn_mask" or key.endswith("position_ids"):
            continue
        if key == "logit_scale":
            out["logit_scale"] = x
        elif key == "visual.proj":
            out["visual_projection.weight"] = x.T
        elif key == "text_projection":
            out["text_projection.weight"] = x.T
        elif rest == "class_embedding":
            out[f"{tower}.embeddings.class_embedding"] = x
        elif rest == "conv1.weight":
            out[f"{tower}.embeddings.patch_embedding.weight"] = x
        elif rest == "positional_embedding":
            out[f"{tower}.embeddings.position_embedding.weight"] = x
        elif rest == "token_embedding.weight":
            out[f"{tower}.embeddings.token_embedding.weight"] = x
        elif rest.startswith(("ln_pre.", "ln_post.", "ln_final.")):
            name = {"ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}.get(
                rest.split(".")[0], "final_layer_norm"
            )
            out[f"{tower}.{name}.{rest.split('.')[1]}"] = x
        elif rest.startswith("transformer.resblocks."):
            _, _, i, *sub = rest.split(".")
            layer = f"{tower}.encoder.layers.{i}"
            sub = ".".join(sub)
            if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if sub.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(x, 3), strict=True):
                    out[f"{layer}.self_attn.{name}.{kind}"] = part
            else:
                renamed = {
                    "attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1",
                    "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                }  # fmt: skip
                module, kind = sub.rsplit(".", 1)
                if module not in renamed:
                    raise CheckpointError(f"unknown open_clip tensor {key}")
                out[f"{layer}.{renamed[module]}.{kind}"] = x
        else:
            raise CheckpointError(f"unknown open_clip tensor {key}")
    return out


def config_from_open_clip(
    sd: Mapping[str, Any],
    hidden_act: str = "gelu",
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> ClipConfig:
    """The ClipConfig of an open_clip CLIP state_dict, from its shapes. What the weights do not
    say: the heads (default width / 64, open_clip's rule for its configs) and the activation
    (GELU, or QuickGELU for `-quickgelu` models and OpenAI's)."""
    shape = {k: np.shape(v) for k, v in sd.items()}
    try:
        width, _, patch, _ = shape["visual.conv1.weight"]
        positions = shape["visual.positional_embedding"][0]
        text_width = shape["token_embedding.weight"][1]

        def depth(prefix):  # blocks under prefix: 1 + the largest index after it
            at = len(prefix.rstrip(".").split("."))
            return 1 + max(int(k.split(".")[at]) for k in shape if k.startswith(prefix))

        grid = int(round((positions - 1) ** 0.5))
        return ClipConfig(
            embed_dim=shape["text_projection"][1],
            image_size=grid * patch,
            patch_size=patch,
            vision_width=width,
            vision_layers=depth("visual.transformer.resblocks."),
            vision_heads=vision_heads or width // 64,
            vision_mlp_dim=shape["visual.transformer.resblocks.0.mlp.c_fc.weight"][0],
            vocab_size=shape["token_embedding.weight"][0],
            context_length=shape["positional_embedding"][0],
            text_width=text_width,
            text_layers=depth("transformer.resblocks."),
            text_heads=text_heads or text_width // 64,
            text_mlp_dim=shape["transformer.resblocks.0.mlp.c_fc.weight"][0],
            hidden_act=hidden_act,
        )
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"not an open_clip CLIP state_dict: {one_line(e)}") from None


class ClipTokenizer:
    """CLIP's tokenizer as transformers has it (`AutoTokenizer` of a CLIP folder: OpenAI's BPE,
    lower-cased, start and end-of-text tokens), padded and truncated to `context_length`.

    tokenizer(texts) -> (B, context_length) int32 ids for `Clip.encode_text`. Truncation keeps
    the end-of-text token last, as open_clip's `tokenize` does."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.context_length = tokenizer, int(context_length)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a string or a non-empty list of strings: {texts!r}")
        out = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length
        )
        ids = np.asarray(out["input_ids"], np.int32)
        eos = self.tokenizer.eos_token_id
        if eos is not None:  # a truncated text still ends with its end-of-text token
            cut = ~(ids == eos).any(axis=1)
            ids[cut, -1] = eos
        return ids


def load_clip_tokenizer(path: str | os.PathLike, context_length: int = 77) -> ClipTokenizer:
    """The tokenizer of a transformers CLIP folder or Hub id (transformers, imported here: the
    `text` extra). CheckpointError, one line, when the folder has no tokenizer files."""
    folder = clip_folder(path)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            f"CLIP's tokenizer needs transformers (pip install 'sam_jax[text]'): {one_line(e)}"
        ) from None
    if not any(paths.isfile(paths.join(folder, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{os.fspath(path)} has no tokenizer: a CLIP folder holds tokenizer.json, or "
            "vocab.json with merges.txt"
        )
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read the tokenizer of {os.fspath(path)}: {one_line(e)}"
        ) from None
    return ClipTokenizer(tok, context_length)
