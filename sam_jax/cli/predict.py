"""sam-jax-predict: prompted segmentation of one image; also `python -m sam_jax.cli.predict`.

    sam-jax-predict --checkpoint CKPT --image IMAGE --output DIR \\
        [--point X,Y[,LABEL] ...] [--box X0,Y0,X1,Y1] [--text PHRASE [--clip CLIP]] \\
        [--no-multimask-output] [--tile-shape H,W --halo H,W]

Points are in pixels of the original image; LABEL is 1 (foreground, the default) or 0
(background). Writes DIR/mask_<i>.png (0/255) for every output mask, DIR/overlay.png (the image
with the best mask tinted and the prompts drawn) and DIR/scores.json (predicted IoU and area per
mask, the best mask and the prompts). Multimask output defaults to on for a single point without
a box, as the official notebooks recommend. With --tile-shape and --halo a large image is
encoded per tile (micro_sam's tiling) and the prompt decoded in the tile that holds it best.
--text gives a phrase as the prompt (alone or with points and a box) to a SAM trained with a
text path (docs/text_prompts.md); its CLIP is the one the checkpoint names, or --clip (a
transformers CLIP folder or Hub id). A checkpoint without a text path refuses it in one line.
"""

from __future__ import annotations

import argparse
import math
import sys

from sam_jax import checkpoints
from sam_jax.cli import common
from sam_jax.config import MODEL_TYPES
from sam_jax.images import load_image
from sam_jax.outputs import write_prediction
from sam_jax.predictor import segment
from sam_jax.tiling import check_tiling

PROG = "sam-jax-predict"


def _numbers(text: str, count: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = None
    if values is None or len(values) not in count or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' (LABEL 1 foreground, 0 background)."""
    values = _numbers(text, (2, 3), "point (expected X,Y or X,Y,LABEL)")
    label = 1 if len(values) == 2 else values[2]
    if label not in (0, 1):
        raise argparse.ArgumentTypeError(f"point label must be 0 or 1, got {text!r}")
    return values[0], values[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' with X0 <= X1 and Y0 <= Y1."""
    x0, y0, x1, y1 = _numbers(text, (4,), "box (expected X0,Y0,X1,Y1)")
    if x1 < x0 or y1 < y0:
        raise argparse.ArgumentTypeError(f"box {text!r} must have X0 <= X1 and Y0 <= Y1")
    return x0, y0, x1, y1


def parse_pair(text: str) -> tuple[int, int]:
    """'H,W': two integers (a tile shape or a halo; `sam_jax.tiling.check_tiling` checks them)."""
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}")
    return values[0], values[1]


def add_tiling_flags(parser: argparse.ArgumentParser) -> None:
    """--tile-shape H,W and --halo H,W (sam-jax-predict and sam-jax-amg)."""
    group = parser.add_argument_group(
        "tiling", "Large images: encode tiles of H x W pixels, each widened by a halo."
    )
    group.add_argument("--tile-shape", type=parse_pair, default=None, metavar="H,W")
    group.add_argument("--halo", type=parse_pair, default=None, metavar="H,W")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = common.ArgumentParser(
        prog=prog,
        description="Segments one image from point/box prompts.\n\n"
        + __doc__.split("\n\n", 2)[2].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    parser.add_argument("--checkpoint", required=True, help="Official .pth or converted dir.")
    parser.add_argument(
        "--model-type",
        default=None,
        choices=sorted(MODEL_TYPES),
        help="Optional check of a .pth's shapes.",
    )
    parser.add_argument("--image", required=True, help="The image to segment.")
    parser.add_argument("--output", required=True, help="Folder for masks, overlay and scores.")
    parser.add_argument(
        "--point", type=parse_point, action="append", default=[], help="X,Y[,LABEL]; repeatable."
    )
    parser.add_argument("--box", type=parse_box, default=None, help="X0,Y0,X1,Y1.")
    parser.add_argument("--text", default=None, help="A phrase (a SAM with a text path).")
    parser.add_argument(
        "--clip", default=None, help="The CLIP folder or Hub id of --text (default: the model's)."
    )
    parser.add_argument(
        "--multimask-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Three masks instead of one (default: on for a single point without a box).",
    )
    parser.add_argument("--device", default=None, help="JAX platform (cpu, gpu, tpu).")
    add_tiling_flags(parser)
    return parser


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not args.point and args.box is None and args.text is None:
        parser.error("give at least one --point, a --box or a --text")
    if args.clip is not None and args.text is None:
        parser.error("--clip is the CLIP of --text: give a --text")
    if args.text is not None and args.tile_shape is not None:
        parser.error("--text is not placed in a tile: leave out --tile-shape")

    check_tiling(args.tile_shape, args.halo)  # ConfigError, a usage error
    return args


@common.leaves_no_empty_folders("output")
def run(args: argparse.Namespace) -> int:
    common.check_paths({"--image": args.image, "--checkpoint": args.checkpoint}, args.output)
    image = load_image(args.image)
    if image is None:
        raise ValueError(f"could not load {args.image!r} as an image")
    with common.device_context(args.device):
        model, params = checkpoints.load(args.checkpoint, model_type=args.model_type)
        masks, scores, multimask = segment(
            model,
            params,
            image,
            args.point,
            args.box,
            args.multimask_output,
            args.tile_shape,
            args.halo,
            text=args.text,
            text_encoder=args.clip,
        )
    summary = write_prediction(
        args.output, args.image, image, masks, scores, args.point, args.box, multimask, args.text
    )
    for r in summary["masks"]:
        print(f"{r['file']}: predicted_iou={r['predicted_iou']:.4f} area={r['area']}")
    print(f"Done: 1 of 1 images processed, 0 failed. Best mask: mask_{summary['best']}.png")
    return common.EXIT_OK


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-predict command; returns the exit status (0, 1 failed, 2 usage)."""
    return common.run_command(prog, lambda: run(parse_args(argv, prog)), extras="convert")


if __name__ == "__main__":
    sys.exit(main(prog="python -m sam_jax.cli.predict"))
