"""sam-jax-eval: zero-shot evaluation of a SAM checkpoint (SAM paper section 7, appendix D); also
`python eval.py`.

    sam-jax-eval --checkpoint CKPT [--task TASK] --dataset SPEC [--dataset SPEC ...] --output DIR

CKPT: anything sam_jax.load reads (a converted or transformers directory, an official .pth, a
registry name, a Hub id). SPEC: `synthetic[:SPLIT]`, `sa1b:PATH`, `coco:ANN_JSON:IMAGES_DIR`,
`lvis:ANN_JSON:IMAGES_DIR`, `bsds:ROOT[:SPLIT]`, `tfds:NAME[:SPLIT]` (see sam_jax.data.spec).
Tasks: points (default; mIoU after 1, 2, 3, 5, 9 points with RITM clicks and the most confident
mask, oracle mIoU at 1 point, box mIoU from ground-truth boxes; --group-by FIELD adds mIoU per
annotation-field value with 95% bootstrap intervals; with --detections, COCO mask AP on the coco:
dataset), boxes, instances (mask AP of --detections' boxes, COCO or LVIS), edges (BSDS500 ODS,
OIS, AP, R50), proposals (mask AR@1000, COCO or LVIS) and text (mIoU from each mask's name alone,
a SAM with a text path: synthetic shapes, or COCO / LVIS masks named by their category; --clip
replaces the checkpoint's CLIP). The paper's numbers are printed beside
ours where the task and dataset are the paper's. Writes DIR/results.json, results.md,
results.csv (and miou_vs_points.png, groups.csv where they apply), and prints the table. CKPT,
DIR and the data may be bucket paths (gs://...). Several processes (a pod, SLURM, or
--coordinator-address/--num-processes/--process-id) split the images between them and report
the same numbers as one process; process 0 writes the reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sam_jax import distributed, paths
from sam_jax.cli import common
from sam_jax.data import iterate_examples
from sam_jax.evaluation.boundaries import DEFAULT_THRESHOLDS, MATCHERS
from sam_jax.evaluation.checkpoint import (
    DTYPES,
    TASKS,
    EvalSettings,
    evaluate_checkpoint,
    load_predictor,
    parse_specs,
    quiet_data_logs,
)
from sam_jax.evaluation.proposals import MAX_PROPOSALS
from sam_jax.evaluation.protocol import FIRST_POINT_MODES, MULTIMASK_MODES
from sam_jax.evaluation.report import (
    comparison_markdown,
    markdown_table,
    write_comparison,
    write_reports,
)

PROG = "sam-jax-eval"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 2)[2].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a converted or transformers directory, an official .pth, a registry name or a Hub id",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="points",
        help="points: mIoU after N clicks and from ground-truth boxes (default); boxes: from "
        "ground-truth boxes only; instances: mask AP from --detections' boxes (coco: or lvis:); "
        "edges: BSDS500 ODS/OIS/AP/R50 (bsds:); proposals: mask AR@1000 (coco: or lvis:); "
        "text: mIoU from each mask's name (synthetic:, coco: or lvis:; a SAM with a text path)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="SPEC",
        help="dataset spec; repeat for several datasets",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the reports")
    p.add_argument(
        "--baseline",
        metavar="CKPT",
        help="also evaluate this checkpoint (e.g. the one a fine-tuning started from) on the "
        "same data: its reports go to DIR/baseline/, both side by side to DIR/comparison.md and, "
        "for the points task, their predictions on a few images to DIR/before_after.png",
    )
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
        choices=FIRST_POINT_MODES,
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
        choices=MULTIMASK_MODES,
        default="first",
        help="3 outputs for the first click only (default), every click, or never",
    )
    p.add_argument("--no-boxes", action="store_true", help="skip the ground-truth box protocol")
    p.add_argument(
        "--detections",
        metavar="JSON",
        help="COCO results JSON of detector boxes (task instances, or points on a coco: dataset) "
        "-> mask AP",
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="instances: one single-output pass per box instead of D.4's refinement pass",
    )
    p.add_argument(
        "--group-by",
        metavar="FIELD[:BINS]",
        help="points: mIoU per value of this annotation field (coco:/lvis: or the annotation's "
        "category, e.g. name, frequency; sa1b: e.g. area, predicted_iou, stability_score, "
        "crop_box) with 95%% bootstrap confidence intervals (paper Table 2 used --first-point "
        "random and 1 and 3 points). Numbers are binned by BINS: coco (area small/medium/large), "
        "qN (N quantiles), e1,e2,... (edges) or values (as they are); default coco for area, q4 "
        "for predicted_iou and stability_score, values otherwise",
    )
    p.add_argument(
        "--clip",
        metavar="FOLDER_OR_HUB_ID",
        help="text: the CLIP of the text prompts instead of the one the checkpoint names (a "
        "transformers CLIP folder or Hub id; its embedding width must be the model's)",
    )
    p.add_argument(
        "--text-template",
        metavar="TEMPLATE",
        help="text: the phrase of a category name, {} where the name goes (default: the name "
        "as is on synthetic:, 'a photo of a {}.' on coco: and lvis:)",
    )
    p.add_argument(
        "--points-per-side",
        type=common.positive_int,
        help="edges / proposals: point grid per side (default 16 / 64)",
    )
    p.add_argument(
        "--nms-thresh",
        type=float,
        help="edges / proposals: box NMS threshold (default 0.7 / 0.9)",
    )
    p.add_argument(
        "--max-proposals",
        type=common.positive_int,
        default=MAX_PROPOSALS,
        help="proposals: per image, ranked by mean(predicted IoU, stability) (default 1000)",
    )
    p.add_argument(
        "--edge-thresholds",
        type=common.positive_int,
        default=DEFAULT_THRESHOLDS,
        help="edges: number of thresholds of the BSDS evaluation (default 99)",
    )
    p.add_argument(
        "--edge-matcher",
        choices=MATCHERS,
        default="bsds",
        help="edges: the benchmark's pixel correspondence (default) or an exact maximum matching",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size", type=common.positive_int, default=32, help="masks per decoder call"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
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
    if args.nms_thresh is not None and not 0.0 < args.nms_thresh <= 1.0:
        p.error(f"--nms-thresh must be in (0, 1], got {args.nms_thresh}")
    for flag in ("clip", "text_template"):
        if getattr(args, flag) is not None and args.task != "text":
            p.error(f"--{flag.replace('_', '-')} is for --task text, not --task {args.task}")
    return args


# EvalSettings fields whose flag has another name or meaning (the rest are their flag as is)
_SETTINGS_FROM_FLAGS = {
    "num_points": lambda a: tuple(a.num_points),
    "gt_boxes": lambda a: not a.no_boxes,
    "refine": lambda a: not a.no_refine,
}


def settings_of(args: argparse.Namespace) -> EvalSettings:
    """The evaluation protocol the flags ask for (UsageError for a bad combination): every
    EvalSettings field from its flag of the same name, or by `_SETTINGS_FROM_FLAGS`."""
    kwargs = {}
    for field in dataclasses.fields(EvalSettings):
        convert = _SETTINGS_FROM_FLAGS.get(field.name)
        kwargs[field.name] = convert(args) if convert else getattr(args, field.name)
    return EvalSettings(**kwargs)


@common.leaves_no_empty_folders("output")
def run(args: argparse.Namespace) -> int:
    common.join_job(args)
    main_process = distributed.is_main_process()
    quiet_data_logs(args.verbose)
    settings = settings_of(args)
    specs = parse_specs(args.dataset, settings)  # all specs checked before any work
    inputs = {
        "--checkpoint": args.checkpoint,
        "--clip": args.clip if args.clip and paths.exists(args.clip) else None,
        "--baseline": args.baseline,
        "--detections": args.detections,
    }
    for i, spec in enumerate(specs):
        inputs.update(
            {f"--dataset #{i + 1}": spec.path, f"--dataset #{i + 1} images": spec.images_dir}
        )
    common.check_paths(inputs, args.output)
    if main_process:
        paths.check_writable(args.output)
    runs = {"after": args.checkpoint} if args.baseline else {"": args.checkpoint}
    if args.baseline:
        runs = {"before": args.baseline, **runs}
    predictors, results = {}, {}
    for label, checkpoint in runs.items():  # every model (and CLIP) loads before any evaluation
        predictors[label] = load_predictor(checkpoint, settings.dtype, settings.clip)
        if settings.task == "text":
            predictors[label].text_encoder  # noqa: B018 - loads and checks the CLIP (one line)
    for label, checkpoint in runs.items():
        results[label] = evaluate_checkpoint(
            predictors[label],
            specs,
            settings,
            progress=not args.no_progress,
            log=lambda line, label=label: print(f"{label} {line}".strip(), file=sys.stderr),
        )
        results[label]["checkpoint"] = paths.resolve(checkpoint)
    if main_process and args.baseline:
        examples = None
        if settings.task == "points":  # a few held-out images for the before / after picture
            examples = list(iterate_examples(specs[0], split=settings.split, max_images=4))
        written = write_comparison(results, args.output, predictors, examples)
        print(comparison_markdown(results), end="")
        print("wrote " + ", ".join(written.values()))
    elif main_process:
        written = write_reports(results[""], args.output)
        print(markdown_table(results[""]), end="")
        print("wrote " + ", ".join(written.values()))
    distributed.barrier("eval_reports")
    return common.EXIT_OK


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-eval command; returns the exit status (0 / 1 failed / 2 usage)."""
    return common.run_command(prog, lambda: run(parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
