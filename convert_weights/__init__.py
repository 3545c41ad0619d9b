"""Convert SAM checkpoints between the official PyTorch format, sam_jax (orbax) and
transformers (Hugging Face).

    python -m convert_weights --checkpoint sam_vit_b_01ec64.pth --output ckpt/sam_vit_b
    python -m convert_weights --to-pytorch --checkpoint ckpt/sam_vit_b --output sam_vit_b.pth
    python -m convert_weights --checkpoint facebook/sam-vit-base --output ckpt/sam_vit_b
    python -m convert_weights --checkpoint ckpt/sam_vit_b --to-hf hf/sam_vit_b

The `sam-jax-convert` command (sam_jax/cli/convert.py; `--help` lists the flags); the
conversion itself lives in sam_jax.checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

PROG = "python -m convert_weights"


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    from sam_jax.cli.convert import main as convert_main

    return convert_main(argv, prog=PROG)
