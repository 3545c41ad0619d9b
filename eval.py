"""Zero-shot evaluation of a SAM checkpoint (SAM paper 7.1 / 7.3 / D.1).

  python eval.py --checkpoint CKPT --dataset SPEC [--dataset SPEC ...] --output DIR

The `sam-jax-eval` command (sam_jax/cli/eval.py; `--help` lists the flags).
"""

import sys

from sam_jax.cli import eval as _cli


def main(argv=None) -> int:
    return _cli.main(argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
