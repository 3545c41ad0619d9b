"""Checkpoint manifests: proof that a checkpoint directory is whole.

Every checkpoint sam_jax writes (converted directories, the exported `model/` of training, the
steps of training checkpoints) gets a `manifest.json` at its root, written last (after orbax has
finished, and before the atomic rename locally / after orbax's `commit_success.txt` on an object
store). It lists:

- every file under the directory (relative path, size, CRC-32C of the whole file): a damaged,
  truncated or missing file is named before orbax reads anything. CRC-32C is what Google Cloud
  Storage keeps for every object, so on gs:// the checksums come from the object listing (no
  download, at save or at load); locally they are computed (google-crc32c, about 10 GB/s; zlib's
  CRC-32 where google-crc32c is not installed, recorded as "crc32");
- for converted checkpoints, every params array (path, shape, CRC-32C of its float32 bytes):
  what orbax restored is compared with what was saved, so an error can name the array.

A checkpoint without a manifest (written before manifests existed, or by a writer stopped
between its last file and the manifest) loads with a warning that it cannot be verified.

`quiet_orbax()` keeps orbax's own noise (absl log lines, asyncio "Task exception was never
retrieved", "Event loop is closed" tracebacks from reads still in flight when a restore fails)
away from the user: callers report one line of their own instead.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from sam_jax import paths
from sam_jax.errors import CheckpointError, one_line

logger = logging.getLogger("sam_jax.checkpoints")

MANIFEST_NAME = "manifest.json"
FORMAT = "sam_jax checkpoint manifest"
VERSION = 1
_CHUNK = 16 << 20  # bytes read at a time when checksumming a file
_MAX_LISTED = 3  # names listed in an error message before "and N more"

try:  # the CRC that GCS keeps for every object; gcsfs (the convert extra) brings it
    import google_crc32c as _crc32c_lib

    if getattr(_crc32c_lib, "implementation", "c") != "c":  # the pure-Python fallback: slow
        _crc32c_lib = None
except ImportError:  # pragma: no cover - installed with gcsfs
    _crc32c_lib = None

DEFAULT_ALGORITHM = "crc32c" if _crc32c_lib is not None else "crc32"


# ----------------------------------------------------------------------------------------------
# Checksums.


class _Crc:
    """An incremental checksum: "crc32c" (google-crc32c) or "crc32" (zlib)."""

    def __init__(self, algorithm: str):
        if algorithm == "crc32c" and _crc32c_lib is None:
            raise LookupError("crc32c needs the google-crc32c package")
        if algorithm not in ("crc32c", "crc32"):
            raise LookupError(f"unknown checksum {algorithm!r}")
        self.algorithm, self.value = algorithm, 0

    def update(self, data) -> None:
        if self.algorithm == "crc32c":
            self.value = _crc32c_lib.extend(self.value, data)
        else:
            self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value & 0xFFFFFFFF:08x}"


def array_checksum(x: Any, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Checksum of an array's float32 little-endian bytes (what `load_converted` returns)."""
    a = np.ascontiguousarray(x, dtype="<f4").reshape(-1).view(np.uint8).view()
    a.flags.writeable = False  # google-crc32c takes read-only buffers only
    crc = _Crc(algorithm)
    crc.update(a)
    return crc.hexdigest()


def array_entries(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: {"shape", "crc32c"}} of float32 arrays keyed by their "a/b/kernel" names."""
    return {
        name: {"shape": list(np.shape(x)), DEFAULT_ALGORITHM: array_checksum(x)}
        for name, x in flat.items()
    }


def differing_arrays(entries: Mapping[str, Mapping[str, Any]], flat: Mapping[str, Any]) -> list:
    """Names of the arrays of `flat` whose shape or checksum differs from the manifest's (an
    array missing on either side counts as differing)."""
    differ = sorted(set(entries) ^ set(flat))
    for name in sorted(set(entries) & set(flat)):
        entry, x = entries[name], flat[name]
        if list(np.shape(x)) != list(entry.get("shape", np.shape(x))):
            differ.append(name)
            continue
        algorithm = next((a for a in ("crc32c", "crc32") if a in entry), None)
        if algorithm is None or (algorithm == "crc32c" and _crc32c_lib is None):
            continue  # nothing this installation can compare
        if array_checksum(x, algorithm) != entry[algorithm]:
            differ.append(name)
    return differ


def nonfinite_arrays(flat: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of the arrays holding NaN or infinite values."""
    out = []
    for name, x in flat.items():
        a = np.asarray(x)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            out.append((name, int(a.size - np.count_nonzero(np.isfinite(a))), int(a.size)))
    return out


def listed(names: list[str], limit: int = _MAX_LISTED) -> str:
    """ "a, b, c and 4 more"."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# ----------------------------------------------------------------------------------------------
# Files.


def list_files(root: str) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size", and "crc32c" where the store keeps one}} of every file
    under `root`, the manifest and its temporary files excepted."""
    root = paths.resolve(root)
    out: dict[str, dict[str, Any]] = {}
    if paths.is_remote(root):
        fs = paths.filesystem(root)
        prefix = fs._strip_protocol(root).rstrip("/") + "/"
        for name, info in fs.find(root, detail=True).items():
            name = name.rstrip("/")
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            entry = {"size": int(info.get("size") or 0)}
            crc = _store_crc32c(info)
            if crc is not None:
                entry["crc32c"] = crc
            out[name[len(prefix) :]] = entry
    else:
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                out[rel] = {"size": os.path.getsize(full)}
    return {k: v for k, v in sorted(out.items()) if not k.startswith(MANIFEST_NAME)}


def _store_crc32c(info: Mapping[str, Any]) -> str | None:
    """The CRC-32C an object store reports for an object (GCS: base64 of 4 big-endian bytes)."""
    value = info.get("crc32c")
    if not value:
        return None
    try:
        raw = base64.b64decode(value)
    except (ValueError, TypeError):
        return None
    return raw.hex() if len(raw) == 4 else None


def _file_checksum(path: str, algorithm: str) -> str:
    crc = _Crc(algorithm)
    with paths.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc.update(chunk)
    return crc.hexdigest()


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _checksums(root: str, wanted: dict[str, str]) -> dict[str, str | BaseException]:
    """{rel: checksum} of the files `wanted` ({rel: algorithm}), read in parallel threads;
    a file that cannot be read gives its exception."""

    def one(rel_algorithm):
        rel, algorithm = rel_algorithm
        try:
            return _file_checksum(paths.join(root, *rel.split("/")), algorithm)
        except (OSError, LookupError) as e:
            return e

    if not wanted:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(_workers(), len(wanted))) as pool:
        return dict(zip(wanted, pool.map(one, wanted.items()), strict=True))


def file_entries(root: str) -> dict[str, dict[str, Any]]:
    """The manifest's entries of every file under `root`: size and CRC-32C (from the object
    listing on an object store that keeps one, else read and computed here)."""
    listing = list_files(root)
    todo = {rel: DEFAULT_ALGORITHM for rel, info in listing.items() if "crc32c" not in info}
    for rel, value in _checksums(root, todo).items():
        if isinstance(value, BaseException):
            raise value
        listing[rel][DEFAULT_ALGORITHM] = value
    return listing


def verify_files(
    root: str, manifest: Mapping[str, Any], shard: tuple[int, int] = (0, 1)
) -> list[str]:
    """What is wrong with the files of `root` against its manifest, one phrase per file naming
    it ("params/d/1f2e is missing"); empty when every file matches. `shard` (index, count):
    this caller checks only every count-th file, from the index-th (the processes of a job
    share the work); the listing is read whole."""
    root = paths.resolve(root)
    entries = dict(sorted(manifest.get("files", {}).items()))
    mine = list(entries)[shard[0] :: shard[1]]
    listing = list_files(root)
    problems: dict[str, str] = {}
    todo: dict[str, str] = {}
    for rel in mine:
        entry, found = entries[rel], listing.get(rel)
        if found is None:
            problems[rel] = f"{rel} is missing"
            continue
        size = int(entry.get("size", found["size"]))
        if found["size"] != size:
            short = " (truncated)" if found["size"] < size else ""
            problems[rel] = f"{rel} has {found['size']} bytes, expected {size}{short}"
            continue
        if "crc32c" in entry and "crc32c" in found:  # the store's own checksum: no download
            if found["crc32c"] != entry["crc32c"]:
                problems[rel] = f"{rel} does not match its checksum (its content changed)"
            continue
        algorithm = next((a for a in ("crc32c", "crc32") if a in entry), None)
        if algorithm == "crc32c" and _crc32c_lib is None:
            algorithm = None
        if algorithm is not None:
            todo[rel] = algorithm
    for rel, value in _checksums(root, todo).items():
        if isinstance(value, BaseException):
            problems[rel] = f"{rel} cannot be read ({type(value).__name__}: {one_line(value, 200)})"
        elif value != entries[rel][todo[rel]]:
            problems[rel] = f"{rel} does not match its checksum (its content changed)"
    return [problems[rel] for rel in mine if rel in problems]


# ----------------------------------------------------------------------------------------------
# The manifest file.


def write(
    root: str, kind: str, files: Mapping[str, Any], arrays: Mapping[str, Any] | None = None
) -> None:
    """Writes `root`/manifest.json (whole or not at all: see paths.write_text)."""
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": kind, "files": files}
    if arrays is not None:
        doc["arrays"] = arrays
    paths.write_text(paths.join(root, MANIFEST_NAME), json.dumps(doc, indent=1) + "\n")


def read(root: str) -> dict[str, Any] | None:
    """The manifest of `root`, or None when it has none; CheckpointError when it is unreadable."""
    path = paths.join(paths.resolve(root), MANIFEST_NAME)
    if not paths.isfile(path):
        return None
    try:
        doc = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: {one_line(e, 200)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "files" not in doc:
        raise CheckpointError(f"{path} is not a sam_jax checkpoint manifest")
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has manifest version {doc.get('version')}, newer than this sam_jax "
            f"reads ({VERSION}): upgrade sam_jax"
        )
    return doc


def remove(root: str) -> None:
    """Removes the manifest of `root` if there is one (before `root` is written again)."""
    path = paths.join(paths.resolve(root), MANIFEST_NAME)
    with contextlib.suppress(FileNotFoundError):
        if paths.exists(path):
            paths.remove(path)


def warn_unverified(what: str) -> None:
    logger.warning(
        "%s cannot be verified (written before manifests, or stopped before writing its "
        "%s): loading it unchecked",
        what,
        MANIFEST_NAME,
    )


# ----------------------------------------------------------------------------------------------
# orbax's noise.

_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore")


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Runs an orbax read with its logging silenced and, when it fails, the leftovers of its
    asyncio loop collected here (so that "Task exception was never retrieved" is not printed
    later); reads that complete after orbax closed its loop are dropped (see `_drop_loop_noise`)."""
    _install_unraisable_filter()
    with paths.quiet_loggers(*_NOISY_LOGGERS):
        try:
            yield
        except BaseException:
            gc.collect()
            raise


_previous_unraisablehook = None


def _is_loop_closed_noise(exc: BaseException | None, tb) -> bool:
    """A RuntimeError raised by asyncio's `_check_closed` (a tensorstore read that finished
    after orbax's event loop had closed: orbax gave up on the restore already)."""
    if not isinstance(exc, RuntimeError) or tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return code.co_name == "_check_closed" and "asyncio" in code.co_filename


def _drop_loop_noise(unraisable) -> None:
    if _is_loop_closed_noise(unraisable.exc_value, unraisable.exc_traceback):
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def _install_unraisable_filter() -> None:
    global _previous_unraisablehook
    if sys.unraisablehook is not _drop_loop_noise:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _drop_loop_noise


def first_error(problems: Iterable[str]) -> str:
    """ "x is missing (and 2 more files)"."""
    problems = list(problems)
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more file{'s' if more > 1 else ''})" if more else "")
