"""Compile the train step for a TPU slice without the TPU, and read the plan off the compiler.

libtpu (`pip install 'sam_jax[tpu]'`) brings XLA's TPU compiler; `jax.experimental.topologies`
gives the devices of a whole slice ("v5e:16x16") without the hardware. `train_plan(config,
"v5e:16x16")` builds the real state, batch and train step of a config over those devices (the
same `train_loop.train_program` a run uses), compiles it and reports, per chip:

- memory: arguments, outputs, temporaries (XLA's memory analysis) against the chip's HBM;
- FLOPs and memory traffic of one step with every loop trip counted (`hlo_traffic.analyze`:
  XLA's own cost analysis counts a loop body once), and XLA's own totals beside them;
- the roofline step time max(FLOPs / peak, bytes / HBM bandwidth), images/s per chip, which of
  the two bounds it, and the MFU ceiling (model FLOPs: no remat recompute, rounds counted).

Chip figures (CHIPS) are the vendor's spec sheets. Nothing is allocated and nothing is written
(the compiler's buffer report is read from a temporary folder that is removed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import transforms
from sam_jax.amg import masks as amg_masks
from sam_jax.config import get_config
from sam_jax.errors import (
    LibtpuMissingError,
    PlanDoesNotFitError,
    TopologyError,
    one_line,
)
from sam_jax.modeling import build_sam
from sam_jax.training import config_checks, hlo_traffic, initialization, sharding
from sam_jax.training.train_loop import model_flops as count_model_flops
from sam_jax.training.train_loop import train_program

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth bytes/s."""

    generation: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    megacore: bool  # two TensorCores compiled as one device (v4, v5p)
    libtpu_name: str  # the generation as libtpu's topology names spell it


# Sources (Cloud TPU system architecture pages, docs.cloud.google.com/tpu/docs/<version>):
# v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s; v5e: 197 TFLOP/s, 16 GB at 819 GB/s;
# v5p: 459 TFLOP/s, HBM2e 95 GB at 2765 GB/s; v6e (Trillium): 918 TFLOP/s, 32 GB at 1638 GB/s.
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, True, "v4"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, False, "v5e"),
    "v5p": Chip("v5p", 95 * 10**9, 459e12, 2765e9, True, "v5"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1638e9, False, "v6e"),
}
HBM_HEADROOM = 0.10  # a plan fits when it leaves at least this share of the chip's HBM free


def parse_topology(name: str) -> tuple[Chip, str, dict[str, Any]]:
    """ "v5e:16x16" -> (chip, libtpu topology name, get_topology_desc keywords)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name.strip())
    if not m:
        known = ", ".join(f"{g}:AxB" if g in ("v5e", "v6e") else f"{g}:AxBxC" for g in CHIPS)
        raise TopologyError(f"unknown topology {name!r}: expected one of {known} (e.g. v5e:16x16)")
    chip = CHIPS[m.group(1)]
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) != (3 if chip.megacore else 2) or min(dims) < 1:
        shape = "AxBxC" if chip.megacore else "AxB"
        raise TopologyError(f"topology {name!r}: {chip.generation} slices are {shape}")
    kwargs: dict[str, Any] = {}
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    if int(np.prod(dims)) < 4:  # below a host's 2x2 chips
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    return chip, f"{chip.libtpu_name}:{m.group(2)}", kwargs


def libtpu_version() -> str | None:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _stderr_to(path: str):
    """Sends this process's file descriptor 2 to `path` (libtpu's start-up warnings)."""
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def topology_devices(name: str, num_slices: int = 1) -> tuple[Chip, list]:
    """(chip, compile-only devices) of a slice; TopologyError, LibtpuMissingError."""
    chip, libtpu_name, kwargs = parse_topology(name)
    if num_slices < 1:
        raise TopologyError(f"--num-slices must be >= 1, got {num_slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissingError(
            "compiling for a TPU needs libtpu: pip install 'sam_jax[tpu]' "
            f"(jax[tpu]=={jax.__version__})"
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chip is held
    from jax.experimental import topologies

    log = os.path.join(tempfile.gettempdir(), f"sam_jax_libtpu_{os.getpid()}.log")
    try:
        with _stderr_to(log):
            topo = topologies.get_topology_desc(libtpu_name, "tpu", num_slices=num_slices, **kwargs)
    except jax.errors.JaxRuntimeError as e:
        raise TopologyError(f"topology {name!r}: {one_line(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(log)
    return chip, list(topo.devices)


@contextlib.contextmanager
def no_persistent_cache():
    """Compiles inside stay out of jax's persistent cache (a compile-only executable cannot be
    loaded back from it)."""
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


@dataclasses.dataclass
class Plan:
    """What the compiler says about one program on one chip of a slice (bytes, FLOPs, s)."""

    what: str  # "train" or an inference program
    topology: str
    num_slices: int
    chips: int
    chip: Chip
    mesh: dict[str, int]
    images_per_step: float  # images one step processes, over all chips
    memory: dict[str, float]  # argument, output, alias, temp, total (per chip)
    fits: bool
    largest_buffers: list[str]
    flops: float  # per chip and step, every loop trip counted
    bytes: float  # bytes accessed per chip and step (XLA's count, every loop trip counted)
    hbm_bytes: float  # the part of `bytes` that goes to or from HBM (not on-chip VMEM)
    xla_flops: float  # XLA's cost analysis (a loop body counted once)
    xla_bytes: float
    collective_bytes: float
    model_flops: float | None  # per chip and step, no remat recompute
    compile_s: float
    top_ops: list[dict]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def images_per_chip(self) -> float:
        return self.images_per_step / self.chips

    @property
    def roofline_s(self) -> float:
        return max(self.flops / self.chip.peak_flops, self.hbm_bytes / self.chip.hbm_bandwidth)

    @property
    def bound(self) -> str:
        compute = self.flops / self.chip.peak_flops
        return "compute" if compute >= self.hbm_bytes / self.chip.hbm_bandwidth else "memory"

    @property
    def images_per_s_per_chip(self) -> float:
        return self.images_per_chip / self.roofline_s

    @property
    def mfu_ceiling(self) -> float | None:
        if self.model_flops is None:
            return None
        return self.model_flops / self.roofline_s / self.chip.peak_flops

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chip"] = dataclasses.asdict(self.chip)
        for k in ("images_per_chip", "roofline_s", "bound", "images_per_s_per_chip"):
            d[k] = getattr(self, k)
        d["mfu_ceiling"] = self.mfu_ceiling
        d["bytes_per_image"] = self.bytes / max(self.images_per_chip, 1e-12)
        d["hbm_bytes_per_image"] = self.hbm_bytes / max(self.images_per_chip, 1e-12)
        d["flops_per_image"] = self.flops / max(self.images_per_chip, 1e-12)
        return d


def environment() -> dict[str, str]:
    """What compiled the plans: versions, the date, this host."""
    return {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "libtpu": libtpu_version() or "not installed",
        "host": platform.node(),
        "host_cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def compile_program(
    jitted: Any,
    args: tuple,
    what: str,
    topology: str,
    num_slices: int,
    chip: Chip,
    mesh: Any,
    images_per_step: float,
    model_flops: float | None = None,
) -> Plan:
    """Compiles `jitted(*args)` (abstract, sharded args) for the slice and reads its plan."""
    chips = int(mesh.devices.size)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    refused = None
    # A compile-only executable cannot be loaded back: keep it out of the persistent cache. The
    # compiler's buffer report (and a refused module) is dumped to a folder removed right after.
    dump = tempfile.mkdtemp(prefix="sam_jax_tpu_plan_")
    try:
        with no_persistent_cache():
            compiled = lowered.compile({"xla_dump_to": dump})
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, refused = None, one_line(e)
    finally:
        report = _dump_files(dump)
        shutil.rmtree(dump, ignore_errors=True)
    compile_s = time.perf_counter() - t0
    if compiled is not None:
        ma = compiled.memory_analysis()
        memory = {
            "argument": float(ma.argument_size_in_bytes),
            "output": float(ma.output_size_in_bytes),
            "alias": float(ma.alias_size_in_bytes),
            "temp": float(ma.temp_size_in_bytes),
        }
        text = compiled.as_text()
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    else:
        m = re.search(r"temporaries \(([\d.]+)G\)", refused)
        memory = {"argument": 0.0, "output": 0.0, "alias": 0.0}
        memory["temp"] = float(m.group(1)) * GiB if m else float("nan")
        text = report.get("oom_intermediate_module", "")
        cost = {}
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    traffic = hlo_traffic.analyze(text) if text else None
    fits = refused is None and memory["total"] <= (1 - HBM_HEADROOM) * chip.hbm_bytes
    notes = [] if refused is None else [f"the compiler refused it: {refused}"]
    if traffic is not None and traffic.unknown_loops:
        notes.append(f"{len(traffic.unknown_loops)} loops of unknown trip count counted once")
    return Plan(
        what=what,
        topology=topology,
        num_slices=num_slices,
        chips=chips,
        chip=chip,
        mesh=dict(mesh.shape),
        images_per_step=images_per_step,
        memory=memory,
        fits=fits,
        largest_buffers=_largest_buffers(report.get("memory_report")),
        flops=traffic.flops if traffic else float("nan"),
        bytes=traffic.bytes if traffic else float("nan"),
        hbm_bytes=traffic.hbm_bytes if traffic else float("nan"),
        xla_flops=float(cost.get("flops", float("nan"))),
        xla_bytes=float(cost.get("bytes accessed", float("nan"))),
        collective_bytes=traffic.collective_bytes if traffic else float("nan"),
        model_flops=model_flops,
        compile_s=compile_s,
        top_ops=traffic.top(12, depth=None) if traffic else [],
        notes=notes,
    )


def _dump_files(folder: str) -> dict[str, str]:
    """The compiler's buffer report and refused module of the compile dumped to `folder`."""
    out = {}
    for key, pattern in (
        ("memory_report", "*memory-usage-report.txt"),
        ("oom_intermediate_module", "*oom_intermediate_module.txt"),
    ):
        files = sorted(glob.glob(os.path.join(folder, pattern)), key=os.path.getmtime)
        if files:
            with open(files[-1]) as f:
                out[key] = f.read()
    return out


def _largest_buffers(report: str | None, n: int = 3) -> list[str]:
    """ "4.00GiB: 2×f32[16,8192,8192]" lines of the largest HBM allocations in the report."""
    if not report:
        return []
    hbm = report.split("Memory Space:")[1] if "Memory Space:" in report else report
    rows = []
    for line in hbm.splitlines():
        parts = [p.strip() for p in line.split(";")]
        if len(parts) == 5 and parts[1].endswith("B") and parts[1][0].isdigit():
            rows.append(f"{parts[1]}: {parts[4]}")
    return rows[:n]


def check_fits(plan: Plan) -> None:
    """PlanDoesNotFitError (one line, the largest buffers named) when the plan does not fit."""
    if plan.fits:
        return
    need = plan.memory["total"] / GiB
    limit = (1 - HBM_HEADROOM) * plan.chip.hbm_bytes / GiB
    largest = "; ".join(plan.largest_buffers) or "no buffer report"
    raise PlanDoesNotFitError(
        f"{plan.what} on {plan.topology} needs {need:.2f} GiB per chip, more than "
        f"{limit:.2f} GiB ({100 * (1 - HBM_HEADROOM):.0f}% of {plan.chip.generation}'s "
        f"{plan.chip.hbm_bytes / GiB:.0f} GiB HBM); largest buffers: {largest}"
    )


def format_plan(plan: Plan) -> str:
    """The plan as a few readable lines."""
    m, chip = plan.memory, plan.chip
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"{plan.what} plan: {plan.topology}"
        + (f" x {plan.num_slices} slices" if plan.num_slices > 1 else "")
        + f", {plan.chips} chips, mesh {mesh}, {plan.images_per_chip:g} images per chip",
        f"  memory per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} "
        f"(aliased {_gib(m['alias'])}), temporaries {_gib(m['temp'])}; total {_gib(m['total'])} "
        f"of {chip.hbm_bytes / GiB:.1f} GiB HBM ({'fits' if plan.fits else 'does NOT fit'}, "
        f"{100 * (1 - HBM_HEADROOM):.0f}% allowed)",
        f"  per chip and step (loops counted): {_tera(plan.flops)}FLOP, "
        f"{plan.hbm_bytes / 1e9:.1f} GB of HBM traffic "
        f"({plan.flops / max(plan.hbm_bytes, 1):.0f} FLOP/byte; {chip.generation} "
        f"ridge {chip.peak_flops / chip.hbm_bandwidth:.0f}), {plan.bytes / 1e9:.1f} GB with VMEM; "
        f"XLA's cost analysis (loop bodies once): {_tera(plan.xla_flops)}FLOP, "
        f"{plan.xla_bytes / 1e9:.1f} GB",
        f"  roofline: {plan.roofline_s * 1e3:.1f} ms per step, {plan.bound}-bound, "
        f"{plan.images_per_s_per_chip:.2f} images/s per chip"
        + (f", MFU ceiling {100 * plan.mfu_ceiling:.0f}%" if plan.mfu_ceiling else ""),
    ]
    if plan.largest_buffers and not plan.fits:
        lines.append("  largest buffers: " + "; ".join(plan.largest_buffers))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x / GiB:.3g} GiB"


def _tera(x: float) -> str:
    return f"{x / 1e12:.3g} T" if x >= 1e11 else f"{x / 1e9:.3g} G"


def abstract_batch(config: Any, sam_config: Any, mesh: Any, cached: bool) -> dict[str, Any]:
    """The train iterator's global batch as ShapeDtypeStructs split over the batch axes
    (`embedding` in place of `image` when the embedding cache serves the encoder)."""

    b, s = config.batch_size, sam_config.image_size
    m, n = sam_config.low_res_size, config.data.max_masks
    g, d = sam_config.embedding_size, sam_config.prompt_embed_dim
    shapes = {
        "image_hw": ((b, 2), jnp.int32),
        "masks": ((b, n, m, m), jnp.uint8),
        "mask_valid": ((b, n), jnp.bool_),
        "index": ((b,), jnp.int32),
    }
    if cached:
        shapes["embedding"] = ((b, g, g, d), jnp.float32)
    else:
        shapes["image"] = ((b, s, s, 3), jnp.uint8)
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for k, (shape, dtype) in shapes.items()
    }


def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def train_plan(config: Any, topology: str, num_slices: int = 1, model_flops: bool = True) -> Plan:
    """Compiles `config`'s train step for the slice (module doc); the config is not changed."""

    config = config.copy_and_resolve_references()
    if config.init.type == "mae":  # the architecture is config.model's: the file is not read
        config.init.type = "random"
    # No data is read (the batch's shapes come from the model and data.max_masks).
    config.data.train, config.eval.dataset = "synthetic", ""
    config_checks.check_config(config)
    chip, devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(config.mesh_shape, devices, num_slices)
    if config.batch_size % mesh.devices.size:
        raise config_checks.ConfigError(
            f"config field batch_size {config.batch_size} is not divisible by the "
            f"{mesh.devices.size} chips of {topology}"
        )
    sam_config = initialization.sam_config_from(config)
    program = train_program(config, sam_config, mesh)
    cached = config.embedding_cache != "off" and not config_checks.cache_blocker(config)
    state = with_shardings(program.abstract_state, program.state_shardings)
    batch = abstract_batch(config, sam_config, mesh, cached)
    flops = None
    if model_flops:
        flops = count_model_flops(config, sam_config, program.tx, state, batch, None, mesh)
    chips = int(mesh.devices.size)
    return compile_program(
        program.step,
        (state, batch),
        "train",
        topology,
        num_slices,
        chip,
        mesh,
        float(config.batch_size),
        None if flops is None else flops / chips,
    )


# ----------------------------------------------------------------------------- inference

INFERENCE_ORIGINAL_SIZE = (768, 1024)  # the image size of the H100 anchors (h, w)


def inference_plan(model_type: str, what: str, topology: str, count: int = 1) -> Plan:
    """Compiles one inference program for a chip and reads its plan (bfloat16 compute, float32
    params, the attention the platform takes by default):

      "encoder"  `count` images (B, S, S, 3) -> embeddings;
      "decoder"  `count` single-point prompts on one image: decode (3 masks each, 256 prompts
                 per pass at most, as the predictor on a TPU) and post-process to 768 x 1024
                 bool masks (SamPredictor.predict's output);
      "amg"      the automatic mask generator's device work on one 768 x 1024 image (no crops):
                 the encoder, the 32 x 32 point grid decoded 64 points at a time (its default
                 points_per_batch), post-processed, stability scores, boxes and the box NMS.
    """
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    chip, devices = topology_devices(topology)
    mesh = Mesh(np.array(devices[:1]).reshape(1, 1), ("data", "fsdp"))
    one = NamedSharding(mesh, P())
    config = get_config(model_type)
    model = build_sam(config, jnp.bfloat16, "auto")
    s, g, d = config.image_size, config.embedding_size, config.prompt_embed_dim
    input_size = transforms.get_preprocess_shape(*INFERENCE_ORIGINAL_SIZE, s)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=one)

    params = jax.tree.map(lambda x: spec(x.shape, x.dtype), model.param_shapes())

    def decode_and_postprocess(p, emb, points, chunk, threshold=None):
        labels = jnp.broadcast_to(jnp.array([1, -1], jnp.int32), points.shape[:-1])

        def decode(pts, lab):
            return model.apply({"params": p}, emb, pts, lab, None, None, True, method=model.decode)

        low_res, iou = F.map_prompt_chunks(decode, (points, labels), 1, chunk)

        def upscale(x):  # thresholded inside the chunk, as functional's post-processing
            logits = transforms.postprocess_masks(x, input_size, INFERENCE_ORIGINAL_SIZE, s)
            return logits if threshold is None else logits > threshold

        return F.map_prompt_chunks(upscale, (low_res[0],), 0, chunk), iou[0]

    images = spec((count if what == "encoder" else 1, s, s, 3), jnp.float32)
    if what == "encoder":

        def fn(p, x):
            return model.apply({"params": p}, x, method=model.encode)

        args, per_step = (params, images), count
    elif what == "decoder":

        def fn(p, emb, points):
            chunk = F.PROMPT_CHUNK.get("tpu", F.PROMPT_CHUNK_DEFAULT)  # what a TPU would run
            return decode_and_postprocess(p, emb, points, chunk, threshold=0.0)

        emb = spec((1, g, g, d), jnp.float32)
        args, per_step = (params, emb, spec((1, count, 2, 2), jnp.float32)), 1
    elif what == "amg":
        grid = amg_masks.build_point_grid(32) * np.array(INFERENCE_ORIGINAL_SIZE[::-1])
        grid = transforms.apply_coords(grid, INFERENCE_ORIGINAL_SIZE, s).astype(np.float32)

        def fn(p, x):
            emb = model.apply({"params": p}, x, method=model.encode)
            pts = jnp.stack([grid, np.zeros_like(grid)], axis=1)[None]  # (1, 1024, 2, 2)
            logits, iou = decode_and_postprocess(p, emb, pts, 64)
            stability = amg_masks.calculate_stability_score(logits, 0.0, 1.0)
            boxes = amg_masks.batched_mask_to_box(logits > 0.0)
            keep, num = amg_masks.box_nms(boxes.reshape(-1, 4), iou.reshape(-1), 0.7)
            return keep, num, stability

        args, per_step = (params, images), 1
    else:
        raise ValueError(f"unknown inference program {what!r}")
    label = f"{model_type} {what}" + (f" x{count}" if what != "amg" else "")
    return compile_program(jax.jit(fn), args, label, topology, 1, chip, mesh, float(per_step))
