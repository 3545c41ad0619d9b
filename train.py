"""Train SAM: `python train.py --config configs/demo.py --workdir DIR [--config.FIELD=VALUE ...]`.

The `sam-jax-train` command (sam_jax/cli/train.py; `--help` lists the flags). Rerunning the same
command resumes from the latest checkpoint in WORKDIR; SIGTERM saves and exits 0.
"""

import sys

from sam_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
