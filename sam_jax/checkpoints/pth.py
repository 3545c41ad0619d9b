"""Official PyTorch `.pth` checkpoints: reading a state_dict (with `torch.load(weights_only=True)`),
checking it against a config, writing one. torch is imported lazily."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.checkpoints.mapping import check_state_dict, infer_config, state_dict_to_params
from sam_jax.config import SamConfig, get_config
from sam_jax.errors import one_line


def check_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raises ValueError unless the SHA-256 of the file starts with `expected` (8..64 hex)."""
    expected = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(f"the expected SHA-256 must be 8 to 64 hex digits, got {expected!r}")
    if not paths.isfile(path):
        raise ValueError(f"cannot check the SHA-256 of {path}: not a file")
    digest = hashlib.sha256()
    with paths.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    actual = digest.hexdigest()
    if not actual.startswith(expected):
        raise ValueError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}")


def _unwrap(obj: Any, path: Any) -> Mapping[str, Any]:
    """The state_dict in a torch.load result: flat, or wrapped as {"model"|"state_dict": sd}."""
    import torch

    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} is not a state_dict (it holds a {type(obj).__name__})")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)]
        if len(wrapped) == 1:
            obj = obj[wrapped[0]]
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad or not obj:
        raise ValueError(
            f"{path} is not a state_dict of tensors"
            + (f" (non-tensor entries: {', '.join(bad[:4])})" if bad else " (it is empty)")
        )
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | os.PathLike, sha256: str | None = None) -> dict[str, np.ndarray]:
    """Reads an official `.pth` state_dict as {torch key: float32 numpy array} (BatchNorm
    `num_batches_tracked` counters: int64)."""
    path = paths.resolve(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    if sha256 is not None:
        check_sha256(path, sha256)
    import torch

    try:
        if paths.is_remote(path):
            with paths.open(path, "rb") as f:  # seekable: torch reads the zip's members in place
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types
        raise ValueError(f"{path} is not a PyTorch checkpoint: {one_line(e)[:300]}") from None
    sd = _unwrap(obj, path)
    out = {}
    for k, v in sd.items():
        if torch.is_floating_point(v):
            out[k] = v.detach().to(torch.float32).contiguous().numpy()
        elif k.endswith(".num_batches_tracked") and not v.is_complex():  # BatchNorm counters
            out[k] = v.detach().to(torch.int64).contiguous().numpy()
        else:
            raise ValueError(f"{k} has dtype {v.dtype}, expected a floating point tensor")
    return out


def load_pth(
    path: str | os.PathLike,
    model_type: str | None = None,
    decoder_num_heads: int | None = None,
    sha256: str | None = None,
) -> tuple[SamConfig, dict[str, Any]]:
    """Official `.pth` -> (config, params). The config is inferred from the tensor shapes unless
    `model_type` ("vit_b", "vit_l", "vit_h") is given, in which case the shapes must match it."""
    sd = read_state_dict(path, sha256)
    config = config_for_state_dict(sd, model_type, decoder_num_heads)
    return config, state_dict_to_params(sd, config)


def config_for_state_dict(
    sd: Mapping[str, Any], model_type: str | None = None, decoder_num_heads: int | None = None
) -> SamConfig:
    """The config of `sd` (inferred, or `model_type`'s), after a full key and shape check."""
    if model_type is None:
        config, what = infer_config(sd, decoder_num_heads), "the inferred config"
    else:
        overrides = {} if decoder_num_heads is None else {"decoder_num_heads": decoder_num_heads}
        config, what = get_config(model_type, **overrides), f"model type {model_type}"
    check_state_dict(sd, config, what)
    return config


def save_pth(path: str | os.PathLike, state_dict: Mapping[str, Any], overwrite: bool = False):
    """Writes a state_dict ({key: array}) as a `.pth` file with `torch.save`, atomically."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    if paths.is_remote(path):  # one object, published only when its upload completes
        path = paths.resolve(path)
        paths.check_new_output(path, overwrite)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        paths.write_bytes(path, buf.getbuffer())
        return
    with paths.atomic_output(path, overwrite) as tmp:
        torch.save(tensors, tmp)
