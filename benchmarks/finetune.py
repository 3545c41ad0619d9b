"""What fine-tuning costs: LoRA vs full fine-tuning, and cached vs uncached embeddings.

    python benchmarks/finetune.py                         # vit_b, 1024 px, float32, this machine
    python benchmarks/finetune.py --image-size 256 --masks 4 --rounds 3   # a quick look

Four variants of the same train step (sam_jax.training.train_step, 11 interactive rounds, one
image per step, random data), each in its own process so that peak memory is its own:
    full      trainable "all"                                     (every param trains)
    lora      rank-4 LoRA on the encoder's qkv + trainable "mask_decoder" (SAMed's recipe)
    frozen    trainable "prompt_encoder_and_decoder", the encoder runs every step
    cached    the same, the step reads the embedding (the embedding cache): no encoder
Reports compile time, the median step time, steps/s, the trained-parameter count, optimizer-state
bytes, XLA's temp allocation of the compiled step and the process's peak RSS; prints the ratios
(full / lora, frozen / cached) and writes JSON (--output).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("full", "lora", "frozen", "cached")


def run_variant(args) -> dict:
    import jax
    import numpy as np

    from benchmarks.train_throughput import random_batch
    from sam_jax.modeling import build_sam, lora
    from sam_jax.training import embedding_cache, initialization
    from sam_jax.training.defaults import base_config
    from sam_jax.training.optimizer import make_optimizer, trainable_labels
    from sam_jax.training.train_loop import remat_policy
    from sam_jax.training.train_state import create_train_state
    from sam_jax.training.train_step import make_train_step

    c = base_config()
    c.model = args.model
    c.model_overrides.image_size = args.image_size
    c.dtype, c.remat_policy, c.batch_size = args.dtype, args.remat, 1
    c.data.max_masks, c.train.num_rounds = args.masks, args.rounds
    c.trainable = {"full": "all", "lora": "mask_decoder"}.get(
        args.variant, "prompt_encoder_and_decoder"
    )
    if args.variant == "lora":
        c.lora.rank, c.lora.alpha, c.lora.targets = 4, 4.0, ("qkv",)
    sam = initialization.sam_config_from(c)
    model = build_sam(sam, c.dtype, c.attention_impl, remat_policy(c))
    shapes = model.param_shapes()
    layers = lora.target_layers(shapes, c.lora.targets, c.lora.rank) if c.lora.rank else {}
    adapters = lora.init_adapters(jax.random.key(1), layers, c.lora.rank)
    tx = make_optimizer(c, shapes, sam.encoder_depth, adapters)
    params = model.init_params(jax.random.key(0))
    state = create_train_state(params, tx, 0, adapters)
    host = random_batch(np.random.default_rng(0), 1, sam.image_size, sam.low_res_size, args.masks)
    if args.variant == "cached":
        encode = embedding_cache.frozen_encoder(model, params)
        host["embedding"] = np.asarray(encode(host["image"], host["image_hw"]))
        del host["image"]
    batch = {k: jax.numpy.asarray(v) for k, v in host.items()}
    step = jax.jit(make_train_step(model, tx, c, shapes), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    labels = jax.tree.leaves(trainable_labels(shapes, c.trainable))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)]
    trained = sum(n for n, lab in zip(sizes, labels, strict=True) if lab == "train")
    trained += lora.num_adapter_params(layers, c.lora.rank)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
    step_s = float(np.median(times))
    return {
        "variant": args.variant,
        "trainable": c.trainable,
        "lora": f"rank {c.lora.rank} on {list(c.lora.targets)}" if c.lora.rank else None,
        "trained_params": trained,
        "optimizer_state_mib": opt_bytes / 2**20,
        "compile_s": compile_s,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        "step_times_s": times,
        "xla_temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "loss": float(m["loss"]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--masks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="full", help="encoder remat of every variant")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    from benchmarks.host_info import describe

    start_load = os.getloadavg()
    rows = []
    passthrough = sys.argv[1:] if argv is None else list(argv)
    for v in args.variants.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--variant", v],
            capture_output=True,
            text=True,
            check=False,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["variant"]: r for r in rows}
    ratios = {}
    if "full" in by and "lora" in by:
        ratios["full_over_lora_step_time"] = by["full"]["step_s"] / by["lora"]["step_s"]
        ratios["full_over_lora_peak_rss"] = by["full"]["peak_rss_mib"] / by["lora"]["peak_rss_mib"]
    if "frozen" in by and "cached" in by:
        ratios["cached_over_uncached_steps_per_s"] = (
            by["cached"]["steps_per_s"] / by["frozen"]["steps_per_s"]
        )
    print(json.dumps(ratios, indent=1))
    out = {
        "machine": describe(start_load, jax_backend="cpu"),
        "settings": {
            k: getattr(args, k)
            for k in ("model", "image_size", "masks", "rounds", "dtype", "remat")
        },
        "results": rows,
        "ratios": ratios,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
