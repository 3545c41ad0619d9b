"""A Google Cloud Storage JSON API server on 127.0.0.1 for tests (the `gcp-storage-emulator`
package, in memory, in a subprocess), and the settings that point gcsfs, etils.epath, orbax and
tensorstore at it without credentials.

    with GcsEmulator(bucket="test-bucket") as emu:      # or the `gcs` fixture (conftest.py)
        emu.url("workdir")                              # -> "gs://test-bucket/workdir"
        subprocess.run([...], env=emu.child_env())      # a child process that uses gs://
        emu.activate()                                  # this process uses it too

The settings (`emulator_env`), each needed:
  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT   gcsfs and google-cloud-storage (orbax asks it
                                                whether a bucket has a hierarchical namespace)
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT  tensorstore, which writes orbax's arrays
  GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator        tensorstore sends this fixed bearer token and
                                                looks for no credentials (no metadata server)
  FSSPEC_GCS_TOKEN=anon                         gcsfs: anonymous, no credential discovery
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false       gcsfs: the plain GCSFileSystem (the default
                                                extended one asks a gRPC control plane for the
                                                bucket type before every open)
  EPATH_USE_TF=false                            etils.epath: gs:// through gcsfs (tf.io.gfile
                                                ignores the emulator and calls www.googleapis.com)
  FSSPEC_GCS_USE_LISTINGS_CACHE=false           gcsfs: no stale listings after tensorstore writes
  GCE_METADATA_HOST / GCE_METADATA_IP / GCE_METADATA_ROOT=127.0.0.1:9, NO_GCE_CHECK=true
                                                google-auth and tensorstore never reach a metadata
                                                server (port 9 on loopback refuses at once)
  CLOUDSDK_CONFIG=<empty folder>, GOOGLE_APPLICATION_CREDENTIALS unset (child_env)
                                                no user credentials are found either
  GOOGLE_CLOUD_PROJECT=emulator-project, NO_PROXY += 127.0.0.1,localhost
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# Loopback settings that keep google-auth and tensorstore away from any metadata server.
NO_METADATA_ENV = {
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
}
# Variables that would lead a client to real credentials or to another server.
CREDENTIAL_VARS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "FSSPEC_GCS_TOKEN",
    "FSSPEC_GS_TOKEN",
)


def emulator_env(endpoint: str, cloudsdk_config: str | None = None) -> dict[str, str]:
    """The environment variables that point every GCS client at `endpoint` (http://host:port)."""
    no_proxy = ",".join(x for x in [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"] if x)
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "GOOGLE_CLOUD_PROJECT": "emulator-project",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        **NO_METADATA_ENV,
    }
    if cloudsdk_config:
        env["CLOUDSDK_CONFIG"] = cloudsdk_config
    return env


def no_credentials_env(cloudsdk_config: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """A full environment for a child process with no GCS settings and no credentials at all
    (and no metadata server): real gs:// access must fail, fast and without network."""
    env = dict(os.environ if base is None else base)
    for k in CREDENTIAL_VARS:
        env.pop(k, None)
    env.update(NO_METADATA_ENV)
    env["CLOUDSDK_CONFIG"] = cloudsdk_config
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with opener.open(req, timeout=timeout) as r:
        return r.status, r.read()


class GcsEmulator:
    """An in-memory GCS emulator subprocess on 127.0.0.1 with one bucket.

    Attributes once started: port, endpoint ("http://127.0.0.1:PORT"), bucket, env (the
    settings, a dict; see the module docstring), log_path (the server's output).
    """

    def __init__(self, bucket: str = "test-bucket", port: int | None = None):
        self.bucket = bucket
        self.port = port
        self.endpoint = ""
        self.env: dict[str, str] = {}
        self.log_path = ""
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._saved_env: dict[str, str | None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> GcsEmulator:
        """Starts the server, waits until it answers and the bucket exists; returns self."""
        if self._proc is not None:
            return self
        self._tmp = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
        os.makedirs(os.path.join(self._tmp.name, "gcloud"))  # an empty CLOUDSDK_CONFIG
        self.log_path = os.path.join(self._tmp.name, "emulator.log")
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            try:
                self._launch(self.port or _free_port(), timeout)
                break
            except RuntimeError:
                self._kill()
                if self.port or attempt == 2:
                    self._tmp.cleanup()
                    self._tmp = None
                    raise
        self.env = emulator_env(self.endpoint, os.path.join(self._tmp.name, "gcloud"))
        return self

    def _launch(self, port: int, timeout: float) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        cmd = [sys.executable, os.path.abspath(__file__), "--port", str(port), self.bucket]
        child_env = {**os.environ, **NO_METADATA_ENV}
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env
        )
        log.close()
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if _http("GET", f"{endpoint}/storage/v1/b/{self.bucket}", timeout=2)[0] == 200:
                    self.port, self.endpoint = port, endpoint
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the GCS emulator did not answer in {timeout} s: {self.log_tail()}")

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Restores this process's environment (if activated), stops the server."""
        self.deactivate()
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
        return ""

    # -- use ------------------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        """gs://BUCKET/part/part..."""
        return "/".join([f"gs://{self.bucket}", *(p.strip("/") for p in parts)])

    def create_bucket(self, name: str) -> str:
        """Creates another bucket; returns gs://name."""
        _http("POST", f"{self.endpoint}/storage/v1/b?project=emulator-project", {"name": name})
        return f"gs://{name}"

    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for a subprocess (os.environ, or `base`, plus the emulator settings,
        without GOOGLE_APPLICATION_CREDENTIALS)."""
        env = dict(os.environ if base is None else base)
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        env.pop("FSSPEC_GS_TOKEN", None)
        env.update(self.env)
        return env

    def activate(self) -> None:
        """Points this process at the emulator: sets the environment and resets the client
        caches that read it (fsspec config and filesystem instances, etils's backend choice)."""
        if self._saved_env is None:
            keys = [*self.env, "GOOGLE_APPLICATION_CREDENTIALS"]
            self._saved_env = {k: os.environ.get(k) for k in keys}
        os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        os.environ.update(self.env)
        reset_clients({"token": "anon", "use_listings_cache": False})

    def deactivate(self) -> None:
        """Restores the environment `activate` changed and resets the client caches."""
        if self._saved_env is None:
            return
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = None
        reset_clients(None)


def reset_clients(gcs_config: dict | None) -> None:
    """Resets what gcsfs/fsspec/etils cached from the environment; `gcs_config`: the fsspec
    config of the gcs protocol to install (None: remove the emulator's)."""
    import fsspec
    import fsspec.config

    for proto in ("gcs", "gs"):
        conf = fsspec.config.conf.setdefault(proto, {})
        conf.pop("token", None)
        if gcs_config:
            conf.update(gcs_config)
    conf = fsspec.config.conf["gcs"]
    conf.setdefault("use_listings_cache", False)
    if "gcsfs" in sys.modules:
        import gcsfs.core

        gcsfs.core.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem.clear_instance_cache()
        if gcs_config:  # the plain GCSFileSystem, even if gcsfs was imported with the extended one
            for proto in ("gs", "gcs"):
                fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
    with contextlib.suppress(Exception):
        from etils.epath import backend, gpath

        gpath._is_tf_installed.cache_clear()
        backend.fsspec_backend._get_filesystem.cache_clear()


# ----------------------------------------------------------------------------------------------
# The server process: gcp-storage-emulator with what tensorstore's GCS driver relies on added.
#
# The emulator neither sends an object's generation with its data (x-goog-generation) nor
# honours generation preconditions (ifGenerationMatch / ifGenerationNotMatch). tensorstore
# needs both: it reads the generation of every object it reads ("Malformed StorageGeneration"
# without it) and commits an OCDBT manifest with a conditional write (compare and swap). The
# server handles one request at a time, so checking a precondition and then writing is atomic.


def _serve(port: int, bucket: str) -> None:
    import http.server

    from gcp_storage_emulator import server
    from gcp_storage_emulator.__main__ import get_server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def current(storage, bucket_name, object_id):
        try:
            return storage.get_file_obj(bucket_name, object_id)
        except NotFound:
            return None

    def int_query(request, name):
        values = request.query.get(name)
        return int(values[0]) if values else None

    def failed_precondition(request, obj, reading: bool):
        """The status to answer instead of running the request, or None."""
        match = int_query(request, "ifGenerationMatch")
        not_match = int_query(request, "ifGenerationNotMatch")
        generation = None if obj is None else int(obj["generation"])
        if match is not None:
            if match == 0 and generation is not None:
                return 412
            if match != 0 and generation != match:
                return 404 if reading and generation is None else 412
        if not_match is not None and generation is not None and generation == not_match:
            return 304 if reading else 412
        return None

    def set_generation_headers(response, obj):
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        response["x-goog-stored-content-length"] = str(obj.get("size", ""))

    def download(request, response, storage, *args, **kwargs):
        bucket_name, object_id = request.params["bucket_name"], request.params["object_id"]
        obj = current(storage, bucket_name, object_id)
        status = failed_precondition(request, obj, reading=True)
        if status is not None:
            response.status = http.HTTPStatus(status)
            return
        if obj is None:
            response.status = http.HTTPStatus.NOT_FOUND
            return
        data = storage.get_file(bucket_name, object_id)
        set_generation_headers(response, obj)
        header = request.get_header("range", None)
        if header and header.strip().startswith("bytes="):
            first, _, last = header.strip()[len("bytes=") :].partition("-")
            size = len(data)
            if first:  # bytes=a-b or bytes=a-
                start, end = int(first), min(size - 1, int(last)) if last else size - 1
            else:  # bytes=-n: the last n
                start, end = max(0, size - int(last)), size - 1
            if start >= size or start > end:
                response.status = http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                response["Content-Range"] = f"bytes */{size}"
                return
            data = data[start : end + 1]
            response["Content-Range"] = f"bytes {start}-{end}/{size}"
            response.status = http.HTTPStatus.PARTIAL_CONTENT
        else:
            response[objects._HASH_HEADER] = f"crc32c={obj['crc32c']},md5={obj['md5Hash']}"
        response.write_file(data, content_type=obj.get("contentType"))

    def conditional(handler, reading: bool, object_from_query: bool = False):
        def wrapped(request, response, storage, *args, **kwargs):
            bucket_name = request.params["bucket_name"]
            if object_from_query:
                names = request.query.get("name")
                object_id = names[0] if names else None
            else:
                object_id = request.params.get("object_id")
            if object_id is not None:
                obj = current(storage, bucket_name, object_id)
                status = failed_precondition(request, obj, reading)
                if status is not None:
                    response.status = http.HTTPStatus(status)
                    return None
            return handler(request, response, storage, *args, **kwargs)

        return wrapped

    replacements = {
        objects.download: download,
        objects.get: conditional(objects.get, reading=True),
        objects.delete: conditional(objects.delete, reading=False),
        objects.insert: conditional(objects.insert, reading=False, object_from_query=True),
    }
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in replacements:
                handlers[method] = replacements[handler]
    objects.insert = replacements[objects.insert]
    objects.download = download  # `get` calls it for ?alt=media
    if os.environ.get("GCS_EMULATOR_VERBOSE"):  # log each request before it is served
        handle = server.Router.handle

        def logged_handle(self, method):
            h = self._request_handler
            print(f"> {method} {h.path} range={h.headers.get('range')}", flush=True)
            return handle(self, method)

        server.Router.handle = logged_handle
    # One request at a time: a longer accept queue keeps concurrent clients from being refused.
    http.server.HTTPServer.request_queue_size = 256
    # gcsfs asks for an object and its listing at once and hangs up on the loser: not an error.
    report_error = http.server.HTTPServer.handle_error

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            report_error(self, request, client_address)

    http.server.HTTPServer.handle_error = handle_error
    get_server("127.0.0.1", port, True, bucket).run()


if __name__ == "__main__":
    import argparse
    import logging

    verbose = bool(os.environ.get("GCS_EMULATOR_VERBOSE"))  # log every request
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    parser = argparse.ArgumentParser(description="GCS emulator for the sam_jax tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("bucket")
    args = parser.parse_args()
    _serve(args.port, args.bucket)
