"""Test-suite settings: float32 matmuls at full precision and a persistent compilation cache."""

import os

import jax

# Parity tests compare float32 results: never let a backend fall back to reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")
# Reuse XLA executables across test processes and runs (compile time dominates tiny models).
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("SAM_JAX_TEST_CACHE", os.path.expanduser("~/.cache/sam_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
