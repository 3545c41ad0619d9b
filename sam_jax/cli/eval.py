"""sam-jax-eval: zero-shot evaluation of a SAM checkpoint (SAM paper 7.1 / 7.3 / D.1); also
`python eval.py`.

    sam-jax-eval --checkpoint CKPT --dataset SPEC [--dataset SPEC ...] --output DIR

CKPT: a converted sam_jax directory or an official .pth. SPEC: `synthetic[:SPLIT]`,
`sa1b:PATH`, `coco:ANN_JSON:IMAGES_DIR`, `tfds:NAME[:SPLIT]` (see sam_jax.data.spec).
Per dataset: mIoU after 1, 2, 3, 5, 9 points (RITM clicks, most confident mask), oracle mIoU at
1 point, box mIoU from ground-truth boxes, and with --detections (a COCO results JSON of
detector boxes, for the one coco: dataset) COCO mask AP. Writes DIR/results.json, results.md,
results.csv and miou_vs_points.png, and prints the table. CKPT, DIR and the data may be bucket
paths (gs://...). Several processes (a pod, SLURM, or --coordinator-address/--num-processes/
--process-id) split the images between them and report the same numbers as one process;
process 0 writes the reports.
"""

from __future__ import annotations

import argparse
import sys
import time

from sam_jax.cli import common

PROG = "sam-jax-eval"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 2)[2].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    p.add_argument("--checkpoint", required=True, help="converted directory or official .pth")
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="SPEC",
        help="dataset spec; repeat for several datasets",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the reports")
    p.add_argument(
        "--split", default="val", help="split for specs that do not name one (default: val)"
    )
    p.add_argument(
        "--max-masks",
        type=common.positive_int,
        default=None,
        help="evaluate a seeded uniform sample of this many masks per dataset "
        "(the paper used about 10000 for large datasets)",
    )
    p.add_argument(
        "--max-images",
        type=common.positive_int,
        default=None,
        help="read at most N images per dataset",
    )
    p.add_argument(
        "--num-points",
        default="1,2,3,5,9",
        help="report mIoU after these numbers of points (comma separated)",
    )
    p.add_argument(
        "--first-point",
        choices=("center", "random"),
        default="center",
        help="first click: farthest from the boundary (default) or random interior",
    )
    p.add_argument(
        "--feed-mask",
        action="store_true",
        help="feed the previous round's low-res logits back as the mask prompt",
    )
    p.add_argument(
        "--multimask",
        choices=("first", "always", "never"),
        default="first",
        help="3 outputs for the first click only (default), every click, or never",
    )
    p.add_argument("--no-boxes", action="store_true", help="skip the ground-truth box protocol")
    p.add_argument(
        "--detections",
        metavar="JSON",
        help="COCO results JSON of detector boxes for the coco: dataset -> mask AP",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=common.positive_int, default=32, help="masks per decoder call"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the model",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_distributed_flags(p)
    p.add_argument(
        "--verbose",
        action="store_true",
        help="log each skipped image or mask (they are always counted in the report)",
    )
    return p


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    """The flags, checked (UsageError); the dataset specs are parsed later, in `run`."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    try:
        args.num_points = sorted({int(n) for n in args.num_points.split(",") if n.strip()})
    except ValueError:
        p.error(f"--num-points must be comma-separated integers, got {args.num_points!r}")
    if args.num_points and min(args.num_points) < 1:
        p.error("--num-points values must be >= 1")
    return args


def _parse_specs(args):
    """The parsed dataset specs; a spec the parser rejects is a usage error."""
    from sam_jax import paths
    from sam_jax.data import parse_dataset_spec

    specs = []
    for text in args.dataset:
        try:
            specs.append(parse_dataset_spec(text))
        except ValueError as e:  # malformed (a missing path is FileNotFoundError: exit 1)
            raise common.UsageError(f"--dataset: {common.one_line(e)}") from None
    if args.detections:
        coco = [s for s in specs if s.kind == "coco"]
        if len(coco) != 1:
            raise common.UsageError(
                f"--detections needs exactly one coco: dataset, got {len(coco)}"
            )
        if not paths.isfile(args.detections):
            raise FileNotFoundError(f"detections file {args.detections!r} does not exist")
    return specs


def _dataset_names(specs) -> list[str]:
    names = []
    for spec in specs:
        name, k = spec.text, 2
        while name in names:
            name, k = f"{spec.text} #{k}", k + 1
        names.append(name)
    return names


def _load_predictor(path: str, dtype: str):
    import jax.numpy as jnp

    from sam_jax import paths
    from sam_jax.checkpoints import load
    from sam_jax.predictor import SamPredictor

    if not paths.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        model, params = load(path, dtype=getattr(jnp, dtype))
    except Exception as e:  # any failure to load is a bad checkpoint, reported in one line
        raise ValueError(f"could not load checkpoint {path!r}: {type(e).__name__}: {e}") from None
    return SamPredictor(model, params)


def _sum_counts(counts: list[dict]) -> dict:
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _evaluate_dataset(predictor, spec, args) -> dict:
    import jax

    from sam_jax import distributed
    from sam_jax.data import iterate_examples
    from sam_jax.evaluation import evaluate_detections, evaluate_points
    from sam_jax.evaluation.protocol import NoMasksError

    stats: dict = {}
    main_process = distributed.is_main_process()

    def examples():  # a fresh pass over this process's share; stats of the last pass are kept
        stats.clear()
        return iterate_examples(
            spec,
            split=args.split,
            max_images=args.max_images,
            seed=args.seed,
            stats=stats,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    try:
        entry = evaluate_points(
            predictor,
            examples,
            num_points=args.num_points,
            first_point=args.first_point,
            feed_mask=args.feed_mask,
            multimask=args.multimask,
            gt_boxes=not args.no_boxes,
            seed=args.seed,
            max_masks=args.max_masks,
            batch_size=args.batch_size,
            progress=not args.no_progress and main_process,
            all_gather=distributed.all_gather,
        )
    except NoMasksError as e:
        raise NoMasksError(
            f"{e}; the reader skipped {stats.get('skipped_images', 0)} unreadable images, "
            f"{stats.get('images_without_masks', 0)} images without masks, "
            f"{stats.get('empty_masks', 0)} zero-area masks"
        ) from None
    stats = _sum_counts(distributed.all_gather(dict(stats)))
    entry["data_stats"] = stats
    entry["skipped_images"] = int(stats.get("skipped_images", 0))
    # Zero-area masks are dropped by the data layer ("empty_masks"), undecodable ones too
    # ("skipped_masks"); evaluate_points drops any left (in-memory sources).
    entry["skipped_masks"] = (
        entry["skipped_empty_masks"]
        + int(stats.get("empty_masks", 0))
        + int(stats.get("skipped_masks", 0))
    )
    entry["mask_ap"] = None
    if args.detections and spec.kind == "coco":
        det = evaluate_detections(
            predictor,
            spec.path,
            spec.images_dir,
            args.detections,
            max_images=args.max_images,
            batch_size=args.batch_size,
            progress=not args.no_progress and main_process,
        )
        entry["mask_ap"] = det["mask_ap"]
        entry["detections"] = {
            k: det[k] for k in ("num_images", "num_detections", "skipped_images", "timing")
        }
    return entry


def run(args: argparse.Namespace) -> int:
    import logging

    common.join_job(args)
    from sam_jax import distributed, paths

    main_process = distributed.is_main_process()
    logging.getLogger("sam_jax.data").setLevel(logging.INFO if args.verbose else logging.ERROR)
    from sam_jax.evaluation import markdown_table, write_reports

    specs = _parse_specs(args)  # all specs checked before any work
    inputs = {"--checkpoint": args.checkpoint, "--detections": args.detections}
    for i, spec in enumerate(specs):
        inputs.update(
            {f"--dataset #{i + 1}": spec.path, f"--dataset #{i + 1} images": spec.images_dir}
        )
    common.check_paths(inputs, args.output)
    if main_process:
        paths.check_writable(args.output)
    predictor = _load_predictor(args.checkpoint, args.dtype)
    results = {
        "checkpoint": paths.resolve(args.checkpoint),
        "seed": args.seed,
        "split": args.split,
        "protocol": {
            "num_points": args.num_points,
            "first_point": args.first_point,
            "feed_mask": args.feed_mask,
            "multimask": args.multimask,
            "gt_boxes": not args.no_boxes,
            "max_masks": args.max_masks,
            "max_images": args.max_images,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "detections": paths.resolve(args.detections) if args.detections else None,
        },
        "datasets": {},
    }
    start = time.perf_counter()
    for name, spec in zip(_dataset_names(specs), specs, strict=True):
        try:
            results["datasets"][name] = entry = _evaluate_dataset(predictor, spec, args)
        except ValueError as e:
            raise ValueError(f"dataset {name!r}: {common.one_line(e)}") from None
        t = entry["timing"]
        if not main_process:
            continue
        print(
            f"{name}: {entry['num_images']} images, {entry['num_masks']} masks, "
            f"{t['images_per_s']:.2f} images/s, {t['masks_per_s']:.1f} masks/s "
            f"(first image incl. compilation {t['first_image_seconds']:.1f} s; skipped "
            f"{entry['skipped_images']} unreadable images, {entry['skipped_masks']} masks)",
            file=sys.stderr,
        )
    results["seconds"] = time.perf_counter() - start
    if main_process:
        written = write_reports(results, args.output)
        print(markdown_table(results), end="")
        print("wrote " + ", ".join(written.values()))
    distributed.barrier("eval_reports")
    return common.EXIT_OK


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-eval command; returns the exit status (0 / 1 failed / 2 usage)."""
    return common.run_command(prog, lambda: run(parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
