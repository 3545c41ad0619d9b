"""Train checkpoints with an orbax CheckpointManager (async saves, keep the last N).

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` is the TrainState (params, opt_state,
step, rng; restored straight into its shardings); `meta` is JSON: the data-iterator position
(batches consumed) and the SamConfig (the experiment config is WORKDIR/config.json).

The directory may be local or a URL (gs://bucket/...): orbax writes straight to it (arrays via
tensorstore, the rest via etils.epath/gcsfs, see sam_jax.paths). On an object store a step
counts as saved once orbax has written its `commit_success.txt` (there is no atomic rename);
`latest_step` ignores steps without it.

Each step gets a manifest (`<step>/manifest.json`, sam_jax.checkpoints.manifest: the size and
CRC-32C of every file of every process), written by process 0 once orbax has finished the step:
at the next save, at `wait` or at `close` (a save is asynchronous). Restoring a step checks its
files first (the processes share the work) and refuses a damaged step with one CheckpointError
line naming the file; a step without a manifest (written before manifests, or by a run killed
before it wrote one) is restored with a warning that it cannot be verified.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from sam_jax import distributed, paths
from sam_jax.checkpoints import manifest
from sam_jax.errors import CheckpointError, one_line

logger = logging.getLogger("sam_jax.checkpoints")


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
        self._unlisted: list[int] = []  # steps saved here whose manifest is not written yet
        self._verified: set[int] = set()  # steps whose files were checked here

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; returns whether it saved.

        Writes the manifests of the steps saved before (orbax waits for them to finish anyway)."""
        step = int(step)
        self._write_manifests()
        if jax.process_index() == 0 and step not in self.manager.all_steps():
            manifest.remove(self.step_dir(step))  # of an unfinished step saved again
        self._verified.discard(step)
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )
        if saved:
            self._unlisted.append(step)
        return saved

    def step_dir(self, step: int) -> str:
        """The directory of a step (orbax's default naming: the step number)."""
        return paths.join(self.directory, str(int(step)))

    def _write_manifests(self) -> None:
        """Once orbax has finished the steps saved here: their manifests, by process 0 (which
        sees every process's files). A manifest that cannot be written leaves its step
        unverifiable, not lost: a warning."""
        if not self._unlisted:
            return
        self.manager.wait_until_finished()
        steps, self._unlisted = self._unlisted, []
        if jax.process_index() != 0:
            return
        existing = set(self.manager.all_steps())
        for step in steps:
            if step not in existing:  # removed already (max_to_keep)
                continue
            step_dir = self.step_dir(step)
            try:
                manifest.write(step_dir, "training", manifest.file_entries(step_dir))
            except Exception as e:  # noqa: BLE001 - a full disk or a lost bucket: say it, go on
                logger.warning(
                    "could not write the manifest of step %d in %s: %s",
                    step,
                    self.directory,
                    one_line(e, 300),
                )

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The metadata saved at `step` (default: latest), read without touching the state."""
        step = self._step(step)
        out = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore_state(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores the state at `step` (default: latest) into abstract_state's shardings.

        abstract_state: a pytree of jax.ShapeDtypeStruct with .sharding set (jax.eval_shape of the
        init function, with shardings attached).
        """
        step = self._step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._restore(step, args)["state"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, meta) at `step` (default: latest); see restore_state."""
        return self.restore_state(abstract_state, step), self.restore_meta(step)

    def _restore(self, step: int, args: Any) -> Any:
        """manager.restore after the step's files are verified; orbax's failures (and noise)
        become one CheckpointError line."""
        self.verify(step)
        with manifest.quiet_orbax():
            try:
                return self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
                raise CheckpointError(
                    f"cannot restore step {step} of {self.directory}: {one_line(e, 300)}"
                ) from None

    def verify(self, step: int) -> None:
        """Checks the files of `step` against its manifest (every process checks a share and
        all learn the result); CheckpointError naming the first bad file. A step without a
        manifest passes with a warning."""
        step = int(step)
        if step in self._verified:
            return
        step_dir = self.step_dir(step)
        index, count = jax.process_index(), jax.process_count()
        try:
            doc = manifest.read(step_dir)
            problems = [] if doc is None else manifest.verify_files(step_dir, doc, (index, count))
        except Exception as e:  # noqa: BLE001 - an unreadable manifest or folder: every
            doc, problems = {}, [one_line(e, 300)]  # process must still reach all_gather
        found = [(doc is not None, problems)]
        if count > 1:  # every process raises the same error, or none does
            found = distributed.all_gather(found[0])
        problems = [p for _, ps in found for p in ps]
        if problems:
            raise CheckpointError(
                f"step {step} of {self.directory} is damaged: {manifest.first_error(problems)}"
                f"{self._delete_hint(step)}"
            )
        if not all(has for has, _ in found) and index == 0:
            manifest.warn_unverified(f"checkpoint step {step} in {self.directory}")
        self._verified.add(step)

    def _delete_hint(self, step: int) -> str:
        older = [s for s in self.manager.all_steps() if s < step]
        if not older:
            return ""
        return f"; delete {self.step_dir(step)} to resume from step {max(older)}"

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def wait(self) -> None:
        """Blocks until pending async saves are committed, and writes their manifests."""
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract) carrying the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
