"""`python -m sam_jax.amg`: the sam-jax-amg command."""

import sys

from sam_jax.cli.amg import main

sys.exit(main(prog="python -m sam_jax.amg"))
