"""File access for local paths and any path `tf.io.gfile` can read (gs://, s3://, ...).

Local paths use the standard library; paths with a URL scheme import tensorflow lazily.
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    """True for paths with a URL scheme (gs://bucket/x), which go through tf.io.gfile."""
    return "://" in path


def _gfile():
    import tensorflow as tf  # lazy: only remote paths need it

    return tf.io.gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Sorted entry names (not paths) of a directory."""
    names = _gfile().listdir(path) if is_remote(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name if is_remote(path) else os.path.join(path, name)


def open_binary(path: str):
    """A readable, seekable binary file object."""
    return _gfile().GFile(path, "rb") if is_remote(path) else open(path, "rb")  # noqa: SIM115


def read_bytes(path: str, offset: int = 0, size: int | None = None) -> bytes:
    """Reads `size` bytes at `offset` (the whole file by default)."""
    with open_binary(path) as f:
        if offset:
            f.seek(offset)
        return f.read() if size is None else f.read(size)


def walk(path: str):
    """Yields (dirpath, dirnames, filenames) top-down, sorted, like os.walk."""
    walker = _gfile().walk(path) if is_remote(path) else os.walk(path)
    for dirpath, dirnames, filenames in walker:
        dirnames.sort()
        yield dirpath, dirnames, sorted(filenames)
