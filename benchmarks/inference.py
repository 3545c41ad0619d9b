"""Side-by-side inference timing: sam_jax vs the official PyTorch SAM on the same random weights.

Times, on one device, in one run: the image encoder (ms per image, per model / dtype / batch),
the prompt decoder (ms for 1, 64, 1024 prompts: low-res logits, and masks at a 768x1024 original
size), and the automatic mask generator (s per 768x1024 image at default settings). Prints a table
with ratios (official / sam_jax, > 1 means sam_jax is faster) and writes JSON.

  python benchmarks/inference.py                           # CPU defaults: vit_b fp32 batch 1
  python benchmarks/inference.py --models vit_b,vit_h --dtypes float32,bfloat16 --batches 1,8 \
      --prompts 1,64,1024 --amg --output bench.json       # the GPU table

Random weights keep no mask in the generator, so its time is the cost of decoding and filtering
the grid, as for the official figure in shared/reference/anchors.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() (fn must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _jax_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def _official(model_type: str, device: str):
    """The official model on `device` and its weights converted to a sam_jax params pytree."""
    try:
        import segment_anything as sa
        import torch
    except ImportError:
        return None, None
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import get_config

    torch.manual_seed(0)
    sam = sa.sam_model_registry[model_type](checkpoint=None).eval()
    sd = {k: v.numpy() for k, v in sam.state_dict().items() if "pixel_" not in k}
    params = state_dict_to_params(sd, get_config(model_type))
    return sam.to(device), params


def bench_encoder(args, model_type, official, params, results):
    import torch

    from sam_jax import functional as F
    from sam_jax.config import get_config
    from sam_jax.modeling import build_sam

    s = 1024
    for dtype in args.dtypes:
        model = build_sam(get_config(model_type), dtype=jnp.dtype(dtype), attention_impl=args.attn)
        p = jax.device_put(params)
        for batch in args.batches:
            x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, s, s, 3)), jnp.float32)
            ours = _timeit(lambda: F.encode_images(model, p, x).block_until_ready(), args.repeats)
            row = {
                "model": model_type,
                "dtype": dtype,
                "batch": batch,
                "sam_jax_ms_per_image": 1e3 * ours / batch,
                "sam_jax_peak_gib": _jax_peak_gib(),
            }
            if official is not None:
                xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).to(args.torch_device)
                ctx = (
                    torch.autocast(args.torch_device, dtype=torch.bfloat16)
                    if dtype == "bfloat16"
                    else torch.autocast(args.torch_device, enabled=False)
                )

                def run_official():
                    with torch.no_grad(), ctx:
                        official.image_encoder(xt)
                    if args.torch_device == "cuda":
                        torch.cuda.synchronize()

                ref = _timeit(run_official, args.repeats)
                row["official_ms_per_image"] = 1e3 * ref / batch
                row["ratio"] = ref / ours
            results["encoder"].append(row)
            print(_fmt(row), flush=True)


def bench_decoder(args, model_type, official, params, results):
    import torch

    from sam_jax import functional as F
    from sam_jax.config import get_config
    from sam_jax.modeling import build_sam
    from sam_jax.prompts import pack_prompts

    config = get_config(model_type)
    model = build_sam(config, attention_impl=args.attn)
    p = jax.device_put(params)
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(1, 64, 64, 256)), jnp.float32)
    original, input_size = (768, 1024), (768, 1024)
    for n in args.prompts:
        coords = rng.uniform(0, 767, size=(n, 1, 2)).astype(np.float32)
        xy, lab = pack_prompts(coords, np.ones((n, 1), np.int32))
        xy, lab = jnp.asarray(xy[None]), jnp.asarray(lab[None])

        def ours_fn():
            low, iou = F.decode_prompts(model, p, emb, xy, lab)
            masks = F.postprocess_masks(low, input_size, original, config.image_size)
            masks.block_until_ready()

        def ours_low_fn():
            F.decode_prompts(model, p, emb, xy, lab)[0].block_until_ready()

        row = {
            "model": model_type,
            "prompts": n,
            "sam_jax_ms": 1e3 * _timeit(ours_fn, args.repeats),
            "sam_jax_low_res_ms": 1e3 * _timeit(ours_low_fn, args.repeats),
        }
        if official is not None:
            from segment_anything import SamPredictor

            pred = SamPredictor(official)
            pred.features = (
                torch.from_numpy(np.asarray(emb)).permute(0, 3, 1, 2).to(args.torch_device)
            )
            pred.original_size, pred.input_size, pred.is_image_set = original, input_size, True
            pc = torch.from_numpy(coords).to(args.torch_device)
            pl = torch.ones((n, 1), device=args.torch_device)

            def run_official():
                with torch.no_grad():
                    pred.predict_torch(pc, pl, multimask_output=True, return_logits=True)
                if args.torch_device == "cuda":
                    torch.cuda.synchronize()

            ref = _timeit(run_official, args.repeats)
            row["official_ms"] = 1e3 * ref
            row["ratio"] = ref / (row["sam_jax_ms"] / 1e3)
        results["decoder"].append(row)
        print(_fmt(row), flush=True)


def bench_amg(args, model_type, official, params, results):
    from sam_jax import SamAutomaticMaskGenerator
    from sam_jax.config import get_config
    from sam_jax.modeling import build_sam

    image = np.random.default_rng(0).integers(0, 255, size=(768, 1024, 3), dtype=np.uint8)
    model = build_sam(get_config(model_type), attention_impl=args.attn)
    gen = SamAutomaticMaskGenerator(model, jax.device_put(params))
    # Each generate() runs the image encoder and decodes the whole grid (the official figure too).
    t = time.perf_counter()
    gen.generate(image)  # the warm-up run: compiles the encoder and the grid decoding
    row = {"model": model_type, "sam_jax_first_call_s": time.perf_counter() - t}
    row["sam_jax_s"] = _timeit(lambda: gen.generate(image), args.repeats, warmup=0)
    if official is not None:
        from segment_anything import SamAutomaticMaskGenerator as OfficialAMG

        ref_gen = OfficialAMG(official)
        # No warm-up run: the official generator compiles nothing (a run takes minutes on a CPU).
        row["official_s"] = _timeit(lambda: ref_gen.generate(image), args.repeats, warmup=0)
        row["ratio"] = row["official_s"] / row["sam_jax_s"]
    results["amg"].append(row)
    print(_fmt(row), flush=True)


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit_b")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompts", default="1,64")
    ap.add_argument("--amg", action="store_true", help="also time the automatic mask generator")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--attn", default="auto", help="xla | cudnn | auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="default", help="jax matmul precision (default|highest)")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.prompts = [int(n) for n in args.prompts.split(",") if n]
    args.torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    if args.precision != "default":
        jax.config.update("jax_default_matmul_precision", args.precision)

    results = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "encoder": [],
        "decoder": [],
        "amg": [],
    }
    print(f"device: {results['device']} ({results['backend']})")
    for model_type in args.models.split(","):
        official, params = _official(model_type, args.torch_device)
        if params is None:
            raise SystemExit("benchmarks/inference.py needs torch and segment-anything installed")
        if not args.skip_encoder:
            bench_encoder(args, model_type, official, params, results)
        if args.prompts:
            bench_decoder(args, model_type, official, params, results)
        if args.amg:
            bench_amg(args, model_type, official, params, results)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
