"""The one path layer: every file sam_jax reads or writes goes through here.

Local paths use the standard library; paths with a URL scheme (gs://bucket/x, s3://, ...) go
through fsspec (gcsfs for gs://, which honours STORAGE_EMULATOR_HOST), and `epath` gives the
`etils.epath.Path` that orbax takes. Never call os.path.abspath or open() on a URL: use
`resolve` and `open` from this module.

Remote settings made here (each only where the user has not set it already):
- EPATH_USE_TF=false: etils.epath (and so orbax) reaches gs:// through gcsfs, not tf.io.gfile
  (which ignores STORAGE_EMULATOR_HOST and would talk to www.googleapis.com);
- gcsfs without its listings cache (fsspec config `gcs.use_listings_cache = False`): orbax's
  array writes go through tensorstore, past gcsfs, so a cached listing would miss their files.

Object stores have no folders (a "folder" exists once an object lies under it: `makedirs` is a
no-op there), no append (`open(url, "a")` raises; use `Appender`) and no rename (a whole object
appears when its upload completes, so direct writes are already all-or-nothing).

`check_writable(folder)` tests a destination before a long run and raises `PathError` with one
line (the path and the reason: no credentials, bucket missing, not a folder, permission, ...).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import posixpath
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sam_jax.errors import OutputOverlapsInputError, PathError, one_line

os.environ.setdefault("EPATH_USE_TF", "false")


def is_remote(path: str) -> bool:
    """True for paths with a URL scheme (gs://bucket/x)."""
    return "://" in os.fspath(path)


def resolve(path: str) -> str:
    """An absolute local path, or the URL unchanged (without a trailing slash)."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


_configured = False


def _configure() -> None:
    """Once per process: gcsfs for epath's gs:// and no gcsfs listings cache (see the top)."""
    global _configured
    if _configured:
        return
    _configured = True
    os.environ.setdefault("EPATH_USE_TF", "false")
    with contextlib.suppress(Exception):  # the setting is read once, then cached
        from etils.epath import gpath

        gpath._is_tf_installed.cache_clear()
    with contextlib.suppress(ImportError):
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()


def epath(path: str):
    """The etils.epath.Path of `path` (what orbax takes)."""
    _configure()
    from etils import epath as _epath  # lazy: only orbax and remote paths need it

    return _epath.Path(resolve(path))


def filesystem(path: str):
    """The fsspec filesystem of a URL (gcsfs for gs://)."""
    _configure()
    import fsspec

    return fsspec.core.url_to_fs(path)[0]


def join(path: str, *names: str) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path.rstrip("/"), *names)
    return os.path.join(path, *names)


def basename(path: str) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/"))


def parent(path: str) -> str:
    """The folder holding `path` (a bucket root is its own parent)."""
    path = resolve(path)
    if not is_remote(path):
        return os.path.dirname(path)
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest)}" if "/" in rest else path


def exists(path: str) -> bool:
    return filesystem(path).exists(resolve(path)) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return filesystem(path).isdir(resolve(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return filesystem(path).isfile(resolve(path)) if is_remote(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    """Creates a folder and its parents (a no-op on object stores, which have no folders)."""
    if is_remote(path):
        filesystem(path).makedirs(resolve(path), exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def _ls(path: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries of a remote folder; FileNotFoundError if there is none."""
    url = resolve(path)
    fs = filesystem(url)
    own = fs._strip_protocol(url).rstrip("/")
    out = {}
    for info in fs.ls(url, detail=True):
        name = info["name"].rstrip("/")
        if name == own or not name:  # a folder placeholder object lists as its own entry
            continue
        out[posixpath.basename(name)] = info.get("type") == "directory"
    if not out and not fs.isdir(url):
        raise FileNotFoundError(f"no such folder: {url}")
    return sorted(out.items())


def listdir(path: str) -> list[str]:
    """Sorted entry names (not paths) of a directory."""
    if is_remote(path):
        return [name for name, _ in _ls(path)]
    return sorted(os.listdir(path))


def walk(path: str):
    """Yields (dirpath, dirnames, filenames) top-down, sorted, like os.walk (one listing per
    folder; a missing top yields nothing)."""
    if not is_remote(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            yield dirpath, dirnames, sorted(filenames)
        return
    stack = [resolve(path)]
    while stack:
        top = stack.pop()
        try:
            entries = _ls(top)
        except FileNotFoundError:
            continue
        dirs = [name for name, is_dir in entries if is_dir]
        yield top, dirs, [name for name, is_dir in entries if not is_dir]
        stack.extend(join(top, d) for d in reversed(dirs))


class _RemoteWriteFile:
    """A remote file open for writing whose object appears only if the `with` block succeeds
    (on an exception the upload is discarded, so readers never see a partial object)."""

    def __init__(self, f, raw):
        self._f, self._raw = f, raw

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._f.close()
        else:
            self.discard()

    def discard(self) -> None:
        """Drops what was written: nothing is published."""
        with contextlib.suppress(Exception):
            self._raw.discard()
        with contextlib.suppress(Exception):
            self._raw.closed = True  # gcsfs leaves a not-yet-started upload open


def open(path: str, mode: str = "rb"):  # noqa: A001 - the path layer's open
    """A file object (local: builtins.open; remote: fsspec's, seekable when reading).

    Remote writes ("w", "wb", "x") publish the object when the file is closed, and nothing when
    the `with` block raises. Remote append ("a") raises ValueError: object stores cannot append.
    """
    if not is_remote(path):
        return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    url = resolve(path)
    if "a" in mode or "+" in mode:
        raise ValueError(f"cannot open {url} in mode {mode!r}: object stores do not append")
    binary_mode = mode.replace("t", "").replace("b", "") + "b"
    raw = filesystem(url).open(url, binary_mode)
    f = raw if "b" in mode else io.TextIOWrapper(raw, encoding="utf-8")
    return f if binary_mode == "rb" else _RemoteWriteFile(f, raw)


def read_bytes(path: str, offset: int = 0, size: int | None = None) -> bytes:
    """Reads `size` bytes at `offset` (the whole file by default)."""
    if is_remote(path):
        url = resolve(path)
        end = None if size is None else offset + size
        return filesystem(url).cat_file(url, start=offset or None, end=end)
    with builtins.open(path, "rb") as f:
        if offset:
            f.seek(offset)
        return f.read() if size is None else f.read(size)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file so that readers never see a partial one.

    Local: a temporary file beside it, then an atomic rename. Object stores (gs://) publish an
    object only when its upload completes, so a direct write is already all-or-nothing.
    """
    if is_remote(path):
        url = resolve(path)
        filesystem(url).pipe_file(url, bytes(data))
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with builtins.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    if is_remote(path):
        url = resolve(path)
        filesystem(url).rm_file(url)
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything under it (FileNotFoundError if there is nothing)."""
    if is_remote(path):
        url = resolve(path)
        filesystem(url).rm(url, recursive=True)
    else:
        shutil.rmtree(path)


def file_signature(path: str) -> str:
    """A string that changes when the file changes: its size and modification time (remote: its
    size and generation, or etag, or update time)."""
    if is_remote(path):
        info = filesystem(path).info(resolve(path))
        version = info.get("generation") or info.get("etag") or info.get("mtime") or ""
        return f"{info.get('size')}-{version}"
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


class Appender:
    """A file written by appending, flushed at every `write`, for logs read while they grow.

    Local: an append-mode file. Remote (object stores cannot append): the content is kept in
    memory and the whole object is rewritten at each flush, at most every `min_interval_s`
    seconds (and always at `close`). `initial`: None keeps what the file holds already; bytes
    replace it.
    """

    def __init__(self, path: str, initial: bytes | None = None, min_interval_s: float = 0.0):
        self.path = resolve(path)
        self.remote = is_remote(self.path)
        self._min_interval_s = min_interval_s
        self._last_flush = float("-inf")
        self._dirty = False
        if self.remote:
            if initial is None:
                initial = read_bytes(self.path) if exists(self.path) else b""
            self._buffer = bytearray(initial)
            self._dirty = True
            self.flush(force=True)
        else:
            if initial is not None:
                write_bytes(self.path, initial)
            self._file = builtins.open(self.path, "ab")

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if self.remote:
            self._buffer += data
            self._dirty = True
        else:
            self._file.write(data)
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.remote:
            self._file.flush()
            return
        now = time.monotonic()
        if self._dirty and (force or now - self._last_flush >= self._min_interval_s):
            write_bytes(self.path, bytes(self._buffer))
            self._dirty, self._last_flush = False, now

    def close(self) -> None:
        if self.remote:
            self.flush(force=True)
        else:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# atomic_output: a local file or folder that appears whole or not at all.


def check_new_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """FileExistsError (one line) when `path` exists and may not be replaced."""
    path = resolve(path)
    present = exists(path) if is_remote(path) else os.path.lexists(path)  # a dangling link too
    if present and not overwrite:
        raise FileExistsError(f"output {path} exists already (use --force to replace it)")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` when the block succeeds.

    On failure, the temporary path and any parent directories created here are removed. Local
    paths only (object stores have no rename: see save_pth and save_converted).
    """
    if is_remote(path):
        raise ValueError(f"atomic_output needs a local path, got {path}")
    check_new_output(path, overwrite)
    path = Path(path).absolute()
    created = []
    for parent in reversed(path.parents):
        if not parent.exists():
            created.append(parent)
    # The temporary folder is made, renamed and removed with interrupts held until the step is
    # done, so that Ctrl-C or SIGTERM at any moment leaves either the whole output or nothing.
    with deferred_interrupts():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        except OSError as e:
            _remove_created(created)
            raise OSError(f"cannot write to {path}: {_typed(e, 300)}") from None
    try:
        tmp = tmp_dir / path.name
        yield tmp
        with deferred_interrupts():
            if path.exists() or path.is_symlink():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
                os.rename(tmp, path)
                _remove(old)
            else:
                os.rename(tmp, path)
            _remove(tmp_dir)
    except BaseException:
        with deferred_interrupts():
            _remove(tmp_dir)
            _remove_created(created)
        raise


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds SIGINT and SIGTERM while the block runs (a step that must not stop half-way: a
    rename, a clean-up, a write that other threads carry out) and delivers them once it is
    over, to the handlers that were in place. On another thread than the main one (where
    handlers cannot be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def no_empty_leftovers(*roots: str | os.PathLike | None) -> Iterator[None]:
    """When the block fails, removes the folders it created at or under each local root that
    hold no file (a command that fails leaves no empty output folder behind, and never removes
    a file or a folder that was there before). None roots and remote roots are skipped."""
    local = [os.path.abspath(os.fspath(r)) for r in roots if r is not None and not is_remote(r)]
    for i, root in enumerate(local):  # watch from the highest folder that does not exist yet
        while not os.path.exists(os.path.dirname(root)) and os.path.dirname(root) != root:
            root = os.path.dirname(root)
        local[i] = root
    before = {root: _folders(root) for root in local}
    try:
        yield
    except BaseException:
        with deferred_interrupts():
            for root, existed in before.items():
                for folder in sorted(_folders(root) - existed, key=len, reverse=True):
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)  # only empty ones (deepest first)
        raise


def _folders(root: str) -> set[str]:
    """Every folder at or under `root` (the empty set when there is none)."""
    if not os.path.isdir(root):
        return set()
    found = {root}
    for parent, dirs, _ in os.walk(root):
        found.update(os.path.join(parent, d) for d in dirs)
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


# ----------------------------------------------------------------------------------------------
# check_output: a command's output never replaces, or sits inside, one of its inputs.


def _real(path: str) -> str:
    return resolve(path) if is_remote(path) else os.path.realpath(resolve(path))


def _inside(child: str, parent: str) -> bool:
    return child.startswith(parent.rstrip("/") + "/")


def check_output(
    output: str, inputs: dict[str, str], flag: str = "--output", replaces: bool = False
) -> None:
    """Raises OutputOverlapsInputError (one line naming both flags) when `output` is one of the
    `inputs` ({flag: path}), lies inside one (a folder), or, when the command `replaces` the
    output as a whole (a converted checkpoint with --force), contains one. Checked before any
    work, so nothing is read or written."""
    out = _real(output)
    for name, path in inputs.items():
        if not path:
            continue
        src = _real(path)
        if out == src:
            problem = "is"
        elif _inside(out, src):
            problem = "is inside"
        elif replaces and _inside(src, out):
            problem = "contains"
        else:
            continue
        raise OutputOverlapsInputError(
            f"{flag} {output} {problem} the input {name} {path}: writing it would change or "
            "destroy the input; choose another output path"
        )


# ----------------------------------------------------------------------------------------------
# check_writable: a clear one-line error before a long run, never a traceback from deep inside.


def _typed(exc: BaseException, limit: int) -> str:
    return one_line(f"{type(exc).__name__}: {exc}", limit)


def _gcs_uses_default_credentials() -> bool:
    """Whether gcsfs will look for Google credentials (not for an emulator or explicit token)."""
    if os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        return False
    with contextlib.suppress(ImportError):
        import fsspec.config

        if any(fsspec.config.conf.get(p, {}).get("token") for p in ("gs", "gcs")):
            return False
    return True


def _gcs_credentials_problem() -> str | None:
    """None if usable Google credentials are found, else why not (one line)."""
    try:
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import Request
    except ImportError:
        return "gs:// needs gcsfs (pip install gcsfs)"
    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_write"]
        )
    except google.auth.exceptions.DefaultCredentialsError as e:
        detail = " ".join(str(e).split())
        detail = "" if "credentials were not found" in detail else f": {detail[:200]}"
        return (
            "no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS or run "
            f"`gcloud auth application-default login`){detail}"
        )

    class QuickRequest(Request):  # seconds, not google-auth's two minutes
        def __call__(self, *args, **kwargs):
            kwargs["timeout"] = min(kwargs.get("timeout") or 10, 10)
            return super().__call__(*args, **kwargs)

    try:  # one refresh here: gcsfs would retry a rejected token for half a minute
        credentials.refresh(QuickRequest())
    except Exception as e:  # noqa: BLE001 - refresh failures come in many types
        return f"the Google Cloud credentials do not work: {_typed(e, 200)}"
    return None


def _gcs_endpoint_problem() -> str | None:
    """None if the GCS endpoint (the emulator's, or Google's) accepts a TCP connection within
    a few seconds, else why not: gcsfs would retry an unreachable host for a minute."""
    import socket
    import urllib.parse

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if endpoint in ("", "default"):
        endpoint = "https://storage.googleapis.com"
    elif "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as e:
        return f"cannot reach {endpoint} ({_typed(e, 200)})"
    return None


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Silences these loggers while the block runs (gcsfs logs a traceback for each request it
    gives up on; orbax logs every failed read)."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _remote_reason(url: str, exc: BaseException) -> str:
    text = str(exc)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if isinstance(exc, FileNotFoundError):
        return f"bucket {bucket!r} does not exist"
    if isinstance(exc, PermissionError) or "Forbidden" in text or "403" in text:
        return f"permission denied ({_typed(exc, 200)})"
    if "401" in text or "Invalid Credentials" in text or "Unauthorized" in text:
        return f"the credentials were rejected ({_typed(exc, 200)})"
    return _typed(exc, 300)


def check_writable(path: str) -> None:
    """Makes sure `path` is a folder this process can write to, creating it if needed: writes
    and deletes a probe file. Raises PathError (one line: the path and the reason) otherwise."""
    path = resolve(path)
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:12]}")
    if not is_remote(path):
        if os.path.exists(path) and not os.path.isdir(path):
            raise PathError(f"cannot write to {path}: it is a file, not a folder")
        try:
            os.makedirs(path, exist_ok=True)
            write_bytes(probe, b"")
            os.remove(probe)
        except PermissionError:
            raise PathError(f"cannot write to {path}: permission denied") from None
        except OSError as e:
            raise PathError(f"cannot write to {path}: {_typed(e, 300)}") from None
        return
    with quiet_loggers("gcsfs", "google.auth", "google_auth_httplib2", "fsspec"):
        _check_remote_writable(path, probe)


def _check_remote_writable(path: str, probe: str) -> None:
    if path.startswith("gs://"):
        problem = _gcs_credentials_problem() if _gcs_uses_default_credentials() else None
        problem = problem or _gcs_endpoint_problem()
        if problem:
            raise PathError(f"cannot write to {path}: {problem}")
    try:
        fs = filesystem(path)
        if fs.isfile(path):
            raise PathError(f"cannot write to {path}: it is a file, not a folder")
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except PathError:
        raise
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types
        raise PathError(f"cannot write to {path}: {_remote_reason(path, e)}") from None
