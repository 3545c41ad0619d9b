"""Cached member indices of SA-1B tars: scanned once, one small file per tar, shared by hosts.

A tar's index lists its jpg+json pairs (sorted by directory and stem): the stem and the offset and
size of both members. It is cached as `<index_dir>/<tar name>.index.npz` (the tar's path relative
to the dataset folder, "/" written "__"), an uncompressed npz (zip) of two arrays:

    meta   str (): JSON {"version": 1, "signature": `paths.file_signature` of the tar when it was
           scanned, "unpaired": jpg/json members without their pair, "n": number of pairs}
    pairs  structured (n,): stem bytes S<k>, jpg_offset, jpg_size, json_offset, json_size <i8

written atomically (~0.5 MB for an SA-1B tar of 11k images). A cache file whose version or
signature differs, or that cannot be read or checked (missing, truncated, corrupt), is rebuilt by
scanning the tar again. The index of a dataset is the concatenation of the tar indices in sorted
tar order (`DatasetIndex`: flat numpy arrays, ~47 bytes per image, ~0.5 GB for SA-1B's 11M).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sam_jax import paths
from sam_jax.data.records import logger
from sam_jax.errors import StaleIndexError

INDEX_VERSION = 1
INDEX_DIRNAME = ".sam_jax_index"
CACHE_SUFFIX = ".index.npz"
_INT_FIELDS = ("jpg_offset", "jpg_size", "json_offset", "json_size")
_MAX_THREADS = 16


@dataclasses.dataclass(frozen=True)
class TarIndex:
    """jpg+json pairs of one tar. stems: bytes (n,); offsets/sizes: int64 (n,) in bytes."""

    stems: np.ndarray
    jpg_offset: np.ndarray
    jpg_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray
    unpaired: int = 0

    def __len__(self) -> int:
        return len(self.stems)


def scan_tar(tar_path: str) -> TarIndex:
    """Reads a tar's member headers (not the data) and pairs its jpg/jpeg and json members."""
    entries: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
    with paths.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, ext = posixpath.splitext(posixpath.basename(member.name))
            ext = ext.lower().lstrip(".")
            if ext in ("jpg", "jpeg", "json"):
                key = (posixpath.dirname(member.name), stem)
                kind = "json" if ext == "json" else "jpg"
                entries.setdefault(key, {})[kind] = (member.offset_data, member.size)
    pairs = [(k[1], v) for k, v in sorted(entries.items()) if "jpg" in v and "json" in v]
    unpaired = len(entries) - len(pairs)
    if unpaired:
        logger.warning("%s: %d jpg/json files without their pair were ignored", tar_path, unpaired)
    cols = np.array([(*v["jpg"], *v["json"]) for _, v in pairs], np.int64).reshape(-1, 4)
    return TarIndex(
        np.array([s.encode("utf-8") for s, _ in pairs], dtype="S") if pairs else _no_stems(),
        *(np.ascontiguousarray(cols[:, j]) for j in range(4)),
        unpaired=unpaired,
    )


def _no_stems() -> np.ndarray:
    return np.zeros((0,), "S1")


def encode_tar_index(index: TarIndex, signature: str) -> bytes:
    """The cache file bytes of a tar index (see the module docstring)."""
    fields = [("stem", index.stems.dtype)] + [(k, "<i8") for k in _INT_FIELDS]
    pairs = np.empty(len(index), fields)
    pairs["stem"] = index.stems
    for k in _INT_FIELDS:
        pairs[k] = getattr(index, k)
    meta = {"version": INDEX_VERSION, "signature": signature, "unpaired": int(index.unpaired)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.str_(json.dumps({**meta, "n": len(index)})), pairs=pairs)
    return buf.getvalue()


def decode_tar_index(data: bytes, signature: str) -> TarIndex:
    """Parses and checks cache file bytes; ValueError if corrupt or of another version,
    StaleIndexError (a ValueError) if made from another version of the tar."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if sorted(z.files) != ["meta", "pairs"]:
                raise ValueError(f"arrays {z.files}")
            meta, pairs = json.loads(str(z["meta"])), z["pairs"]
        version, n = meta["version"], meta["n"]
    except Exception as e:  # noqa: BLE001 - zipfile/numpy/json raise many kinds on bad bytes
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    if version != INDEX_VERSION:
        raise ValueError(f"version {version} != {INDEX_VERSION}")
    if meta.get("signature") != signature:
        raise StaleIndexError(f"tar signature {signature} != {meta.get('signature')}")
    names = ("stem", *_INT_FIELDS)
    if (
        pairs.shape != (n,)
        or pairs.dtype.names != names
        or pairs.dtype["stem"].kind != "S"
        or any(pairs.dtype[k] != np.dtype("<i8") for k in _INT_FIELDS)
    ):
        raise ValueError(f"pairs array {pairs.dtype} {pairs.shape}, expected {names} ({n},)")
    if n and min(int(pairs[k].min()) for k in _INT_FIELDS) < 0:
        raise ValueError("negative offsets or sizes")
    cols = (pairs[k] for k in _INT_FIELDS)  # views of one buffer, freed together
    return TarIndex(pairs["stem"] if n else _no_stems(), *cols, unpaired=int(meta["unpaired"]))


def cache_file_name(tar_path: str, root: str) -> str:
    """`<tar path relative to root, "/" as "__">.index.npz` (root: the dataset folder)."""
    tar_path, root = paths.resolve(tar_path), paths.resolve(root)
    rel = tar_path[len(root) :].lstrip("/\\") if tar_path.startswith(root + "/") else ""
    rel = rel or paths.basename(tar_path)
    return rel.replace("\\", "/").replace("/", "__") + CACHE_SUFFIX


def default_index_dir(path: str) -> str:
    """`<folder>/.sam_jax_index` for a local writable dataset folder (a single tar: its folder),
    else `$SAM_JAX_CACHE/sa1b_index/<hash of path>` (SAM_JAX_CACHE defaults to ~/.cache/sam_jax)."""
    path = paths.resolve(path)
    folder = path if paths.isdir(path) else paths.parent(path)
    if not paths.is_remote(folder):
        local = paths.join(folder, INDEX_DIRNAME)
        if os.access(local if paths.isdir(local) else folder, os.W_OK | os.X_OK):
            return local
    root = os.environ.get("SAM_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sam_jax"
    )
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
    return paths.join(root, "sa1b_index", digest)


class _Cache:
    """Reads, checks, builds and writes the tar indices of one dataset; counts what it did."""

    def __init__(self, tars: list[str], root: str, index_dir: str):
        self.tars, self.index_dir = tars, index_dir
        self.files = [paths.join(index_dir, cache_file_name(t, root)) for t in tars]
        self.counts = {"reused": 0, "built": 0}
        self._lock = threading.Lock()
        self._dir_made = self._write_failed = False

    def get(self, k: int) -> TarIndex:
        """Tar k's index: the cache file if valid, else a new scan (written to the cache)."""
        tar, file = self.tars[k], self.files[k]
        signature = paths.file_signature(tar)
        try:
            index = decode_tar_index(paths.read_bytes(file), signature)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log = logger.info if isinstance(e, StaleIndexError) else logger.warning
            log("sa1b index %s of %s is not usable (%s): rebuilding it", file, tar, e)
        else:
            self._count("reused")
            return index
        index = scan_tar(tar)
        self._count("built")
        self._write(file, encode_tar_index(index, signature))
        return index

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _write(self, file: str, data: bytes) -> None:
        try:
            if not self._dir_made:
                paths.makedirs(self.index_dir)
                self._dir_made = True
            paths.write_bytes(file, data)
        except OSError as e:
            with self._lock:
                first, self._write_failed = not self._write_failed, True
            if first:
                logger.warning("sa1b: cannot write index files to %s (%s)", self.index_dir, e)


def _map(fn, ks: list[int]) -> list:
    if len(ks) <= 1:
        return [fn(k) for k in ks]
    with ThreadPoolExecutor(min(_MAX_THREADS, len(ks))) as pool:
        return list(pool.map(fn, ks))


def load_tar_indices(
    tars: list[str],
    root: str,
    index_dir: str,
    process_index: int = 0,
    process_count: int = 1,
    barrier=None,
) -> tuple[list[TarIndex], dict]:
    """The index of every tar, and {"reused": n, "built": n} counts of this process.

    Process p first makes sure the indices of tars[p::process_count] are cached (building the
    missing or stale ones), then calls `barrier()` (if given; every process must call it once), then
    reads all of them, building any still missing (e.g. an index_dir not shared between hosts).
    """
    cache = _Cache(tars, root, index_dir)
    out: list[TarIndex | None] = [None] * len(tars)
    mine = list(range(process_index, len(tars), process_count))

    def first(k: int) -> TarIndex | None:
        try:
            return cache.get(k)
        except Exception as e:  # noqa: BLE001 - retried (and raised) after the barrier
            logger.warning("sa1b: indexing %s failed (%s); retrying later", tars[k], e)
            return None

    for k, index in zip(mine, _map(first, mine), strict=True):
        out[k] = index
    if barrier is not None:
        barrier()
    rest = [k for k in range(len(tars)) if out[k] is None]
    built = cache.counts["built"]
    for k, index in zip(rest, _map(cache.get, rest), strict=True):
        out[k] = index
    if process_count > 1 and cache.counts["built"] > built:
        logger.warning(
            "sa1b: %d tar indices were missing after the barrier, so this process built them too: "
            "is %s shared by all processes? (pass a shared index_dir)",
            cache.counts["built"] - built,
            index_dir,
        )
    return out, cache.counts


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """Every tar member pair of a dataset, in order. tar_id: int32 (n,) into `tars`; stems: bytes
    (n,); jpg/json offsets and sizes: int64 (n,)."""

    tars: list[str]
    tar_id: np.ndarray
    stems: np.ndarray
    jpg_offset: np.ndarray
    jpg_size: np.ndarray
    json_offset: np.ndarray
    json_size: np.ndarray

    @classmethod
    def concat(cls, tars: list[str], indices: list[TarIndex]) -> DatasetIndex:
        """Concatenates tar indices in order; `indices` is emptied (each tar's arrays are released
        once copied)."""
        lengths = np.array([len(x) for x in indices], np.int64)
        n = int(lengths.sum())
        width = max((x.stems.dtype.itemsize for x in indices if len(x)), default=1)
        stems, cols = np.empty(n, f"S{width}"), {k: np.empty(n, np.int64) for k in _INT_FIELDS}
        indices.reverse()
        start = 0
        while indices:
            x = indices.pop()
            stems[start : start + len(x)] = x.stems
            for k in _INT_FIELDS:
                cols[k][start : start + len(x)] = getattr(x, k)
            start += len(x)
        tar_id = np.repeat(np.arange(len(tars), dtype=np.int32), lengths)
        return cls(list(tars), tar_id, stems, *(cols[k] for k in _INT_FIELDS))

    def __len__(self) -> int:
        return len(self.tar_id)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in ("tar_id", "stems", *_INT_FIELDS))
