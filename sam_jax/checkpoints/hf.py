"""Hugging Face (transformers) SAM checkpoints: a `SamModel` directory (`config.json` and
`model.safetensors`, sharded `model.safetensors.index.json` or `pytorch_model.bin`) or a Hub id
(`facebook/sam-vit-base`, any fine-tune saved that way), read as and written from
(SamConfig, params).

The architecture comes from `config.json` (`config_from_hf` / `config_to_hf`). Tensor names go
through one rename table (`_RENAMES`, official torch key -> transformers key); the flax <-> torch
layout stays in mapping.py (`state_dict_to_params` / `params_to_state_dict`).

What transformers does differently, and how it is handled:
- MLPs (`SamFeedForward`) name the official `layers.0 .. layers.{n-1}` `proj_in, layers.0 ..
  layers.{n-3}, proj_out`, so they have at least 2 layers (an `iou_head_depth` of 1 builds 2).
- The random-Fourier matrix (2, D/2) is `shared_image_embedding.positional_embedding`;
  `prompt_encoder.shared_embedding.positional_embedding` is its tied copy (read only when the
  first is absent, never written). Its initial std (hidden_size / 2) matters only at init.
- The two-way blocks' LayerNorms (`layer_norm1..4`) use `mask_decoder_config.layer_norm_eps`
  (1e-6 in facebook/sam-vit-*) where the official model uses 1e-5, and the mask prompt's
  LayerNorm2d `prompt_encoder_config.layer_norm_eps`: both are read into the SamConfig
  (`decoder_layer_norm_eps`, `prompt_layer_norm_eps`), so a loaded folder computes what
  transformers computes (the difference is ~1e-2 in the logits of weights away from their
  init), and exports write ours, so transformers computes what sam_jax does.
- transformers' pad label -10 is not masked out of the decoder's attention (sam_jax's
  PAD_LABEL is), so padded prompts are not interchangeable; labels 1, 0, -1 and boxes are.
Anything else transformers could be configured to compute differently (no relative positions,
other activations or norm epsilons in the encoder, ...) is refused with a CheckpointError.

huggingface_hub (Hub ids) and safetensors are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.checkpoints.mapping import (
    describe_mismatch,
    expected_leaves,
    mlp_ratio_for,
    params_to_state_dict,
    state_dict_to_params,
)
from sam_jax.checkpoints.pth import read_state_dict
from sam_jax.config import PIXEL_MEAN, PIXEL_STD, SamConfig
from sam_jax.errors import CheckpointError, one_line

logger = logging.getLogger("sam_jax.checkpoints")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_warned_unverified: set[str] = set()

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"  # what SamProcessor.from_pretrained reads
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PE_KEY = "shared_image_embedding.positional_embedding"
TIED_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".json")

# Official torch key -> transformers key, applied in order (the MLPs are renamed by `_mlp_key`).
_RENAMES = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.blocks\.(\d+)\.norm(\d)\.", r".layers.\1.layer_norm\2."),
    (r"\.blocks\.", ".layers."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", PE_KEY),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"(\.transformer\.layers\.\d+)\.norm(\d)\.", r"\1.layer_norm\2."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
)
_MLP = re.compile(r"(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.")

# transformers' defaults for the fields a config.json may leave out.
_DEFAULTS = {
    "vision_config": dict(
        hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
        num_channels=3, image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, mlp_ratio=4.0, use_abs_pos=True, use_rel_pos=True, window_size=14,
        global_attn_indexes=[2, 5, 8, 11], num_pos_feats=128, mlp_dim=None,
    ),
    "prompt_encoder_config": dict(
        hidden_size=256, image_size=1024, patch_size=16, mask_input_channels=16,
        num_point_embeddings=4, hidden_act="gelu", layer_norm_eps=1e-6,
    ),
    "mask_decoder_config": dict(
        hidden_size=256, hidden_act="relu", mlp_dim=2048, num_hidden_layers=2,
        num_attention_heads=8, attention_downsample_rate=2, num_multimask_outputs=3,
        iou_head_depth=3, iou_head_hidden_dim=256, layer_norm_eps=1e-6,
    ),
}  # fmt: skip
# What sam_jax computes; a config asking for anything else is refused.
_REQUIRED = {
    "vision_config": dict(
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        use_abs_pos=True,
        use_rel_pos=True,
    ),
    "prompt_encoder_config": dict(num_point_embeddings=4, hidden_act="gelu"),
    "mask_decoder_config": dict(hidden_act="relu"),
}


# ----------------------------------------------------------------------------------------------
# Names.


def _mlp_key(key: str, config: SamConfig) -> str:
    def rename(m: re.Match) -> str:
        depth = 3 if m.group(1).startswith("output") else config.iou_head_depth
        i = int(m.group(2))
        name = "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"
        return f"{m.group(1)}.{name}."

    return _MLP.sub(rename, key)


def hf_keys(config: SamConfig) -> dict[str, str]:
    """{official torch key: transformers key} for every tensor of `config`, official order."""
    out = {}
    for key in expected_leaves(config):
        name = _mlp_key(key, config)
        for pattern, new in _RENAMES:
            name = re.sub(pattern, new, name)
        out[key] = name
    return out


# ----------------------------------------------------------------------------------------------
# config.json <-> SamConfig.


def _side(value: Any, name: str) -> int:
    """An int, or a square [h, w] as one int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} {list(value)} is not square")
        value = value[0]
    return int(value)


def config_from_hf(doc: Mapping[str, Any], where: str = CONFIG_FILE) -> SamConfig:
    """The `SamConfig` of a transformers SAM `config.json` (a dict); CheckpointError for another
    model type or for settings sam_jax does not compute."""
    model_type = doc.get("model_type") if isinstance(doc, Mapping) else None
    if model_type != "sam":
        raise CheckpointError(
            f"{where} is not a SAM: model_type {model_type!r}, expected 'sam' (transformers' "
            "SamModel)"
        )
    bad = [k for k in _DEFAULTS if not isinstance(doc.get(k) or {}, Mapping)]
    if bad:
        raise CheckpointError(f"bad SAM config in {where}: {bad[0]} is not an object")
    sub = {k: {**d, **(doc.get(k) or {})} for k, d in _DEFAULTS.items()}
    v, p, m = sub["vision_config"], sub["prompt_encoder_config"], sub["mask_decoder_config"]
    unsupported = [
        f"{part}.{k}={sub[part][k]!r} (sam_jax computes {want!r})"
        for part, fields in _REQUIRED.items()
        for k, want in fields.items()
        if sub[part][k] != want
    ]
    if unsupported:
        raise CheckpointError(f"{where} asks for what sam_jax does not compute: {unsupported[0]}")
    try:
        image_size = _side(v["image_size"], "image_size")
        patch = _side(v["patch_size"], "patch_size")
        d = int(v["output_channels"])
        sizes = {
            "vision_config.output_channels": d,
            "2 * vision_config.num_pos_feats": 2 * int(v["num_pos_feats"]),
            "prompt_encoder_config.hidden_size": int(p["hidden_size"]),
            "mask_decoder_config.hidden_size": int(m["hidden_size"]),
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"inconsistent prompt widths {sizes}")
        if (_side(p["image_size"], "image_size"), _side(p["patch_size"], "patch_size")) != (
            image_size,
            patch,
        ):
            raise ValueError("prompt_encoder_config image/patch size differ from vision_config's")
        e = int(v["hidden_size"])
        mlp_dim = int(v["mlp_dim"] or int(e * float(v["mlp_ratio"])))
        return SamConfig(
            image_size=image_size,
            patch_size=patch,
            encoder_embed_dim=e,
            encoder_depth=int(v["num_hidden_layers"]),
            encoder_num_heads=int(v["num_attention_heads"]),
            encoder_global_attn_indexes=tuple(v["global_attn_indexes"]),
            window_size=int(v["window_size"]),
            mlp_ratio=mlp_ratio_for(mlp_dim, e),
            prompt_embed_dim=d,
            mask_in_chans=int(p["mask_input_channels"]),
            decoder_depth=int(m["num_hidden_layers"]),
            decoder_mlp_dim=int(m["mlp_dim"]),
            decoder_num_heads=int(m["num_attention_heads"]),
            attention_downsample_rate=int(m["attention_downsample_rate"]),
            num_multimask_outputs=int(m["num_multimask_outputs"]),
            iou_head_depth=max(2, int(m["iou_head_depth"])),
            iou_head_hidden_dim=int(m["iou_head_hidden_dim"]),
            prompt_layer_norm_eps=float(p["layer_norm_eps"]),
            decoder_layer_norm_eps=float(m["layer_norm_eps"]),
        )
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"bad SAM config in {where}: {one_line(e)}") from None


def processor_to_hf(config: SamConfig) -> dict[str, Any]:
    """The transformers `preprocessor_config.json` (a dict) of `config`: SamImageProcessor's
    resize-longest-side, normalisation and padding for its image size, our pixel mean and std
    (in 0-1 units there), masks at the low-resolution mask size."""
    s, m = config.image_size, config.low_res_size
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [v / 255 for v in PIXEL_MEAN],
        "image_processor_type": "SamImageProcessor",
        "image_std": [v / 255 for v in PIXEL_STD],
        "mask_pad_size": {"height": m, "width": m},
        "mask_size": {"longest_edge": m},
        "pad_size": {"height": s, "width": s},
        "processor_class": "SamProcessor",
        "resample": 2,  # PIL bilinear, as the official ResizeLongestSide
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": s},
    }


def config_to_hf(config: SamConfig) -> dict[str, Any]:
    """The transformers `config.json` (a dict) of `config`."""
    c = config
    if c.iou_head_depth < 2:
        raise CheckpointError(
            f"iou_head_depth {c.iou_head_depth} cannot be written for transformers, whose IoU "
            "head has at least 2 layers"
        )
    vision = {
        **_DEFAULTS["vision_config"],
        "hidden_size": c.encoder_embed_dim,
        "output_channels": c.prompt_embed_dim,
        "num_hidden_layers": c.encoder_depth,
        "num_attention_heads": c.encoder_num_heads,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "mlp_ratio": c.mlp_ratio,
        "mlp_dim": int(c.encoder_embed_dim * c.mlp_ratio),
        "window_size": c.window_size,
        "global_attn_indexes": list(c.encoder_global_attn_indexes),
        "num_pos_feats": c.prompt_embed_dim // 2,
        "attention_dropout": 0.0,
        "initializer_range": 1e-10,
        "model_type": "sam_vision_model",
    }
    prompt = {
        **_DEFAULTS["prompt_encoder_config"],
        "hidden_size": c.prompt_embed_dim,
        "image_size": c.image_size,
        "patch_size": c.patch_size,
        "mask_input_channels": c.mask_in_chans,
        "layer_norm_eps": c.prompt_layer_norm_eps,
        "model_type": "sam_prompt_encoder",
    }
    decoder = {
        **_DEFAULTS["mask_decoder_config"],
        "hidden_size": c.prompt_embed_dim,
        "mlp_dim": c.decoder_mlp_dim,
        "num_hidden_layers": c.decoder_depth,
        "num_attention_heads": c.decoder_num_heads,
        "attention_downsample_rate": c.attention_downsample_rate,
        "num_multimask_outputs": c.num_multimask_outputs,
        "iou_head_depth": c.iou_head_depth,
        "iou_head_hidden_dim": c.iou_head_hidden_dim,
        "layer_norm_eps": c.decoder_layer_norm_eps,
        "model_type": "sam_mask_decoder",
    }
    return {
        "architectures": ["SamModel"],
        "model_type": "sam",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "vision_config": vision,
        "prompt_encoder_config": prompt,
        "mask_decoder_config": decoder,
    }


# ----------------------------------------------------------------------------------------------
# Reading.


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory with a `config.json` (a transformers checkpoint, or not one
    at all: `load_hf` says which)."""
    return paths.isdir(path) and paths.isfile(paths.join(os.fspath(path), CONFIG_FILE))


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` reads as a Hub id (`owner/name`, no such local path, no file suffix)."""
    name = os.fspath(name)
    return (
        bool(HUB_ID.fullmatch(name))
        and not name.lower().endswith(_CHECKPOINT_SUFFIXES)
        and not os.path.lexists(name)
    )


def _weight_files(folder: str) -> list[str]:
    """The weight files of a transformers directory (safetensors first), [] if there are none."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        if paths.isfile(paths.join(folder, single)):
            return [single]
        if paths.isfile(paths.join(folder, index)):
            where = paths.join(folder, index)
            try:
                weight_map = json.loads(paths.read_text(where))["weight_map"]
                return sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"bad weight index {where}: {one_line(e)}") from None
    return []


def _read_file(path: str) -> dict[str, np.ndarray]:
    if not paths.isfile(path):
        raise CheckpointError(f"{path} is missing (listed in the weight index)")
    if not path.endswith(".safetensors"):
        try:
            return read_state_dict(path)
        except ValueError as e:
            raise CheckpointError(one_line(e)) from None
    if paths.is_remote(path):
        raise CheckpointError(f"cannot read {path}: transformers checkpoints must be local")
    try:
        import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors needs
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError(f"reading {path} needs safetensors ({one_line(e)})") from None
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise CheckpointError(f"cannot read {path}: {one_line(e, 300)}") from None


def read_weights(folder: str, where: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a transformers folder's weight files (safetensors, sharded or not, else
    pytorch_model.bin), checked against the checksums the folder carries (`verify_weight_files`).
    """
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{where or folder} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or "
            f"{BIN} next to {CONFIG_FILE}"
        )
    verify_weight_files(folder, files)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(_read_file(paths.join(folder, file)))
    return tensors


def verify_weight_files(folder: str, files: list[str]) -> None:
    """Checks the weight files of a folder against the checksums it carries.

    The Hugging Face cache keeps each large file as `blobs/<its SHA-256>` behind a link in the
    snapshot folder: such a file is hashed and a mismatch (a damaged download or a file changed
    in the cache) is a CheckpointError. A plain folder carries no checksum: a warning says so,
    once per folder."""
    unverified = []
    for file in files:
        path = paths.join(folder, file)
        blob = os.path.basename(os.path.realpath(path)) if not paths.is_remote(path) else ""
        if not (os.path.islink(path) and _SHA256_NAME.fullmatch(blob)):
            unverified.append(file)
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        if digest.hexdigest() != blob:
            raise CheckpointError(
                f"{path} is damaged: its SHA-256 is {digest.hexdigest()} but the Hugging Face "
                f"cache stored it as {blob}; delete it from the cache and download it again"
            )
    if unverified and folder not in _warned_unverified:
        _warned_unverified.add(folder)
        logger.warning(
            "%s cannot be verified (a plain folder carries no checksums of %s): loading it "
            "unchecked; a Hub id (the Hugging Face cache names files by their SHA-256) or a "
            "converted checkpoint (sam-jax-convert) can be verified",
            folder,
            ", ".join(unverified),
        )


def hf_to_state_dict(
    tensors: Mapping[str, Any], config: SamConfig, where: str = "the checkpoint"
) -> dict[str, Any]:
    """transformers tensors -> official state_dict; CheckpointError naming the missing,
    unexpected or mis-shaped transformers keys."""
    tensors = dict(tensors)
    tied = tensors.pop(TIED_PE_KEY, None)
    if PE_KEY not in tensors and tied is not None:
        tensors[PE_KEY] = tied
    names = hf_keys(config)
    leaves = expected_leaves(config)
    expected = {names[k]: leaf.torch_shape for k, leaf in leaves.items()}
    problem = describe_mismatch({k: tuple(np.shape(v)) for k, v in tensors.items()}, expected)
    if problem:
        raise CheckpointError(f"{where} does not match its {CONFIG_FILE}: {problem}")
    return {key: tensors[names[key]] for key in leaves}


def download_hf(repo_id: str, extra_files: Sequence[str] = ()) -> str:
    """The local snapshot folder of a Hub model (config and weights only, plus `extra_files`
    such as a tokenizer's; the cache is reused, and is all there is with HF_HUB_OFFLINE=1).
    CheckpointError, one line, when it cannot be had."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise ImportError(
            f"loading {repo_id} from the Hugging Face Hub needs huggingface_hub ({one_line(e)})"
        ) from None
    cache = constants.HF_HUB_CACHE
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    try:
        extra = list(extra_files)
        path = snapshot_download(
            repo_id, allow_patterns=[CONFIG_FILE, "*.safetensors", SAFETENSORS_INDEX, *extra]
        )
        if not _weight_files(path) and paths.isfile(paths.join(path, CONFIG_FILE)):
            path = snapshot_download(
                repo_id, allow_patterns=[CONFIG_FILE, "*.bin", BIN_INDEX, *extra]
            )
        return path
    except GatedRepoError:
        reason = "is gated: accept its terms on the Hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        reason = (
            f"does not exist on the Hugging Face Hub ({constants.ENDPOINT}), nor as a local path "
            "(a private model needs `hf auth login`)"
        )
    except RevisionNotFoundError as e:
        reason = f"has no such revision: {one_line(e, 200)}"
    except HFValidationError as e:
        reason = f"is not a valid Hub id: {one_line(e, 200)}"
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set, so the network is off"
        else:
            why = f"the Hub ({constants.ENDPOINT}) cannot be reached"
        reason = (
            f"is not in the Hugging Face cache ({folder} does not hold it) and {why}: download it "
            f"where there is a network (`hf download {repo_id}`) into that cache (HF_HUB_CACHE)"
        )
    except OSError as e:  # other HTTP errors (HfHubHTTPError is an OSError), disk errors
        reason = f"cannot be downloaded: {type(e).__name__}: {one_line(e, 300)}"
    raise CheckpointError(f"checkpoint {repo_id} {reason}")


def load_hf(path: str | os.PathLike) -> tuple[SamConfig, dict[str, Any]]:
    """A transformers SAM directory or Hub id -> (config, params as float32 numpy arrays)."""
    name = os.fspath(path)
    folder = paths.resolve(name) if paths.isdir(name) else download_hf(name)
    config_file = paths.join(folder, CONFIG_FILE)
    where = folder if paths.isdir(name) else name
    if not paths.isfile(config_file):
        raise CheckpointError(
            f"{where} is not a transformers checkpoint: it has no {CONFIG_FILE} (a SamModel "
            f"folder holds {CONFIG_FILE} and {SAFETENSORS})"
        )
    try:
        doc = json.loads(paths.read_text(config_file))
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not JSON: {one_line(e)}") from None
    config = config_from_hf(doc, config_file)
    tensors = read_weights(folder, where)
    sd = hf_to_state_dict(tensors, config, f"{where} ({', '.join(_weight_files(folder))})")
    try:
        return config, state_dict_to_params(sd, config)
    except ValueError as e:
        raise CheckpointError(f"{where}: {one_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# Writing.


def save_hf(
    path: str | os.PathLike, config: SamConfig, params: Mapping[str, Any], overwrite: bool = False
) -> None:
    """Writes a transformers `SamModel` directory: `config.json`, `model.safetensors` (float32, the
    tied positional-embedding copy left out, as `save_pretrained` does) and the
    `preprocessor_config.json` that `SamProcessor.from_pretrained` needs.

    Locally the directory appears whole (`paths.atomic_output`); on an object store the weights
    are written first and `config.json` last, so a directory without it is no checkpoint yet.
    """
    from safetensors.numpy import save, save_file

    if config.encoder_type != "vit":
        raise CheckpointError(
            f"transformers has no SAM with a {config.encoder_type} image encoder (MobileSAM): "
            "write it as a converted checkpoint or a .pth instead"
        )
    if config.text_embed_dim:
        raise CheckpointError(
            "transformers' SamModel has no text prompts: write a SAM with a text path as a "
            "converted checkpoint or a .pth instead"
        )
    text = json.dumps(config_to_hf(config), indent=2, sort_keys=True) + "\n"
    processor = json.dumps(processor_to_hf(config), indent=2, sort_keys=True) + "\n"
    names = hf_keys(config)
    tensors = {names[k]: v for k, v in params_to_state_dict(params, config).items()}
    metadata = {"format": "pt"}  # what transformers expects of a PyTorch safetensors file
    if not paths.is_remote(path):
        with paths.atomic_output(path, overwrite) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / SAFETENSORS), metadata=metadata)
            (tmp / PREPROCESSOR_FILE).write_text(processor, encoding="utf-8")
            (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        return
    path = paths.resolve(path)
    paths.check_new_output(path, overwrite)
    if paths.exists(path):
        paths.rmtree(path)
    paths.write_bytes(paths.join(path, SAFETENSORS), save(tensors, metadata=metadata))
    paths.write_text(paths.join(path, PREPROCESSOR_FILE), processor)
    paths.write_text(paths.join(path, CONFIG_FILE), text)
