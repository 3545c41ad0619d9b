"""Test-suite settings: float32 matmuls at full precision, a persistent compilation cache, no
metadata-server or Google access for credential discovery, and the GCS emulator fixtures."""

import os

# Before anything imports google-auth or tensorstore (google-auth reads these at import): any
# credential discovery fails at once on loopback instead of asking a metadata server.
for _k, _v in {
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
}.items():
    os.environ.setdefault(_k, _v)
# The suite runs on the CPU; with libtpu installed (the test extra: the TPU compile plans) JAX
# would also try to start a TPU backend and print libtpu's start-up warnings on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare float32 results: never let a backend fall back to reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")
# Reuse XLA executables across test processes and runs (compile time dominates tiny models).
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("SAM_JAX_TEST_CACHE", os.path.expanduser("~/.cache/sam_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py) for the whole session, bucket
    "test-bucket"; not activated: pass `gcs_server.child_env()` to subprocesses."""
    from tests.gcs_emulator import GcsEmulator  # the test extra installs the emulator: no skip

    with GcsEmulator(bucket="test-bucket") as emulator:
        yield emulator


@pytest.fixture
def gcs(gcs_server):
    """The session's GCS emulator, activated in this process for the test (gs:// paths in this
    process reach it); `gcs.url("x")` is "gs://test-bucket/x", `gcs.child_env()` a subprocess
    environment."""
    gcs_server.activate()
    try:
        yield gcs_server
    finally:
        gcs_server.deactivate()
