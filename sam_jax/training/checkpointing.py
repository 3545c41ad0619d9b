"""Train checkpoints with an orbax CheckpointManager (async saves, keep the last N).

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the TrainState (params, opt_state,
step, rng; restored straight into its shardings); `meta` is JSON: the data-iterator position
(batches consumed) and the SamConfig (the experiment config is WORKDIR/config.json).

The directory may be local or a URL (gs://bucket/...): orbax writes straight to it (arrays via
tensorstore, the rest via etils.epath/gcsfs, see sam_jax.paths). On an object store a step
counts as saved once orbax has written its `commit_success.txt` (there is no atomic rename);
`latest_step` ignores steps without it.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from sam_jax import paths


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager for the train state and its metadata."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = paths.resolve(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            paths.epath(self.directory), options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; returns whether it saved."""
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved at `step` (default: latest), read without touching the state."""
        step = self._step(step)
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore_state(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores the state at `step` (default: latest) into abstract_state's shardings.

        abstract_state: a pytree of jax.ShapeDtypeStruct with .sharding set (jax.eval_shape of the
        init function, with shardings attached).
        """
        step = self._step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) at `step` (default: latest); see restore_state."""
        return self.restore_state(abstract_state, step), self.restore_meta(step)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract) carrying the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
