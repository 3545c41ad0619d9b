"""`python -m sam_jax.annotate`: the sam-jax-annotate command."""

import sys

from sam_jax.cli.annotate import main

sys.exit(main(prog="python -m sam_jax.annotate"))
