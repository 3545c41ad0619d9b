"""sam-jax-amg: automatic mask generation on an image or a folder of images (the official
scripts/amg.py); also `python -m sam_jax.amg`.

    sam-jax-amg --checkpoint CKPT --input IMAGE_OR_DIR --output DIR [options]

CKPT is an official .pth or a converted sam_jax directory. For each image, writes a folder
DIR/<image name>/ of masks as PNGs (0/255) and a metadata.csv, or with --convert-to-rle one
DIR/<image name>.json of COCO RLE records. Unreadable images are reported and skipped; the exit
status is 1 when any image failed. Flags and outputs follow the official script;
--crop-overlap-ratio takes a float (the official script declares it as an int by mistake).
--tile-shape H,W and --halo H,W run the generator per tile of a large image (micro_sam's tiled
AMG) and merge masks across tile seams.

--text PHRASE keeps only the masks that show the phrase, best first (all instances of a phrase,
`sam_jax.amg.phrase.find_phrase`): each mask's D.5 crop is embedded by CLIP's image tower and
kept when its cosine similarity with the phrase's text embedding is within --margin of the best
mask's (default 0.05), or at least --min-similarity; --top-k caps the count. The CLIP is --clip
(a transformers CLIP folder or Hub id) or the one the checkpoint names; any SAM serves. The
files are those above, the masks in order of similarity; the RLE records also carry
"text_similarity".
"""

from __future__ import annotations

import argparse
import sys

from sam_jax import checkpoints, paths
from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.amg.phrase import DEFAULT_MARGIN, find_phrase, with_output_mode
from sam_jax.cli import common
from sam_jax.cli.predict import add_tiling_flags
from sam_jax.config import MODEL_TYPES
from sam_jax.images import list_images, load_image
from sam_jax.outputs import output_stems
from sam_jax.outputs import write_masks as write
from sam_jax.text import load_text_encoder

PROG = "sam-jax-amg"
AMG_FLAGS = {  # flag -> (type, help)
    "points_per_side": (int, "Sample a grid over the image with this many points to a side."),
    "points_per_batch": (int, "How many input points to decode in one batch."),
    "pred_iou_thresh": (float, "Exclude masks with a predicted score below this threshold."),
    "stability_score_thresh": (float, "Exclude masks with a stability score below this."),
    "stability_score_offset": (float, "Larger values perturb the mask more for stability."),
    "box_nms_thresh": (float, "The overlap threshold for excluding a duplicate mask."),
    "crop_n_layers": (int, "If >0, also run on crops of the image, at this many scales."),
    "crop_nms_thresh": (float, "The overlap threshold for duplicates across crops."),
    "crop_overlap_ratio": (float, "Larger numbers mean image crops overlap more."),
    "crop_n_points_downscale_factor": (int, "Points per side in crop layer n shrink by this**n."),
    "min_mask_region_area": (int, "Remove holes and islands smaller than this many pixels."),
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = common.ArgumentParser(
        prog=prog,
        description=(
            "Runs automatic mask generation on an input image or directory of images, and\n"
            "outputs masks as either PNGs or COCO-style RLEs.\n\n" + __doc__.split("\n\n")[2]
        ),
        epilog=common.EXIT_CODES_HELP,
    )
    parser.add_argument("--input", required=True, help="An image or a folder of images.")
    parser.add_argument(
        "--output",
        required=True,
        help="Output folder: a folder of PNGs per image, or one COCO RLE json per image.",
    )
    parser.add_argument(
        "--model-type",
        default=None,
        choices=sorted(MODEL_TYPES),
        help="vit_b, vit_l, vit_h or default (= vit_h). Optional: the architecture is read "
        "from the checkpoint; when given, a .pth must match it.",
    )
    parser.add_argument(
        "--checkpoint", required=True, help="An official SAM .pth or a converted directory."
    )
    parser.add_argument(
        "--device",
        default=None,
        help="JAX platform (cpu, gpu/cuda, tpu); default: JAX's.",
    )
    parser.add_argument(
        "--convert-to-rle",
        action="store_true",
        help="Save masks as COCO RLEs in one json per image instead of a folder of PNGs.",
    )
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    group = parser.add_argument_group("AMG Settings")
    for name, (kind, help_text) in AMG_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    add_tiling_flags(parser)
    text = parser.add_argument_group(
        "All instances of a phrase", "Keep the masks whose CLIP region embedding shows --text."
    )
    text.add_argument("--text", default=None, metavar="PHRASE", help="The phrase, e.g. 'a wheel'.")
    text.add_argument(
        "--clip",
        default=None,
        metavar="FOLDER_OR_HUB_ID",
        help="The CLIP folder or Hub id (default: the checkpoint's).",
    )
    keep = text.add_mutually_exclusive_group()
    keep.add_argument(
        "--margin",
        type=float,
        default=None,
        help=f"Keep masks within this similarity of the best one (default {DEFAULT_MARGIN}).",
    )
    keep.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        metavar="COSINE",
        help="Keep masks at least this similar.",
    )
    text.add_argument(
        "--top-k", type=common.positive_int, default=None, metavar="K", help="Keep at most K masks."
    )
    return parser


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    """The flags; the generator settings are checked here, before any model is loaded."""

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.text is None:
        given = [
            f for f in ("clip", "margin", "min_similarity", "top_k") if getattr(args, f) is not None
        ]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} is for --text: give a --text")
    elif not args.text.strip():
        parser.error("--text must be a non-empty phrase")
    if args.margin is not None and not args.margin >= 0:
        parser.error(f"--margin must be >= 0, got {args.margin}")
    if args.min_similarity is not None and not -1.0 <= args.min_similarity <= 1.0:
        parser.error(f"--min-similarity must be in [-1, 1] (a cosine), got {args.min_similarity}")
    args.amg_kwargs = {k: getattr(args, k) for k in AMG_FLAGS if getattr(args, k) is not None}
    args.amg_kwargs.update(tile_shape=args.tile_shape, halo=args.halo)
    args.output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    # find_phrase embeds bool masks; they are written in args.output_mode afterwards
    args.generator_mode = "binary_mask" if args.text is not None else args.output_mode
    try:  # the constructor checks every setting and does not touch the model
        SamAutomaticMaskGenerator(None, None, output_mode=args.output_mode, **args.amg_kwargs)
    except ValueError as e:
        raise common.UsageError(e) from None
    return args


@common.leaves_no_empty_folders("output")
def run(args: argparse.Namespace) -> int:
    common.check_paths({"--input": args.input, "--checkpoint": args.checkpoint}, args.output)
    targets = list_images(args.input)
    if not targets:
        raise FileNotFoundError(f"--input folder {args.input} holds no image files")
    with common.device_context(args.device):
        print("Loading model...", flush=True)
        model, params = checkpoints.load(args.checkpoint, model_type=args.model_type)
        generator = SamAutomaticMaskGenerator(
            model, params, output_mode=args.generator_mode, **args.amg_kwargs
        )
        generate = generator.generate if args.text is None else _phrase_finder(args, generator)
    failures = []
    items, log = common.progress(
        list(zip(targets, output_stems(targets), strict=True)),
        desc="images",
        unit="img",
        disable=args.no_progress,
    )
    with common.device_context(args.device):
        for path, name in items:
            image = load_image(path)
            if image is None:
                log(f"Could not load '{path}' as an image, skipping...")
                failures.append(path)
                continue
            try:
                masks = generate(image)
            except ValueError as e:
                log(f"Could not process '{path}': {common.one_line(e)}, skipping...")
                failures.append(path)
                continue
            paths.makedirs(args.output)  # at the first result: a run of failures writes nothing
            write(masks, args.output, name, args.output_mode)
    done = len(targets) - len(failures)
    summary = f"{done} of {len(targets)} images processed, {len(failures)} failed"
    if not done:
        raise RuntimeError(f"{summary} (the first: {failures[0]})")
    print(f"Done: {summary}.")
    return common.EXIT_FAILED if failures else common.EXIT_OK


def _phrase_finder(args: argparse.Namespace, generator: SamAutomaticMaskGenerator):
    """image -> the records of the masks that show args.text, in args.output_mode (the CLIP
    loaded here: --clip, else the one the checkpoint's config names; UsageError without)."""
    clip = args.clip or generator.model.config.text_encoder
    if not clip:
        raise common.UsageError(
            "--text needs a CLIP: give --clip FOLDER_OR_HUB_ID (this checkpoint names none)"
        )
    encoder = load_text_encoder(clip)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin

    def generate(image):
        records = find_phrase(
            generator, encoder, image, args.text, args.min_similarity, margin, args.top_k
        )
        return with_output_mode(records, args.output_mode)

    return generate


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-amg command; returns the exit status (0, 1 any image failed, 2 usage)."""
    return common.run_command(prog, lambda: run(parse_args(argv, prog)), extras="amg,convert,text")


if __name__ == "__main__":
    sys.exit(main())
