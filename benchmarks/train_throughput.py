"""Training throughput of the full SAM recipe: step time, images/s, MFU and peak memory.

    python benchmarks/train_throughput.py                # vit_b and vit_h, 1024 px, paper recipe
    python benchmarks/train_throughput.py --models vit_b --batch-per-device 4
    python benchmarks/train_throughput.py --tiny               # CPU smoke test (tiny model, 128 px)

Per model: one jitted train step of the real recipe (image encoder once per image, 64 masks per
image, 11 interactive rounds, bfloat16 compute, float32 params and AdamW state, remat of every
encoder block) on random data, sharded over all local devices (mesh (-1, 1) unless --fsdp).
MFU counts model FLOPs (XLA's count of the same step lowered without remat and with the rounds
unrolled) against the chip's dense bf16 peak (sam_jax.training.metric_writer.PEAK_TFLOPS, or
--peak-tflops; on a CPU the measured float32 matmul throughput). Prints a markdown
table and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sam_jax.modeling import build_sam  # noqa: E402
from sam_jax.training import initialization, metric_writer, sharding  # noqa: E402
from sam_jax.training.defaults import base_config  # noqa: E402
from sam_jax.training.optimizer import make_optimizer  # noqa: E402
from sam_jax.training.train_loop import model_flops, remat_policy  # noqa: E402
from sam_jax.training.train_state import create_train_state  # noqa: E402
from sam_jax.training.train_step import make_train_step  # noqa: E402


def random_batch(rng, batch, image_size, mask_size, masks):
    """A batch in the data-pipeline format: random images, random rectangles as masks."""
    image = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    gt = np.zeros((batch, masks, mask_size, mask_size), np.uint8)
    for b in range(batch):
        for k in range(masks):
            y0, x0 = rng.integers(0, mask_size // 2, 2)
            h, w = rng.integers(2, mask_size // 2, 2)
            gt[b, k, y0 : y0 + h, x0 : x0 + w] = 1
    return {
        "image": image,
        "image_hw": np.full((batch, 2), image_size, np.int32),
        "masks": gt,
        "mask_valid": np.ones((batch, masks), bool),
    }


def bench_config(args, model_name):
    c = base_config()
    c.model = model_name
    c.dtype = args.dtype
    c.remat_policy = args.remat
    c.attention_impl = args.attention
    c.data.max_masks = args.masks
    c.train.num_rounds = args.rounds
    c.batch_size = args.batch_per_device * jax.device_count()
    c.mesh_shape = (-1, args.fsdp)
    c.model_overrides.drop_path_rate = 0.1
    c.model_overrides.image_size = args.image_size
    return c


def run_one(args, model_name):
    c = bench_config(args, model_name)
    sam_config = initialization.sam_config_from(c)
    mesh = sharding.make_mesh(c.mesh_shape)
    model = build_sam(sam_config, c.dtype, c.attention_impl, remat_policy(c))
    shapes = model.param_shapes()
    tx = make_optimizer(c, shapes, sam_config.encoder_depth)

    def init():
        return create_train_state(model.init_params(jax.random.key(0)), tx, 0)

    abstract = jax.eval_shape(init)
    state_sh = sharding.tree_shardings(mesh, abstract, min_fsdp_size=c.min_fsdp_size)
    state = jax.jit(init, out_shardings=state_sh)()
    step_fn = jax.jit(
        make_train_step(model, tx, c, shapes), donate_argnums=(0,), out_shardings=(state_sh, None)
    )
    rng = np.random.default_rng(0)
    host = random_batch(
        rng, c.batch_size, sam_config.image_size, sam_config.low_res_size, c.data.max_masks
    )
    batch = sharding.shard_batch(mesh, host)

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(c, sam_config, tx, state, batch, lowered)
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    peak = metric_writer.peak_flops_per_device(args.peak_tflops)
    mem = jax.local_devices()[0].memory_stats() or {}
    return {
        "model": model_name,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "image_size": sam_config.image_size,
        "batch": c.batch_size,
        "masks_per_image": c.data.max_masks,
        "rounds": c.train.num_rounds,
        "dtype": c.dtype,
        "remat": c.remat_policy,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": c.batch_size / step_s,
        "images_per_s_per_device": c.batch_size / step_s / jax.device_count(),
        "model_tflops_per_step": flops / 1e12 if flops else None,
        "mfu": flops / step_s / (peak * jax.device_count()) if flops and peak else None,
        "peak_memory_gib": mem.get("peak_bytes_in_use", 0) / 2**30 or None,
        "loss": float(m["loss"]),
    }


def markdown(rows):
    cols = [
        "model",
        "device",
        "batch",
        "image_size",
        "masks_per_image",
        "rounds",
        "dtype",
        "remat",
        "compile_s",
        "step_s",
        "images_per_s",
        "mfu",
        "peak_memory_gib",
    ]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k in cols:
            v = r[k]
            if k == "mfu" and v is not None:
                v = f"{100 * v:.1f}%"
            elif isinstance(v, float):
                v = f"{v:.3g}"
            cells.append("n/a" if v is None else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models", default="vit_b,vit_h", help="comma list of vit_b, vit_l, vit_h, tiny"
    )
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--masks", type=int, default=64)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="full", help="none, full, dots_saveable, ...")
    p.add_argument("--attention", default="xla", help="xla, cudnn or auto")
    p.add_argument("--fsdp", type=int, default=1, help="size of the fsdp mesh axis")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device peak")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke test: tiny model, 128 px, 8 masks, 3 rounds, float32",
    )
    p.add_argument("--output", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.image_size, args.masks, args.rounds = "tiny", 128, 8, 3
        args.dtype, args.steps, args.warmup = "float32", 2, 1
    rows = []
    for name in args.models.split(","):
        rows.append(run_one(args, name.strip()))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
