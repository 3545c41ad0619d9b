"""Device mesh and sharding rules (data parallel + FSDP), the same code on 1 to N devices.

Mesh axes: ("data", "fsdp"). The batch is split over both axes (every device gets its own
images); parameters and optimizer state are split over "fsdp" (ZeRO-3 style, XLA inserts the
all-gathers) and replicated over "data". Rules, in order, per array leaf:
  1. the first regex in `rules` (a sequence of (regex, PartitionSpec-like tuple)) matching the
     leaf's path decides;
  2. otherwise an array with at least `min_fsdp_size` elements is split over "fsdp" on its largest
     dimension divisible by the fsdp size;
  3. otherwise it is replicated.
Optimizer-state leaves mirror parameter paths (e.g. `.../mu/image_encoder/blocks_0/...`), so
the same rules shard them like their parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sam_jax.params import param_path

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(
    mesh_shape: Sequence[int], devices: Sequence[Any] | None = None, num_slices: int = 1
) -> Mesh:
    """Mesh of shape (data, fsdp). A -1 entry takes all remaining devices (like big_vision).

    num_slices > 1 (a multi-slice job, slices joined by the data-center network): the data axis
    spans the slices (only the gradient all-reduce crosses them); fsdp stays inside a slice.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = [int(s) for s in mesh_shape]
    if len(shape) != 2:
        raise ValueError(f"mesh_shape must have 2 entries (data, fsdp), got {mesh_shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh_shape entry may be -1, got {mesh_shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {mesh_shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {np.prod(shape)} devices, have {len(devices)}")
    # Auto axes: XLA propagates shardings (GSPMD); the model code needs no sharding annotations.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if num_slices > 1:
        if shape[0] % num_slices:
            raise ValueError(f"the data axis {shape[0]} must split over {num_slices} slices")
        grid = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // num_slices, shape[1]), (num_slices, 1), devices
        )
        return Mesh(grid, MESH_AXES, axis_types=auto)
    try:
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # An axis that is no product of the slice's physical axes (fsdp 8 on a 16 x 16 v6e):
        # jax.make_mesh refuses to split a physical axis; splitting it is what such a mesh needs.
        grid = mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=auto)


def spec_for(
    path: str,
    shape: tuple[int, ...],
    fsdp_size: int,
    rules: Sequence[tuple[str, tuple]] = (),
    min_fsdp_size: int = 2**14,
) -> P:
    """PartitionSpec of one array leaf (see module doc)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return P(*spec)
    size = int(np.prod(shape)) if shape else 1
    if fsdp_size > 1 and size >= min_fsdp_size:
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[d] % fsdp_size == 0:
                spec = [None] * len(shape)
                spec[d] = "fsdp"
                return P(*spec)
    return P()


def tree_shardings(
    mesh: Mesh, tree: Any, rules: Sequence[tuple[str, tuple]] = (), min_fsdp_size: int = 2**14
) -> Any:
    """NamedSharding for every leaf of an (abstract) pytree of arrays."""
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, spec_for(param_path(path), shape, fsdp, rules, min_fsdp_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over all mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(
    mesh: Mesh, batch: dict[str, np.ndarray], global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """This process's rows of a batch (numpy) -> global jax arrays sharded over the batch axes.

    With several processes each passes only the rows its devices hold (in increasing order;
    `global_batch_size` rows in all); with one, the whole batch.
    """
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        shape = None if global_batch_size is None else (global_batch_size, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
    return out
