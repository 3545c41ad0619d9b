"""sam-jax-annotate: the data engine's automatic stage over a dataset; also
`python -m sam_jax.annotate`.

    sam-jax-annotate auto --checkpoint CKPT --input DIR --output DIR [generator options]
    sam-jax-annotate serve --checkpoint CKPT --images DIR --output DIR [--prefill DIR]
                           [--detections FILE] [--host 127.0.0.1] [--port 8000]

`auto` writes one SA-1B JSON per image (DIR/<stem>.json, COCO RLE masks with predicted IoU,
stability score, point and crop box) and the image as DIR/<stem>.jpg, so DIR is an `sa1b:DIR`
training source. Defaults are the paper's fully automatic settings; the generator options are
spelled as in sam-jax-amg. Every local device is used; the processes of a multi-host job (TPU
pod, SLURM, explicit launch) take disjoint shares. Rerunning resumes: finished images are
skipped. Unreadable images are reported and skipped; the exit status is then 1.

`serve` starts a local web tool (open the printed address in a browser) for the
assisted-manual stage: click points or drag a box, see the mask after each click, accept, name,
undo and delete objects. Work is saved as it happens in DIR: annotations.json (COCO), one SA-1B
JSON per image (<stem>.json, as `auto` writes) and the tool's state; embeddings are cached in
DIR/.embeddings. --prefill (an `auto` output) or --detections (COCO results boxes) open each
image with proposals to accept or reject (the semi-automatic stage). It serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from sam_jax import checkpoints
from sam_jax.cli import common
from sam_jax.cli.amg import AMG_FLAGS

PROG = "sam-jax-annotate"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from sam_jax.annotate.auto import MAX_AREA_FRACTION, PAPER_SETTINGS
    from sam_jax.config import MODEL_TYPES

    parser = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 2)[2].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    auto = commands.add_parser(
        "auto",
        help="masks for every image of a folder or bucket, as SA-1B JSON",
        description="The fully automatic stage: SA-1B JSON for every image of --input.",
        epilog=common.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    auto.error = parser.error  # one-line usage errors from the sub-command too
    auto.add_argument("--checkpoint", required=True, help="Official .pth or converted dir.")
    auto.add_argument("--input", required=True, help="Folder (or gs:// URL) of images.")
    auto.add_argument("--output", required=True, help="Folder (or gs:// URL) for the JSONs.")
    auto.add_argument("--model-type", default=None, choices=sorted(MODEL_TYPES))
    auto.add_argument(
        "--max-area-fraction",
        type=float,
        default=MAX_AREA_FRACTION,
        help=f"drop masks covering this fraction of the image or more ({MAX_AREA_FRACTION})",
    )
    auto.add_argument(
        "--no-copy-images",
        dest="copy_images",
        action="store_false",
        help="write only the JSONs (the output is then not an sa1b: source by itself)",
    )
    auto.add_argument(
        "--workers-per-device",
        type=common.positive_int,
        default=2,
        help="images in flight per device (2: one on the host while one is on the device)",
    )
    auto.add_argument("--no-progress", action="store_true", help="No progress bar.")
    group = auto.add_argument_group("generator settings (defaults: the paper's)")
    for name, (kind, help_text) in AMG_FLAGS.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=PAPER_SETTINGS[name],
            help=f"{help_text} ({PAPER_SETTINGS[name]:.4g})",
        )
    common.add_distributed_flags(auto)
    add_serve_parser(commands, parser)
    return parser


def add_serve_parser(commands, parser: argparse.ArgumentParser) -> None:
    from sam_jax.config import MODEL_TYPES

    serve = commands.add_parser(
        "serve",
        help="a local web tool to annotate images by clicks (assisted-manual stage)",
        description=(
            "The assisted-manual and semi-automatic stages: a web tool on --host:--port where a\n"
            "person clicks points or drags boxes and accepts the masks; the work is saved as it\n"
            "happens in --output (annotations.json in COCO format, <stem>.json in SA-1B format)."
        ),
        epilog=common.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.error = parser.error
    serve.add_argument("--checkpoint", required=True, help="Official .pth or converted dir.")
    serve.add_argument("--images", required=True, help="Folder (or gs:// URL) of images.")
    serve.add_argument(
        "--output", required=True, help="Folder for the annotations (created if needed)."
    )
    serve.add_argument("--model-type", default=None, choices=sorted(MODEL_TYPES))
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)"
    )
    serve.add_argument(
        "--port", type=_port, default=8000, help="port to listen on (0: any free port; 8000)"
    )
    serve.add_argument(
        "--prefill", default=None, metavar="DIR", help="an `auto` output: its masks as proposals"
    )
    serve.add_argument(
        "--prefill-min-iou",
        type=float,
        default=0.0,
        help="propose only --prefill masks of predicted IoU >= this (0.0)",
    )
    serve.add_argument(
        "--detections",
        default=None,
        metavar="FILE",
        help="COCO results JSON of detector boxes: each box is decoded into a proposal",
    )
    serve.add_argument(
        "--score-threshold",
        type=float,
        default=0.5,
        help="propose only detections of score >= this (0.5)",
    )
    serve.add_argument(
        "--max-detections",
        type=common.positive_int,
        default=100,
        help="propose at most this many detections per image, best first (100)",
    )
    serve.add_argument(
        "--no-copy-images",
        dest="copy_images",
        action="store_false",
        help="do not write <stem>.jpg beside each SA-1B JSON",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    """The flags; the generator settings are checked here, before any model is loaded."""
    from sam_jax.amg.generator import SamAutomaticMaskGenerator

    args = build_parser(prog).parse_args(argv)
    if args.stage == "serve":
        if args.prefill is None and args.prefill_min_iou != 0.0:
            raise common.UsageError("--prefill-min-iou needs --prefill")
        return args
    args.settings = {k: getattr(args, k) for k in AMG_FLAGS}
    try:
        SamAutomaticMaskGenerator(None, None, **args.settings)
    except ValueError as e:
        raise common.UsageError(e) from None
    if not 0 < args.max_area_fraction <= 1:
        raise common.UsageError(
            f"--max-area-fraction must be in (0, 1], got {args.max_area_fraction}"
        )
    return args


@common.leaves_no_empty_folders("output")
def run_auto(args: argparse.Namespace) -> int:
    common.check_paths({"--input": args.input, "--checkpoint": args.checkpoint}, args.output)
    common.join_job(args)
    import jax

    from sam_jax import distributed
    from sam_jax.annotate.auto import annotate_dataset
    from sam_jax.images import list_images

    main_process = distributed.is_main_process()
    say = print if main_process else (lambda *a, **k: None)
    images = list_images(args.input)
    if not images:
        raise FileNotFoundError(f"--input {args.input} holds no image files")
    say("Loading model...", flush=True)
    model, params = checkpoints.load(args.checkpoint, model_type=args.model_type)
    masks = [0]
    share = len(images[jax.process_index() :: jax.process_count()])
    bar, log = common.progress(
        iter(()), "images", "img", total=share, disable=args.no_progress or not main_process
    )

    def on_image(path: str, count: int) -> None:
        masks[0] += count
        if hasattr(bar, "update"):
            elapsed = max(bar.format_dict.get("elapsed", 0.0), 1e-9)
            bar.set_postfix({"masks/s": f"{masks[0] / elapsed:.1f}"}, refresh=False)
            bar.update(1)

    result = annotate_dataset(
        model,
        params,
        args.input,
        args.output,
        settings=args.settings,
        max_area_fraction=args.max_area_fraction,
        copy_images=args.copy_images,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        workers_per_device=args.workers_per_device,
        on_image=on_image,
    )
    if hasattr(bar, "close"):
        bar.close()
    for path, why in result.failed:
        log(f"Could not annotate '{path}': {why}, skipping...")
    everyone = distributed.all_gather(
        (result.annotated, result.skipped, len(result.failed), result.masks, result.seconds)
    )
    annotated, skipped, failed, total_masks = (sum(r[i] for r in everyone) for i in range(4))
    seconds = max(r[4] for r in everyone)
    say(
        f"Done: {annotated} images annotated ({total_masks} masks, "
        f"{annotated / seconds:.2f} images/s, {total_masks / seconds:.1f} masks/s), "
        f"{skipped} already done, {failed} failed, over {len(everyone)} process(es).",
        flush=True,
    )
    return common.EXIT_FAILED if failed else common.EXIT_OK


@common.leaves_no_empty_folders("output")
def run_serve(args: argparse.Namespace) -> int:
    inputs = {
        "--images": args.images,
        "--checkpoint": args.checkpoint,
        "--prefill": args.prefill,
        "--detections": args.detections,
    }
    common.check_paths(inputs, args.output)
    from sam_jax import paths
    from sam_jax.annotate import prompts, serve, tool

    if args.prefill is not None and not paths.isdir(args.prefill):
        raise NotADirectoryError(f"--prefill {args.prefill} is not a folder")
    paths.check_writable(args.output)
    sock = serve.bind(args.host, args.port)  # before the model: a taken port fails at once
    try:
        detections, left_out = None, 0
        if args.detections is not None:
            detections, left_out = prompts.load_detections(
                args.detections,
                prompts.list_entries(args.images),
                args.score_threshold,
                args.max_detections,
            )
        print("Loading model...", flush=True)
        model, params = checkpoints.load(args.checkpoint, model_type=args.model_type)
        annotator = tool.Annotator(
            model,
            params,
            args.images,
            args.output,
            prefill_dir=args.prefill,
            prefill_min_iou=args.prefill_min_iou,
            detections=detections,
            detections_key=args.detections or "detections",
            copy_images=args.copy_images,
        )
        for warning in annotator.warnings:
            print(f"{PROG} serve: warning: {warning}", file=sys.stderr, flush=True)
        if detections is not None:
            kept = sum(len(v) for v in detections.values())
            print(f"{kept} detector boxes to propose ({left_out} left out).", flush=True)
        allowed = serve.allowed_hosts_for(args.host)
        if allowed is None:
            print(
                f"{PROG} serve: warning: listening on {args.host}: anyone who can reach it can "
                "see the images and change the annotations",
                file=sys.stderr,
                flush=True,
            )
        app = serve.create_app(annotator, allowed_hosts=allowed)
        print(
            f"Annotating {len(annotator.entries)} images of {args.images} into {args.output}: "
            f"open {serve.url_of(sock)} (Ctrl-C to stop)",
            flush=True,
        )
        try:
            serve.serve_forever(app, sock)
        finally:
            annotator.close()
    finally:
        sock.close()
    return common.EXIT_OK


def _run(argv, prog: str) -> int:
    args = parse_args(argv, prog)
    return run_serve(args) if args.stage == "serve" else run_auto(args)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-annotate command; returns the exit status (0, 1 any image failed, 2 usage)."""
    return common.run_command(prog, lambda: _run(argv, prog), extras="amg,convert,serve")


if __name__ == "__main__":
    sys.exit(main())
