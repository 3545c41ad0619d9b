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

import sys
from collections.abc import Sequence

from sam_jax.cli import interrupts

PROG = "python -m convert_weights"
EXIT_INTERRUPTED = 130  # sam_jax.cli.common's: that module imports jax


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status (0 ok, 1 conversion error, 2 usage error, 130 interrupted).

    SIGTERM is Ctrl-C from the first line on: one that comes while jax, orbax and torch are
    imported (a third of a small conversion) ends in one line, as one during the work does."""
    restore = interrupts.sigterm_as_interrupt()
    try:
        from sam_jax.cli.convert import main as convert_main  # the heavy imports

        return convert_main(argv, prog=PROG)
    except KeyboardInterrupt:  # during the imports (the command handles its own)
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if restore is not None:
            restore()
