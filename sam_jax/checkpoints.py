"""Reading, converting and writing SAM checkpoints.

Two formats:
- an official PyTorch `.pth` file: a flat state_dict (read with `torch.load(weights_only=True)`);
- a converted checkpoint: an orbax directory with two items, `params` (the params pytree, orbax
  `StandardSave`) and `config` (the `SamConfig` as a JSON object, orbax `JsonSave`; the file
  `<dir>/config/metadata` is plain JSON).

Paths may be local or URLs (gs://bucket/...): every access goes through `sam_jax.paths`.
Writes are atomic: local files go to a temporary sibling directory that is renamed into place on
success and removed on failure; on an object store a `.pth` is uploaded whole (an object appears
only when complete) and orbax writes a converted directory straight to the bucket, marking it
complete last (its `commit_success.txt`); a failed write is removed. torch and orbax are imported
lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sam_jax import paths
from sam_jax.checkpoint_mapping import (
    check_params,
    check_state_dict,
    expected_leaves,
    infer_config,
    params_to_state_dict,
    state_dict_to_params,
)
from sam_jax.config import SamConfig, get_config

__all__ = [
    "atomic_output",
    "check_sha256",
    "config_for_state_dict",
    "infer_config",
    "load",
    "load_converted",
    "load_pth",
    "params_to_state_dict",
    "read_converted_config",
    "read_state_dict",
    "save_converted",
    "save_pth",
    "state_dict_to_params",
]

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
# What orbax writes last into a checkpoint directory on an object store (none locally, where
# the finished directory is renamed into place instead).
COMMIT_FILE = "commit_success.txt"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ----------------------------------------------------------------------------------------------
# PyTorch side.


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
    """Reads an official `.pth` state_dict as {torch key: float32 numpy array}."""
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
        raise ValueError(f"{path} is not a PyTorch checkpoint: {_one_line(e)[:300]}") from None
    sd = _unwrap(obj, path)
    out = {}
    for k, v in sd.items():
        if not torch.is_floating_point(v):
            raise ValueError(f"{k} has dtype {v.dtype}, expected a floating point tensor")
        out[k] = v.detach().to(torch.float32).contiguous().numpy()
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
        if paths.exists(path) and not overwrite:
            raise FileExistsError(f"output {path} exists already (use --force to replace it)")
        buf = io.BytesIO()
        torch.save(tensors, buf)
        paths.write_bytes(path, buf.getbuffer())
        return
    with atomic_output(path, overwrite) as tmp:
        torch.save(tensors, tmp)


# ----------------------------------------------------------------------------------------------
# Converted (orbax) side.


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` when the block succeeds.

    On failure, the temporary path and any parent directories created here are removed. Local
    paths only (object stores have no rename: see save_pth and save_converted).
    """
    if paths.is_remote(path):
        raise ValueError(f"atomic_output needs a local path, got {path}")
    path = Path(path).absolute()
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"output {path} exists already (use --force to replace it)")
    created = []
    for parent in reversed(path.parents):
        if not parent.exists():
            created.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        _remove_created(created)
        raise OSError(f"cannot write to {path}: {_one_line(e)}") from None
    try:
        tmp = tmp_dir / path.name
        yield tmp
        if path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        _remove(tmp_dir)
        _remove_created(created)
        raise
    _remove(tmp_dir)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _checkpointer():
    """An orbax Checkpointer of converted checkpoints, run by the calling process alone.

    A converted checkpoint holds host (numpy) arrays: in a multi-process job one process reads or
    writes it without the others (no cross-process barriers)."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(multiprocessing_options=alone),
        **{
            PARAMS_ITEM: ocp.StandardCheckpointHandler(multiprocessing_options=alone),
            CONFIG_ITEM: ocp.JsonCheckpointHandler(multiprocessing_options=alone),
        },
    )
    return ocp, ocp.Checkpointer(handler, multiprocessing_options=alone)


def save_converted(
    path: str | os.PathLike,
    config: SamConfig,
    params: Mapping[str, Any],
    overwrite: bool = False,
) -> None:
    """Writes `params` (checked against `config`) and the config as an orbax directory."""
    check_params(params, config)
    params = _to_numpy_tree(params)
    ocp, ckptr = _checkpointer()
    args = ocp.args.Composite(
        **{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
        }
    )
    if not paths.is_remote(path):
        with atomic_output(path, overwrite) as tmp:
            ckptr.save(tmp, args=args)
        return
    # An object store: orbax writes straight to the bucket (no rename there) and marks the
    # directory complete last; what a failed save wrote is removed.
    path = paths.resolve(path)
    if paths.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} exists already (use --force to replace it)")
    try:
        ckptr.save(paths.epath(path), args=args, force=True)
    except BaseException:
        with contextlib.suppress(Exception):
            paths.rmtree(path)
        raise


def _to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        str(k): _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v)
        for k, v in tree.items()
    }


def read_converted_config(path: str | os.PathLike) -> SamConfig:
    """The `SamConfig` stored in a converted checkpoint directory."""
    path = paths.resolve(path)
    config_file = paths.join(path, CONFIG_ITEM, "metadata")
    params_dir = paths.join(path, PARAMS_ITEM)
    if not paths.isdir(path) or not paths.isfile(config_file) or not paths.isdir(params_dir):
        raise ValueError(
            f"{path} is not a converted sam_jax checkpoint (expected a directory with "
            f"{CONFIG_ITEM}/metadata and {PARAMS_ITEM}/)"
        )
    if paths.is_remote(path) and not paths.isfile(paths.join(path, COMMIT_FILE)):
        raise ValueError(f"{path} is an incomplete converted checkpoint (no {COMMIT_FILE})")
    try:
        return SamConfig.from_dict(json.loads(paths.read_text(config_file)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad config in {config_file}: {_one_line(e)}") from None


def load_converted(path: str | os.PathLike) -> tuple[SamConfig, dict[str, Any]]:
    """Converted orbax directory -> (config, params as nested dicts of float32 numpy arrays)."""
    path = paths.resolve(path)
    config = read_converted_config(path)
    ocp, ckptr = _checkpointer()
    try:
        meta = ckptr.metadata(paths.epath(path)).item_metadata[PARAMS_ITEM].tree
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read the params of {path}: {_one_line(e)[:300]}") from None
    check_params(meta, config, f"the config stored in {path}")
    target = traverse_util.unflatten_dict(
        {
            leaf.flax_path: jax.ShapeDtypeStruct(leaf.flax_shape, np.float32)
            for leaf in expected_leaves(config).values()
        }
    )
    restored = ckptr.restore(
        paths.epath(path),
        args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}),
    )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored[PARAMS_ITEM])
    return config, params


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    attention_impl: str = "xla",
    decoder_num_heads: int | None = None,
):
    """Loads a converted directory or an official `.pth` -> (model, params).

    `dtype` is the compute dtype of the model; params are float32 jax arrays. For a `.pth`, the
    architecture is inferred from the tensor shapes (decoder heads: `decoder_num_heads`, default 8).
    """
    from sam_jax.modeling import build_sam

    if paths.isdir(path):
        config, params = load_converted(path)
    elif paths.isfile(path):
        config, params = load_pth(path, decoder_num_heads=decoder_num_heads)
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    model = build_sam(config, dtype=dtype, attention_impl=attention_impl)
    return model, jax.device_put(params)
