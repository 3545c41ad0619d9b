"""Converted checkpoints: an orbax directory with two items, `params` (the params pytree, orbax
`StandardSave`) and `config` (the `SamConfig` as a JSON object, orbax `JsonSave`; the file
`<dir>/config/metadata` is plain JSON).

Paths may be local or URLs (gs://bucket/...): every access goes through `sam_jax.paths`. Writes
are atomic: locally through `paths.atomic_output` (a temporary sibling renamed into place); on an
object store orbax writes straight to the bucket and marks the directory complete last (its
`commit_success.txt`); a failed write is removed. orbax is imported lazily.

Each checkpoint carries a `manifest.json` (sam_jax.checkpoints.manifest), written last: the size
and CRC-32C of every file and the CRC-32C of every params array. `load_converted` checks the
files before orbax reads them and the arrays after; every refusal is a `CheckpointError` (a
ValueError) of one line naming the checkpoint and the file or array. A checkpoint without a
manifest (written before manifests existed) loads with a warning that it cannot be verified.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from sam_jax import paths
from sam_jax.checkpoints import manifest
from sam_jax.checkpoints.mapping import check_params, expected_leaves
from sam_jax.config import SamConfig
from sam_jax.errors import CheckpointError, one_line
from sam_jax.params import flat_params

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
# What orbax writes last into a checkpoint directory on an object store (none locally, where
# the finished directory is renamed into place instead).
COMMIT_FILE = "commit_success.txt"


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
    """Writes `params` (checked against `config`) and the config as an orbax directory, and its
    manifest last (the checksum of every file and of every array)."""
    check_params(params, config)
    params = _to_numpy_tree(params)
    arrays = manifest.array_entries(flat_params(params))
    ocp, ckptr = _checkpointer()
    args = ocp.args.Composite(
        **{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            CONFIG_ITEM: ocp.args.JsonSave(config.to_dict()),
        }
    )
    if not paths.is_remote(path):
        with paths.atomic_output(path, overwrite) as tmp, paths.deferred_interrupts():
            # orbax writes from its own threads: an interrupt waits until they are done (it
            # would otherwise leave them writing into a folder being removed)
            ckptr.save(tmp, args=args)
            tmp = str(tmp)
            manifest.write(tmp, "converted", manifest.file_entries(tmp), arrays)
        return
    # An object store: orbax writes straight to the bucket (no rename there) and marks the
    # directory complete last, then the manifest is written; what a failed save wrote is removed.
    path = paths.resolve(path)
    if paths.exists(path) and not overwrite:
        raise FileExistsError(f"output {path} exists already (use --force to replace it)")
    try:
        manifest.remove(path)  # an old one would not describe the new files
        with paths.deferred_interrupts():
            ckptr.save(paths.epath(path), args=args, force=True)
        manifest.write(path, "converted", manifest.file_entries(path), arrays)
    except BaseException:
        with contextlib.suppress(Exception), paths.deferred_interrupts():
            paths.rmtree(path)
        raise


def _to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        str(k): _to_numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v)
        for k, v in tree.items()
    }


def _check_layout(path: str) -> None:
    config_file = paths.join(path, CONFIG_ITEM, "metadata")
    params_dir = paths.join(path, PARAMS_ITEM)
    if not paths.isdir(path) or not paths.isfile(config_file) or not paths.isdir(params_dir):
        raise CheckpointError(
            f"{path} is not a converted sam_jax checkpoint (expected a directory with "
            f"{CONFIG_ITEM}/metadata and {PARAMS_ITEM}/)"
        )
    if paths.is_remote(path) and not paths.isfile(paths.join(path, COMMIT_FILE)):
        raise CheckpointError(f"{path} is an incomplete converted checkpoint (no {COMMIT_FILE})")


def read_converted_config(path: str | os.PathLike) -> SamConfig:
    """The `SamConfig` stored in a converted checkpoint directory."""
    path = paths.resolve(path)
    _check_layout(path)
    config_file = paths.join(path, CONFIG_ITEM, "metadata")
    try:
        return SamConfig.from_dict(json.loads(paths.read_text(config_file)))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad config in {config_file}: {one_line(e)}") from None


def load_converted(
    path: str | os.PathLike, verify: bool = True
) -> tuple[SamConfig, dict[str, Any]]:
    """Converted orbax directory -> (config, params as nested dicts of float32 numpy arrays).

    verify: check the files against the manifest before reading them and the restored arrays
    after (a checkpoint without a manifest loads with a warning). Raises CheckpointError (one
    line naming the file or array) for a damaged or incomplete checkpoint. (Non-finite params
    are refused by `sam_jax.checkpoints.read_checkpoint`, the door every format goes through.)
    """
    path = paths.resolve(path)
    _check_layout(path)
    doc = None
    if verify:
        doc = manifest.read(path)
        if doc is None:
            manifest.warn_unverified(f"converted checkpoint {path}")
        else:
            problems = manifest.verify_files(path, doc)
            if problems:
                raise _damaged(path, problems, doc)
    config = read_converted_config(path)
    params = _restore(path, config)
    flat = flat_params(params)
    if doc is not None and "arrays" in doc:
        differ = manifest.differing_arrays(doc["arrays"], flat)
        if differ:
            raise CheckpointError(
                f"{path} is damaged: the restored array{'s' if len(differ) > 1 else ''} "
                f"{manifest.listed(differ)} differ{'' if len(differ) > 1 else 's'} from what was "
                f"saved (checksums in {manifest.MANIFEST_NAME}); convert or export it again"
            )
    return config, params


def _damaged(path: str, problems: list[str], doc: Mapping[str, Any]) -> CheckpointError:
    """The error for files that do not match the manifest, naming the arrays that differ when
    orbax can still read the params."""
    arrays = ""
    if "arrays" in doc:
        try:
            params = _restore(path, read_converted_config(path))
        except (ValueError, OSError):  # orbax cannot read them either: the files are named
            pass
        else:
            differ = manifest.differing_arrays(doc["arrays"], flat_params(params))
            if differ:
                arrays = f"; the arrays that differ: {manifest.listed(differ)}"
    return CheckpointError(
        f"{path} is damaged: {manifest.first_error(problems)}{arrays}; convert or export it again"
    )


def _restore(path: str, config: SamConfig) -> dict[str, Any]:
    """The params of a converted checkpoint as float32 numpy arrays (orbax quietened: a failed
    read is one CheckpointError)."""
    ocp, ckptr = _checkpointer()
    with manifest.quiet_orbax():
        try:
            meta = ckptr.metadata(paths.epath(path)).item_metadata[PARAMS_ITEM].tree
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            raise CheckpointError(f"cannot read the params of {path}: {one_line(e, 300)}") from None
        check_params(meta, config, f"the config stored in {path}")
        target = traverse_util.unflatten_dict(
            {
                leaf.flax_path: jax.ShapeDtypeStruct(leaf.flax_shape, np.float32)
                for leaf in expected_leaves(config).values()
            }
        )
        try:
            restored = ckptr.restore(
                paths.epath(path),
                args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}),
            )
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise CheckpointError(
                f"cannot read the params of {path} (damaged or incomplete?): {one_line(e, 300)}"
            ) from None
    return jax.tree.map(lambda x: np.asarray(x, np.float32), restored[PARAMS_ITEM])


def is_converted_dir(path: str) -> bool:
    """Whether `path` holds the items of a converted checkpoint."""
    return paths.isfile(paths.join(path, CONFIG_ITEM, "metadata"))
