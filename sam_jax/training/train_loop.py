"""The training main loop: mesh -> sharded state (fresh or restored) -> steps -> logs/ckpts.

`train_and_evaluate(config, workdir)` is what train.py calls. Rerunning it on the same workdir
resumes from the latest checkpoint (train state, step, RNG and data position). SIGTERM saves a
checkpoint at the next step boundary and returns normally (train.py then exits 0). A non-finite
loss or update stops the run with NonFiniteLossError and saves nothing.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_jax import distributed, paths
from sam_jax.checkpoints import save_converted
from sam_jax.checkpoints import training as checkpointing
from sam_jax.config import SamConfig
from sam_jax.data import make_train_iterator
from sam_jax.errors import NonFiniteLossError, WorkdirMismatchError
from sam_jax.modeling import build_sam, lora
from sam_jax.params import host_params
from sam_jax.training import (
    config_checks,
    embedding_cache,
    hlo_traffic,
    initialization,
    metric_writer,
    sharding,
    text_prompts,
)
from sam_jax.training.optimizer import (
    lr_schedule_from_config,
    make_optimizer,
    trainable_labels,
)
from sam_jax.training.train_state import create_train_state
from sam_jax.training.train_step import make_train_step
from sam_jax.training.validation import Validator, load_examples
from sam_jax.training.visualize import save_prediction_figure


class PreemptionFlag:
    """Set by SIGTERM (how TPU pods and most schedulers preempt); checked at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:  # several processes: jax's preemption sync point instead
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def default_iterator(
    config: Any, sam_config: Any, start_batch: int, rows: tuple[int, ...], index_dir: str
) -> Iterator[dict]:
    """This process's rows of the global training batches, starting at batch `start_batch`."""

    lsj = config.data.large_scale_jitter
    return make_train_iterator(
        config.data.train,
        split=config.data.train_split,
        batch_size=config.batch_size,
        rows=rows,
        image_size=sam_config.image_size,
        mask_size=sam_config.low_res_size,
        max_masks=config.data.max_masks,
        seed=config.seed,
        start_batch=start_batch,
        large_scale_jitter=tuple(lsj) if lsj else None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_mask_area_fraction=config.train.max_mask_area_fraction,
        index_dir=index_dir,
        barrier=lambda: distributed.barrier("data_index"),
    )


def remat_policy(config: Any) -> str | None:
    """The encoder remat policy of an experiment config (None: no remat)."""
    return None if config.remat_policy in (None, "", "none") else config.remat_policy


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(np.mean([h[k] for h in history])) for k in history[0]}


def _check_config(config: Any, num_devices: int) -> None:
    """What the config must satisfy on these devices (the field checks are config_checks')."""
    if config.batch_size % num_devices:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by {num_devices} devices"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} not divisible by the process count")


# Experiment fields besides the architecture (compared as SamConfigs) that decide the train
# state's structure: a checkpoint written with other values cannot be restored (the mesh and batch
# size may change: orbax reshards on restore).
STATE_FIELDS = ("trainable", "lora.rank", "lora.targets")


def _field(tree: Any, name: str) -> Any:
    """A dotted field of a config or of its JSON (KeyError when absent)."""
    for part in name.split("."):
        tree = tree[part]
    return list(tree) if isinstance(tree, tuple) else tree


def _check_resumable(config: Any, saved_json: str | None, saved_sam: Any, sam_config: Any, where):
    """Raises WorkdirMismatchError when the workdir's checkpoint belongs to another experiment."""
    saved = json.loads(saved_json) if saved_json is not None else {}
    diffs = []
    for name in STATE_FIELDS:
        try:
            old = _field(saved, name)
        except (KeyError, TypeError):
            continue
        if old != _field(config, name):
            diffs.append(f"{name}: {old!r} -> {_field(config, name)!r}")
    a, b = saved_sam.to_dict(), sam_config.to_dict()
    diffs += [f"model.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b.get(k)]
    if diffs:
        raise WorkdirMismatchError(
            f"workdir {where} holds a checkpoint of another experiment ({'; '.join(diffs)}): "
            "use a new --workdir, or the config it was made with"
        )


def _batch_rows(mesh: Any, batch_size: int) -> tuple[int, ...]:
    """The global batch rows held by this process's devices (what it must read)."""
    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    rows = sorted({r for (sl,) in index_map.values() for r in range(*sl.indices(batch_size))})
    return tuple(rows)


class TrainProgram(NamedTuple):
    """What a config trains, built without allocating anything (`train_program`)."""

    model: Any  # the Sam module (compute dtype, attention, encoder remat of the config)
    tx: Any  # the optax optimizer over {"params", "adapters"}
    param_shapes: Any  # params as ShapeDtypeStructs
    lora_layers: dict  # adapted layers {path: (in, out)} ({} without LoRA)
    init_state: Callable[[Any], Any]  # params or None (random init) -> TrainState
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    state_shardings: Any  # TrainState of NamedShardings on the mesh
    step: Any  # jax.jit(train_step): (state, batch) -> (state, metrics), state donated


def train_program(config: Any, sam_config: Any, mesh: Any) -> TrainProgram:
    """The model, optimizer, abstract sharded train state and jitted train step of `config` on
    `mesh` (the real run's and the compile plan's, sam_jax.training.compile_plan)."""
    model = build_sam(sam_config, config.dtype, config.attention_impl, remat_policy(config))
    param_shapes = model.param_shapes()
    lc = config.lora
    lora_layers = lora.target_layers(param_shapes, lc.targets, lc.rank) if lc.rank > 0 else {}
    adapter_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    adapter_shapes = jax.eval_shape(
        lambda k: lora.init_adapters(k, lora_layers, lc.rank), adapter_key
    )
    tx = make_optimizer(config, param_shapes, sam_config.encoder_depth, adapter_shapes)

    def init_state(params):
        if params is None:
            params = model.init_params(jax.random.key(config.seed))
        adapters = lora.init_adapters(adapter_key, lora_layers, lc.rank)
        return create_train_state(params, tx, config.seed, adapters)

    abstract_state = jax.eval_shape(init_state, None)
    rules = [tuple(r) for r in config.sharding_rules]
    state_shardings = sharding.tree_shardings(mesh, abstract_state, rules, config.min_fsdp_size)
    train_step = make_train_step(model, tx, config, param_shapes, mesh)
    step = jax.jit(
        train_step,
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )
    return TrainProgram(
        model, tx, param_shapes, lora_layers, init_state, abstract_state, state_shardings, step
    )


def train_and_evaluate(
    config: Any,
    workdir: str,
    make_iterator: Callable[..., Iterator[dict]] = default_iterator,
) -> dict[str, Any]:
    """Trains (or resumes) `config` in `workdir` (a local folder or a bucket URL); returns the last
    logged metrics: {"step", "preempted", **last metrics, **validation}.

    make_iterator(config, sam_config, start_batch, rows, index_dir) -> iterator of this process's
    rows of the global numpy batches (tests pass a fake one). The order of start-up follows
    big_vision: resume from the workdir's latest checkpoint, else the init checkpoint, else
    random init. With several processes, call sam_jax.distributed.initialize() first (train.py
    does); every process runs this function with the same config.
    """
    config_checks.check_config(config)  # types and ranges, before any work (ConfigError)
    distributed.initialize()
    distributed.check_same_on_all_processes(config.to_json(sort_keys=True), "experiment config")
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    workdir = paths.resolve(workdir)
    mesh = sharding.make_mesh(config.mesh_shape)
    _check_config(config, mesh.devices.size)
    # A bucket without credentials fails here, in one line (a probe object, nothing left); a
    # local workdir is created only after the inputs were checked.
    remote = paths.is_remote(workdir)
    if remote:
        paths.check_writable(workdir)
    may_resume = paths.isdir(paths.join(workdir, "checkpoints"))
    config_checks.check_inputs(config, workdir, resuming=may_resume)  # data and init files exist
    # LoRA's layers exist and are large enough (ConfigError), before anything is written; on a
    # resume they are checked against the saved architecture below.
    if config.lora.rank > 0 and not (may_resume and config.init.type == "sam"):
        shapes = build_sam(initialization.sam_config_from(config)).param_shapes()
        lora.target_layers(shapes, config.lora.targets, config.lora.rank)
    if not remote:
        paths.check_writable(workdir)
    is_main = distributed.is_main_process()
    say = print if is_main else (lambda *a, **k: None)

    ckpt = checkpointing.Checkpointer(
        paths.join(workdir, "checkpoints"),
        config.checkpoint.max_to_keep,
        config.checkpoint.async_save,
    )
    config_path = paths.join(workdir, "config.json")
    resume_step = ckpt.latest_step()
    if resume_step is not None:  # 1. resume: the architecture comes from the checkpoint
        meta = ckpt.restore_meta(resume_step)
        saved_sam = SamConfig.from_dict(meta["sam_config"])
        if config.init.type == "sam":  # not read again: its architecture is the saved one
            expected = saved_sam.replace(**dict(config.model_overrides))
        else:
            expected = initialization.sam_config_from(config)
        # drop path does not change the state: it may change on resume
        saved_sam = saved_sam.replace(drop_path_rate=expected.drop_path_rate)
        saved_json = paths.read_text(config_path) if paths.exists(config_path) else None
        _check_resumable(config, saved_json, saved_sam, expected, workdir)
        sam_config = saved_sam
    else:  # 2. the init checkpoint (SAM or MAE), else 3. random
        sam_config = initialization.sam_config_from(config)
    program = train_program(config, sam_config, mesh)
    model, tx, param_shapes = program.model, program.tx, program.param_shapes
    state_shardings = program.state_shardings
    say(trainable_summary(config, param_shapes, program.lora_layers))
    if resume_step is not None:
        target = checkpointing.abstract_with_shardings(program.abstract_state, state_shardings)
        state = ckpt.restore_state(target, resume_step)
        start_batch = int(meta["batches_consumed"])
        say(f"resumed from {ckpt.directory} at step {int(state.step)}")
    else:
        init_params = initialization.initial_params(config, sam_config, model)
        state = jax.jit(program.init_state, out_shardings=state_shardings)(init_params)
        start_batch = 0
        del init_params
    step = int(state.step)
    preempt = PreemptionFlag()
    if is_main:
        paths.write_text(config_path, config.to_json(indent=2))

    jitted = program.step
    validator = _make_validator(config, sam_config)
    writer = metric_writer.MetricWriter(workdir, resume_step=step)
    rows = _batch_rows(mesh, config.batch_size)
    cache = embedding_cache.prepare(
        config, sam_config, model, state.params, workdir, len(rows), say
    )
    batches = make_iterator(config, sam_config, start_batch, rows, paths.join(workdir, "index"))
    batches = text_prompts.wrap(config, sam_config, batches, start_batch, say)
    if cache is not None:  # the train step skips the frozen encoder
        batches = embedding_cache.CachedBatches(batches, cache)
    peak = metric_writer.peak_flops_per_device(config.peak_tflops_per_device)
    schedule = lr_schedule_from_config(config)
    num_devices = mesh.devices.size

    compiled, flops, history, last = None, None, [], {}
    pbar = _progress_bar(config, step) if is_main else None
    t_log, steps_since_log = time.perf_counter(), 0
    try:
        while step < config.total_steps:
            batch = sharding.shard_batch(mesh, next(batches), config.batch_size)
            if compiled is None:
                t0 = time.perf_counter()
                lowered = jitted.lower(state, batch)
                compiled = lowered.compile()
                flops = model_flops(config, sam_config, tx, state, batch, lowered, mesh)
                say(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
                distributed.barrier("first_step")  # every process compiled: start together
                t_log = time.perf_counter()
            state, m = compiled(state, batch)
            m = jax.device_get(m)
            step += 1
            steps_since_log += 1
            finite = bool(m.pop("finite")) and math.isfinite(m["loss"])
            if not finite:
                writer.write(step, {"loss": m["loss"], "grad_norm": m["grad_norm"]})
                raise NonFiniteLossError(
                    f"loss became {m['loss']} (grad norm {m['grad_norm']}) at step {step}: the "
                    "loss, its gradient or the update is NaN or infinite; stopped without "
                    f"saving (last good checkpoint: step {ckpt.latest_step()})"
                )
            history.append({k: float(v) for k, v in m.items()})
            record = {}
            if step % config.log_every_steps == 0 or step == config.total_steps:
                dt = time.perf_counter() - t_log
                record = _mean_metrics(history)
                record["lr"] = float(schedule(step - 1))
                record["images_per_s"] = config.batch_size * steps_since_log / dt
                record["step_time_s"] = dt / steps_since_log
                if flops is not None and peak is not None:
                    record["mfu"] = flops * steps_since_log / dt / (peak * num_devices)
                if pbar is not None:
                    pbar.set_postfix(_postfix(record), refresh=False)
                history, steps_since_log = [], 0
                t_log = time.perf_counter()
            if pbar is not None:
                pbar.update(1)
            every = config.eval.every_steps
            if validator and (step == config.total_steps or (every and step % every == 0)):
                t_val = time.perf_counter()
                val = validator(exported_params(config, state))
                t_log += time.perf_counter() - t_val  # not counted in images/s
                record.update(val)
                say(f"step {step}: " + json.dumps({k: round(v, 4) for k, v in val.items()}))
            if record:
                writer.write(step, record)
                last.update(record)
            stop = preempt.should_stop(step)
            if stop or step % config.checkpoint.every_steps == 0 or step == config.total_steps:
                meta = {"batches_consumed": step, "sam_config": sam_config.to_dict()}
                ckpt.save(step, state, meta, force=True)
            if stop:
                ckpt.wait()
                say(f"preempted: saved a checkpoint at step {step} and stopping")
                return {"step": step, "preempted": True, **last}
        ckpt.wait()
        _finish(workdir, sam_config, exported_params(config, state), validator)
        return {"step": step, "preempted": False, **last}
    finally:
        if hasattr(batches, "close"):
            batches.close()
        preempt.restore()
        if pbar is not None:
            pbar.close()
        writer.close()
        ckpt.close()


def trainable_summary(config: Any, param_shapes: Any, lora_layers: dict) -> str:
    """The start-up line with the trained-parameter count: base params that `trainable` names
    plus r * (in + out) per adapted layer."""
    labels = jax.tree.leaves(trainable_labels(param_shapes, config.trainable))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes)]
    base = sum(n for n, lab in zip(sizes, labels, strict=True) if lab == "train")
    adapters = lora.num_adapter_params(lora_layers, config.lora.rank)
    total = sum(sizes)
    line = f"trainable parameters: {base + adapters:,} of {total + adapters:,}"
    if lora_layers:
        line += (
            f" ({adapters:,} in rank-{config.lora.rank} LoRA adapters on {len(lora_layers)} "
            f"layers, {base:,} base params: trainable={config.trainable!r})"
        )
    return line


def exported_params(config: Any, state: Any) -> Any:
    """The params of an ordinary SAM: the base with the LoRA adapters merged in."""
    if not state.adapters:
        return state.params
    return lora.merge(state.params, state.adapters, lora.scale_of(config.lora))


def model_flops(config, sam_config, tx, state, batch, lowered=None, mesh=None) -> float | None:
    """Model FLOPs of one train step of `config`: the step lowered (not compiled) without remat
    (no recompute) and with the rounds unrolled, its matmuls counted with every loop trip
    (`hlo_traffic`: XLA's own count takes a loop body once; the encoder's attention runs in
    loops off a CPU). The count is of the global program: lowered unsharded for the platform of
    `mesh` (the step's device mesh), nothing is partitioned.

    `lowered`: the train step as lowered for training on `mesh`; counted as is when it already
    has neither remat nor a rounds loop (and runs on one device), instead of lowering the step a
    second time.
    """

    if (
        lowered is None
        or (mesh is not None and mesh.devices.size > 1)
        or remat_policy(config) is not None
        or config.train.unroll_rounds < config.train.num_rounds
        or config.train.remat_rounds
    ):
        flops_config = config.copy_and_resolve_references()
        flops_config.train.unroll_rounds = config.train.num_rounds
        flops_config.train.remat_rounds = False
        model = build_sam(sam_config, config.dtype, config.attention_impl, None)
        step_fn = make_train_step(model, tx, flops_config, model.param_shapes())
        # Unsharded, for the mesh's platform: the global program, on one device.
        plain = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
        traced = jax.jit(step_fn).trace(plain(state), plain(batch))
        platform = None if mesh is None else mesh.devices.flat[0].platform
        lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
    try:
        flops = hlo_traffic.analyze(lowered.as_text(dialect="hlo")).flops
    except Exception:  # noqa: BLE001 - a backend without HLO text: XLA's count
        return metric_writer.flops_of(lowered)
    return flops if flops > 0 else None


def _make_validator(config: Any, sam_config: Any):
    if not config.eval.dataset:
        return None

    examples = load_examples(config.eval.dataset, config.eval.split, config.eval.max_images)
    eval_model = build_sam(sam_config.replace(drop_path_rate=0.0), jnp.float32, "xla")
    ec = config.eval
    return Validator(eval_model, examples, ec.num_points, ec.max_masks, ec.batch_size, ec.feed_mask)


def _finish(workdir: str, sam_config: Any, params: Any, validator: Any) -> None:
    """Exports the final params as a converted checkpoint (WORKDIR/model, for sam_jax.load and
    eval.py) and draws predictions on held-out images (WORKDIR/predictions.png).

    Every process takes part in gathering the params; process 0 alone writes."""

    params = host_params(params)
    if distributed.is_main_process():
        path = paths.join(workdir, "model")
        save_converted(path, sam_config.replace(drop_path_rate=0.0), params, True)
        print(f"exported the trained model to {path}")
        if validator is not None:
            figure = paths.join(workdir, "predictions.png")
            save_prediction_figure(validator.model, params, validator.examples, figure)
            print(f"wrote {figure}")
    distributed.barrier("export")  # nobody exits before the model is written


def _progress_bar(config: Any, step: int):
    if not config.progress_bar:
        return None
    from tqdm import tqdm

    return tqdm(total=config.total_steps, initial=step, unit="step", dynamic_ncols=True)


def _postfix(m: dict[str, float]) -> dict[str, str]:
    out = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}", "img/s": f"{m['images_per_s']:.1f}"}
    if "mfu" in m:
        out["mfu"] = f"{100 * m['mfu']:.1f}%"
    return out
