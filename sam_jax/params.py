"""The params pytree: nested dicts of arrays keyed by module and parameter names, as Flax makes
them (`{"image_encoder": {"blocks_0": {"attn": {"qkv": {"kernel": ...}}}}, ...}`).

A parameter's path is its keys joined by "/" (`image_encoder/blocks_0/attn/qkv/kernel`): the name
checkpoint manifests, sharding rules, the optimizer's masks and exported weights use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util
from jax.experimental import multihost_utils


def param_path(keys: tuple[Any, ...]) -> str:
    """'a/b/c' of a path: a tuple of dict keys (`traverse_util.flatten_dict`) or a jax key path
    (`jax.tree_util.tree_flatten_with_path`: DictKey, GetAttrKey, SequenceKey)."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/kernel": leaf} of a params pytree (nested dicts or FrozenDicts)."""
    return {param_path(k): v for k, v in traverse_util.flatten_dict(params).items()}


def host_params(params: Any) -> Any:
    """Full (unsharded) params as numpy, on every process of a multi-process job."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)
