"""sam-jax-export: write SAM as ONNX (onnxruntime, Meta's browser demo) or StableHLO (jax.export).

    sam-jax-export --checkpoint ckpt/sam_vit_b --format onnx --output sam_decoder.onnx \\
        [--return-single-mask] [--use-stability-score] [--return-extra-metrics] \\
        [--gelu-approximate] [--opset 17]
    sam-jax-export --checkpoint sam_vit_b_01ec64.pth --format onnx --part encoder \\
        --output sam_encoder.onnx [--external-data]
    sam-jax-export --checkpoint ckpt/sam_vit_b --format stablehlo --output decoder.stablehlo \\
        [--part encoder] [--platforms cpu,cuda,tpu] [--external-data]

--part decoder (the default) is the prompt encoder + mask decoder of Meta's SamOnnxModel, with
its inputs, outputs and options; --part encoder is the image encoder. The checkpoint is an
official .pth or a converted directory. Weights too large for one file (vit_h's encoder), or
all with --external-data, go beside it: ONNX's <output>.data, or <output>.safetensors for
StableHLO, whose export then takes them as its first arguments. On bad input the command
exits 1 (2 for a usage error) with a one-line error and leaves no file behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sam_jax.cli import common

PROG = "sam-jax-export"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from sam_jax.export.signature import FORMATS, PARTS

    parser = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 1)[1].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a converted or transformers directory, an official .pth file, a registry name "
        "(sam_vit_b, ...) or a Hugging Face Hub id",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format")
    parser.add_argument("--output", required=True, help="the file to write")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="decoder",
        help="decoder: prompt encoder + mask decoder (default); encoder: the image encoder",
    )
    decoder = parser.add_argument_group("decoder options (SamOnnxModel's)")
    decoder.add_argument(
        "--return-single-mask",
        action="store_true",
        help="return only the best mask (the single-mask output when there are more than 2 "
        "points, padding point included, else the best-scored multimask output)",
    )
    decoder.add_argument(
        "--use-stability-score",
        action="store_true",
        help="replace the IoU predictions by the stability score of the low-res masks",
    )
    decoder.add_argument(
        "--return-extra-metrics",
        action="store_true",
        help="ONNX only: also return stability_scores and areas of the full-size masks",
    )
    onnx = parser.add_argument_group("ONNX options")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 (the default) to 21")
    onnx.add_argument(
        "--gelu-approximate",
        action="store_true",
        help="tanh GELU instead of erf, for runtimes without a fast Erf",
    )
    hlo = parser.add_argument_group("StableHLO options")
    hlo.add_argument(
        "--platforms",
        default=None,
        metavar="LIST",
        help="comma-separated platforms to lower for, of cpu, cuda, rocm, tpu "
        "(default: cpu,cuda,tpu)",
    )
    parser.add_argument(
        "--decoder-num-heads",
        type=common.positive_int,
        default=None,
        help="mask decoder attention heads of a .pth (not stored in the weights; default 8)",
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="weights in a file beside the output: <output>.data (ONNX external data) or "
        "<output>.safetensors (StableHLO: the export's first arguments); automatic above ~1.8 "
        "GB (ONNX) or ~1.5 GB (StableHLO), as vit_h's encoder",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    from sam_jax.export import onnx as onnx_export
    from sam_jax.export import signature, stablehlo

    args = build_parser(prog).parse_args(argv)
    try:
        signature.check_options(
            args.format,
            args.part,
            args.return_single_mask,
            args.use_stability_score,
            args.return_extra_metrics,
            args.gelu_approximate,
        )
        if args.format == "onnx":
            if args.platforms is not None:
                raise ValueError("--platforms applies to --format stablehlo")
            if args.opset is not None:
                onnx_export.check_opset(args.opset)
        else:
            if args.opset is not None:
                raise ValueError("--opset applies to --format onnx")
            args.platforms = stablehlo.check_platforms(args.platforms)
    except ValueError as e:
        raise common.UsageError(_flags(str(e))) from None
    return args


def _flags(message: str) -> str:
    """Library option names as the command's flags."""
    for name in (
        "return_single_mask",
        "use_stability_score",
        "return_extra_metrics",
        "gelu_approximate",
    ):
        message = message.replace(name, "--" + name.replace("_", "-"))
    return message


def run(args: argparse.Namespace) -> int:
    from sam_jax import checkpoints, export, paths

    common.check_paths({"--checkpoint": args.checkpoint})
    if paths.isdir(args.output):
        raise IsADirectoryError(f"--output {args.output} is a folder; give the path of a file")
    common.check_paths({"--checkpoint": args.checkpoint}, args.output, replaces=True)
    options = dict(
        return_single_mask=args.return_single_mask,
        use_stability_score=args.use_stability_score,
        return_extra_metrics=args.return_extra_metrics,
    )
    if args.format == "onnx":
        options.update(gelu_approximate=args.gelu_approximate, opset=args.opset)
    else:
        options.update(platforms=args.platforms)
    written = export.save_loaded(
        lambda: checkpoints.load(args.checkpoint, decoder_num_heads=args.decoder_num_heads),
        args.output,
        args.format,
        args.part,
        overwrite=args.force,
        external_data=True if args.external_data else None,
        **options,
    )
    sizes = ", ".join(f"{w} ({_size(w)})" for w in written)
    chosen = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is True]
    print(f"wrote {sizes}: {args.format} {args.part}{' ' if chosen else ''}{' '.join(chosen)}")
    return common.EXIT_OK


def _size(path: str) -> str:
    from sam_jax import paths

    if paths.is_remote(path):
        return "remote"
    n = os.path.getsize(path)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-export command; returns the exit status (0 ok, 1 the export failed, 2 usage
    error)."""
    return common.run_command(prog, lambda: run(parse_args(argv, prog)), extras="export")


if __name__ == "__main__":
    sys.exit(main())
