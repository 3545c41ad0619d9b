"""sam-jax-convert: convert SAM checkpoints between the official PyTorch format and sam_jax
(orbax); also `python -m convert_weights`.

    sam-jax-convert --checkpoint sam_vit_b_01ec64.pth --output ckpt/sam_vit_b \\
        [--model-type vit_b] [--sha256 HEX] [--decoder-num-heads 8] [--force]
    sam-jax-convert --to-pytorch --checkpoint ckpt/sam_vit_b --output sam_vit_b.pth

Without --model-type the architecture is inferred from the tensor shapes, so fine-tuned and
custom-size checkpoints convert as well. On bad input the command exits 1 with a one-line error
and leaves no output behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sam_jax.cli import common

PROG = "sam-jax-convert"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from sam_jax.config import MODEL_TYPES

    parser = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 1)[1].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="input: an official .pth file, or with --to-pytorch a converted directory",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="output: a converted (orbax) directory, or with --to-pytorch a .pth file",
    )
    parser.add_argument(
        "--to-pytorch",
        action="store_true",
        help="convert a sam_jax checkpoint back to an official PyTorch state_dict",
    )
    parser.add_argument(
        "--model-type",
        choices=sorted(MODEL_TYPES),
        help="expected architecture (default: inferred from the tensor shapes)",
    )
    parser.add_argument(
        "--decoder-num-heads",
        type=common.positive_int,
        default=None,
        help="mask decoder attention heads (not stored in the weights; default 8, as official)",
    )
    parser.add_argument(
        "--sha256", help="expected SHA-256 of the input file (full digest or a prefix of >= 8)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.to_pytorch and any(
        a is not None for a in (args.model_type, args.decoder_num_heads, args.sha256)
    ):
        raise common.UsageError(
            "--model-type, --decoder-num-heads and --sha256 apply to .pth input only"
        )
    return args


def convert(args: argparse.Namespace) -> str:
    """Runs one conversion; returns a one-line summary. Raises on bad input."""
    from sam_jax import checkpoints, paths

    if not args.to_pytorch and paths.isdir(args.checkpoint):
        raise common.UsageError(
            f"{args.checkpoint} is a directory; converting to PyTorch needs --to-pytorch"
        )
    common.check_paths({"--checkpoint": args.checkpoint}, args.output, replaces=True)
    paths.check_new_output(args.output, overwrite=args.force)
    if args.to_pytorch:
        config, params = checkpoints.load_converted(args.checkpoint)
        state_dict = checkpoints.params_to_state_dict(params, config)
        checkpoints.save_pth(args.output, state_dict, overwrite=args.force)
        return f"wrote {args.output}: {len(state_dict)} tensors"
    config, params = checkpoints.load_pth(
        args.checkpoint, args.model_type, args.decoder_num_heads, args.sha256
    )
    checkpoints.save_converted(args.output, config, params, overwrite=args.force)
    return f"wrote {args.output}: {config.to_json()}"


def run(args: argparse.Namespace) -> int:
    print(convert(args))
    return common.EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-convert command; returns the exit status (0 ok, 1 conversion error, 2 usage
    error). Every failure of a conversion (torch, orbax, I/O) is one line."""
    return common.run_command(
        prog, lambda: run(parse_args(argv, prog)), failures=(Exception,), extras="convert"
    )


if __name__ == "__main__":
    sys.exit(main())
