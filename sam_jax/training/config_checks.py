"""Checks of an experiment config before any work: every field's type and range, one table.

`check_config(config)` runs first in `train_and_evaluate` (so `sam-jax-train` refuses a bad
config in about a second, before it joins other processes, builds a model or writes into the
workdir) and raises ConfigError (one line naming the field; the command exits 2). Inputs that
must exist (data folders, the init checkpoint) are checked by `check_inputs`, which raises
FileNotFoundError (exit 1). Checks that need the devices (mesh against the device count, batch
against the mesh) stay in train_loop, still before anything is written.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from sam_jax import paths
from sam_jax.checkpoints import is_checkpoint_name
from sam_jax.config import SamConfig
from sam_jax.data.spec import parse_dataset_spec
from sam_jax.errors import ConfigError
from sam_jax.modeling.image_encoder import REMAT_POLICIES

MODELS = ("vit_b", "vit_l", "vit_h", "tiny")
DTYPES = ("bfloat16", "float32", "float16")
ATTENTION = ("xla", "cudnn", "auto")
INIT_TYPES = ("random", "sam", "mae")
DECAYS = ("step", "cosine", "constant")

Check = Callable[[Any], str | None]  # the problem with a value, or None when it is fine


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(low: int, high: int | None = None) -> Check:
    def check(v):
        if not _is_int(v):
            return f"must be an integer, got {v!r}"
        if v < low or (high is not None and v > high):
            return f"must be in [{low}, {high}], got {v}" if high else f"must be >= {low}, got {v}"
        return None

    return check


def real(low: float, high: float | None = None, low_open: bool = False) -> Check:
    def check(v):
        if not _is_real(v) or v != v:  # NaN fails every range
            return f"must be a number, got {v!r}"
        bad_low = v <= low if low_open else v < low
        if bad_low or (high is not None and v > high):
            lo = f"({low}" if low_open else f"[{low}"
            return (
                f"must be in {lo}, {high}], got {v}"
                if high is not None
                else (f"must be {'>' if low_open else '>='} {low}, got {v}")
            )
        return None

    return check


def one_of(*choices: Any) -> Check:
    return lambda v: None if v in choices else f"must be one of {choices}, got {v!r}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {v!r}"


def int_tuple(length: int | None, low: int) -> Check:
    def check(v):
        if not isinstance(v, (tuple, list)) or (length is not None and len(v) != length):
            n = f"{length} " if length is not None else ""
            return f"must be a tuple of {n}integers, got {v!r}"
        if not all(_is_int(x) and (x >= low or x == -1 and low == -1) for x in v):
            return f"entries must be integers >= {low}, got {tuple(v)}"
        return None

    return check


def remat(v: Any) -> str | None:

    choices = (None, "", "none", *REMAT_POLICIES)
    return None if v in choices else f"must be one of {choices}, got {v!r}"


def jitter(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_real(x) for x in v):
        return f"must be None or (min, max), got {v!r}"
    return None if 0 < v[0] <= v[1] else f"must have 0 < min <= max, got {tuple(v)}"


def string_tuple(v: Any) -> str | None:
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, str) and x for x in v):
        return None
    return f"must be a non-empty tuple of names, got {v!r}"


def sorted_steps(v: Any) -> str | None:
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) and x >= 1 for x in v):
        return f"must be a tuple of step numbers >= 1, got {v!r}"
    return None if list(v) == sorted(v) else f"must be increasing, got {tuple(v)}"


# field -> check. Every field of sam_jax.training.defaults.base_config() has a row (a test
# checks it), so a new field cannot skip validation.
RULES: dict[str, Check] = {
    "model": one_of(*MODELS),
    "dtype": one_of(*DTYPES),
    "attention_impl": one_of(*ATTENTION),
    "remat_policy": remat,
    "init.type": one_of(*INIT_TYPES),
    "init.path": string,
    "trainable": one_of("all", "prompt_encoder_and_decoder", "mask_decoder", "none"),
    "lora.rank": integer(0),
    "lora.alpha": real(0.0, low_open=True),
    "lora.dropout": lambda v: real(0.0)(v) or (None if v < 1 else f"must be < 1, got {v}"),
    "lora.targets": string_tuple,
    "embedding_cache": one_of("auto", "on", "off"),
    "data.train": string,
    "data.train_split": string,
    "data.max_masks": integer(1),
    "data.large_scale_jitter": jitter,
    "batch_size": integer(1),
    "total_steps": integer(1),
    "seed": integer(0),
    "optimizer.lr": real(0.0, low_open=True),
    "optimizer.b1": real(0.0, 1.0),
    "optimizer.b2": real(0.0, 1.0),
    "optimizer.eps": real(0.0, low_open=True),
    "optimizer.weight_decay": real(0.0),
    "optimizer.warmup_steps": integer(0),
    "optimizer.decay": one_of(*DECAYS),
    "optimizer.decay_steps": sorted_steps,
    "optimizer.decay_factor": real(0.0, 1.0, low_open=True),
    "optimizer.layer_decay": real(0.0, 1.0, low_open=True),
    "optimizer.grad_clip_norm": real(0.0),
    "train.num_rounds": integer(1),
    "train.box_prob": real(0.0, 1.0),
    "train.box_noise_std": real(0.0),
    "train.box_noise_max": real(0.0),
    "train.focal_weight": real(0.0),
    "train.focal_alpha": real(-1.0, 1.0),
    "train.focal_gamma": real(0.0),
    "train.dice_weight": real(0.0),
    "train.iou_weight": real(0.0),
    "train.supervise_all_iou": boolean,
    "train.max_mask_area_fraction": real(0.0, 1.0, low_open=True),
    "train.mask_prompt_prob": real(0.0, 1.0),
    "train.text_prob": real(0.0, 1.0),
    "train.text_min_area": real(0.0),
    "train.unroll_rounds": integer(1),
    "train.remat_rounds": boolean,
    "mesh_shape": int_tuple(2, -1),
    "sharding_rules": lambda v: (
        None if isinstance(v, (tuple, list)) else f"must be a tuple, got {v!r}"
    ),
    "min_fsdp_size": integer(0),
    "checkpoint.every_steps": integer(1),
    "checkpoint.max_to_keep": integer(1),
    "checkpoint.async_save": boolean,
    "log_every_steps": integer(1),
    "eval.dataset": string,
    "eval.split": string,
    "eval.every_steps": integer(0),
    "eval.max_images": integer(1),
    "eval.max_masks": integer(0),  # 0: every mask
    "eval.num_points": int_tuple(None, 1),
    "eval.batch_size": integer(1),
    "eval.feed_mask": boolean,
    "peak_tflops_per_device": real(0.0),
    "compilation_cache_dir": string,
    "progress_bar": boolean,
}


def _get(config: Any, name: str) -> Any:
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def check_config(config: Any) -> None:
    """Raises ConfigError (one line, the field and the problem) for the first bad field."""
    for name, check in RULES.items():
        try:
            value = _get(config, name)
        except (KeyError, AttributeError):
            raise ConfigError(
                f"config field {name} is missing (start from base_config())"
            ) from None
        problem = check(value)
        if problem:
            raise ConfigError(f"config field {name} {problem}")
    if config.init.type != "random" and not config.init.path:
        raise ConfigError(f"config field init.path must be set for init.type={config.init.type!r}")
    _check_lora(config)
    if not config.eval.num_points:
        raise ConfigError("config field eval.num_points must list at least one click count")

    unknown = sorted(set(config.model_overrides) - set(SamConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"config field model_overrides has unknown SamConfig fields {unknown}")

    for name in ("data.train", *(("eval.dataset",) if config.eval.dataset else ())):
        try:
            parse_dataset_spec(_get(config, name), check_paths=False)
        except ValueError as e:
            raise ConfigError(f"config field {name}: {e}") from None


def _check_lora(config: Any) -> None:
    """What LoRA and the embedding cache need of `trainable` and the data (shapes are checked
    against the model by sam_jax.modeling.lora.target_layers)."""
    rank, trainable = config.lora.rank, config.trainable
    if trainable == "none" and rank == 0:
        raise ConfigError(
            'config field trainable "none" trains nothing without LoRA: set lora.rank > 0'
        )
    if trainable == "all" and rank > 0:
        raise ConfigError(
            'config fields trainable "all" and lora.rank > 0: full fine-tuning has no use for '
            'adapters; choose "none", "mask_decoder" or "prompt_encoder_and_decoder"'
        )
    if config.embedding_cache == "on":
        why = cache_blocker(config)
        if why:
            raise ConfigError(f'config field embedding_cache "on" is impossible: {why}')


def cache_blocker(config: Any) -> str | None:
    """Why the embedding cache cannot serve this config (None: it can)."""
    if config.trainable == "all":
        return 'the image encoder trains (trainable "all")'
    if config.lora.rank > 0 and any(t != "decoder_attn" for t in config.lora.targets):
        return "LoRA adapts the image encoder"
    if config.data.large_scale_jitter:
        return "large_scale_jitter changes the encoder input every epoch"
    return None


def _fetched(config: Any) -> bool:
    """init.path names a registry model or a Hub id (read_checkpoint fetches it)."""

    return config.init.type == "sam" and is_checkpoint_name(config.init.path)


def check_inputs(config: Any, workdir: str, resuming: bool) -> None:
    """FileNotFoundError (one line) when a dataset folder or file, or the init checkpoint (not
    read on resume), does not exist; OutputOverlapsInputError when the workdir is, or lies
    inside, one of them."""

    inputs = {}
    for name in ("data.train", *(("eval.dataset",) if config.eval.dataset else ())):
        spec = parse_dataset_spec(_get(config, name))  # FileNotFoundError for a missing path
        inputs.update({name: spec.path, f"{name} images": spec.images_dir})
    if config.init.type != "random":
        if not resuming and not paths.exists(config.init.path) and not _fetched(config):
            raise FileNotFoundError(f"init checkpoint {config.init.path} does not exist")
        inputs["init.path"] = config.init.path
    paths.check_output(workdir, inputs, flag="workdir")
