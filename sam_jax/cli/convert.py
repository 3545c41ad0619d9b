"""sam-jax-convert: convert SAM checkpoints between the official PyTorch format, sam_jax
(orbax) and transformers (Hugging Face); also `python -m convert_weights`.

    sam-jax-convert --checkpoint sam_vit_b_01ec64.pth --output ckpt/sam_vit_b \\
        [--model-type vit_b] [--sha256 HEX] [--decoder-num-heads 8] [--force]
    sam-jax-convert --to-pytorch --checkpoint ckpt/sam_vit_b --output sam_vit_b.pth
    sam-jax-convert --checkpoint facebook/sam-vit-base --output ckpt/sam_vit_b
    sam-jax-convert --checkpoint ckpt/sam_vit_b --to-hf hf/sam_vit_b

--checkpoint takes an official .pth, a converted directory, a transformers SamModel directory,
a Hugging Face Hub id or a registry name (sam_vit_b, ...). Without --model-type the
architecture of a .pth is inferred from the tensor shapes, so fine-tuned and custom-size
checkpoints convert as well. On bad input the command exits 1 with a one-line error and leaves
no output behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sam_jax import checkpoints, paths
from sam_jax.checkpoints.onnx_weights import is_onnx_dir
from sam_jax.cli import common
from sam_jax.config import MODEL_TYPES

PROG = "sam-jax-convert"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = common.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n", 1)[1].strip(),
        epilog=common.EXIT_CODES_HELP,
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="input: a .pth file, a converted or transformers directory, a Hub id or a "
        "registry name",
    )
    parser.add_argument(
        "--output",
        help="output: a converted (orbax) directory, or with --to-pytorch a .pth file",
    )
    parser.add_argument(
        "--to-pytorch",
        action="store_true",
        help="convert a sam_jax checkpoint back to an official PyTorch state_dict",
    )
    parser.add_argument(
        "--to-hf",
        metavar="OUT_DIR",
        help="write a transformers SamModel directory (config.json, model.safetensors) instead",
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
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="convert params holding NaN or infinite values (refused by default, as at load)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    return parser


_PTH_ONLY = "--model-type, --decoder-num-heads and --sha256 apply to .pth input only"


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    pth_flags = any(a is not None for a in (args.model_type, args.decoder_num_heads, args.sha256))
    if args.to_pytorch and pth_flags:
        raise common.UsageError(_PTH_ONLY)
    if args.to_hf is not None and (args.to_pytorch or args.output is not None):
        raise common.UsageError("--to-hf OUT_DIR takes the place of --output and --to-pytorch")
    if args.to_hf is None and args.output is None:
        raise common.UsageError("the following arguments are required: --output (or --to-hf)")
    return args


def convert(args: argparse.Namespace) -> str:
    """Runs one conversion; returns a one-line summary. Raises on bad input."""
    src, out = args.checkpoint, args.to_hf or args.output
    local = paths.exists(src)
    pth = local and paths.isfile(src)
    # A folder that is neither a transformers nor an ONNX one holds (or should hold) a converted
    # checkpoint: it can only go out (usage is checked before anything is read).
    foreign = local and (checkpoints.is_hf_dir(src) or is_onnx_dir(src))
    if local and not pth and not foreign and not args.to_pytorch and args.to_hf is None:
        raise common.UsageError(
            f"{src} is a directory; converting to PyTorch needs --to-pytorch (or --to-hf)"
        )
    if not pth and any(
        a is not None for a in (args.model_type, args.decoder_num_heads, args.sha256)
    ):
        raise common.UsageError(_PTH_ONLY)
    common.check_paths({"--checkpoint": src} if local else {}, out, replaces=True)
    paths.check_new_output(out, overwrite=args.force)
    config, params = checkpoints.read_checkpoint(
        src,
        model_type=args.model_type,
        decoder_num_heads=args.decoder_num_heads,
        sha256=args.sha256,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.to_hf is not None:
        checkpoints.save_hf(out, config, params, overwrite=args.force)
        return f"wrote {out}: transformers SamModel, {config.to_json()}"
    if args.to_pytorch:
        state_dict = checkpoints.params_to_state_dict(params, config)
        checkpoints.save_pth(out, state_dict, overwrite=args.force)
        return f"wrote {out}: {len(state_dict)} tensors"
    checkpoints.save_converted(out, config, params, overwrite=args.force)
    return f"wrote {out}: {config.to_json()}"


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
