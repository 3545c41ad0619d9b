"""The data engine's assisted-manual and semi-automatic stages: a local web annotation tool
(`sam-jax-annotate serve`).

A person picks an image, left-clicks positive points, right-clicks negative points or drags a
box, and sees the mask after each click. The image encoder runs once per image (the embedding is
cached on disk, OUTPUT/.embeddings/<stem>.npy, keyed by the image file and the encoder weights);
a click runs only the prompt encoder and the mask decoder on it. Accepted objects are named,
renamed and deleted; the work is saved as it happens, each file written whole (temporary name,
then rename):

- OUTPUT/.state/<stem>.json  the tool's record of an image: its objects with their prompts, the
                             prefilled proposals and the decisions on them (the other files are
                             derived from these, and rebuilt from them at every start);
- OUTPUT/<stem>.json         SA-1B JSON of the accepted objects, the record format of the automatic
                             stage (`sam_jax.annotate.auto`), with the image beside it as
                             <stem>.jpg (unless copy_images is off): OUTPUT is an `sa1b:` source;
- OUTPUT/annotations.json    COCO instances of every edited image: images, annotations (COCO RLE)
                             and categories (an object's name is its category).

The mask of a prompt (`Annotator.segment`, the one rule of the tool): `SamPredictor.predict` on
the image with the points and box in original-image pixels and no mask input; a single point
without a box asks for three masks (`multimask_output=True`) and the one of highest predicted
IoU is kept, any other prompt asks for one mask (`sam_jax.predictor.default_multimask`).

Semi-automatic stage: an image can open with proposals, shown for the person to accept or
reject: the masks an automatic run wrote (`prefill_dir`: its SA-1B JSON per image) or masks
decoded from detector boxes (`load_detections`: a COCO results JSON; each box is a box prompt).
Pending and rejected proposals never reach the exported files; decisions are kept, so a rejected
proposal does not come back.

Requests are checked before anything is read: image names are looked up in the listed images (a
name is never joined to a path), bodies are at most MAX_BODY_BYTES of JSON, prompts at most
MAX_POINTS points and one box inside the image; bad requests get a 4xx answer with a JSON
{"error": ...}. When served on a loopback address only loopback Host headers are answered, and
requests that change anything must be JSON from the tool's own origin (no cross-site writes).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from sam_jax.annotate.prompts import (
    LOOPBACK_HOSTS,
    MAX_BODY_BYTES,
    MAX_DRAIN_BYTES,
    STATIC_DIR,
    RequestError,
    parse_json,
)
from sam_jax.annotate.tool import Annotator
from sam_jax.errors import one_line

# ---------------------------------------------------------------------------------- web layer


def _static_files() -> dict[str, tuple[bytes, str]]:
    kinds = {
        "index.html": "text/html; charset=utf-8",
        "app.js": "text/javascript; charset=utf-8",
        "style.css": "text/css; charset=utf-8",
    }
    out = {}
    for name, kind in kinds.items():
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            out[name] = (f.read(), kind)
    return out


_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
    ),
)


class _Guard:
    """ASGI middleware: answers only the allowed Host names (DNS rebinding), refuses writes from
    other origins (cross-site requests), and adds the security headers."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    @staticmethod
    def _hostname(host: str) -> str:
        host = host.strip().lower()
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def _problem(self, scope) -> tuple[int, str] | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and self._hostname(host) not in self.allowed_hosts:
            return 400, "this server answers only its loopback address (bad Host header)"
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin is not None:
            import urllib.parse

            if urllib.parse.urlsplit(origin).netloc.lower() != host.strip().lower():
                return 403, "cross-origin requests are refused"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        declared = Headers(scope=scope).get("content-length")
        body = {"done": False, "seen": 0}

        async def tracked_receive():
            message = await receive()
            if message["type"] == "http.request":
                body["seen"] += len(message.get("body", b""))
                body["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                body["done"] = True
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                # An answer before the whole body was read (an early 4xx): read the rest first,
                # up to a bound, so that closing the connection does not reset it (which would
                # lose the answer on the way to the client).
                drainable = declared is None or (
                    declared.isdigit() and int(declared) <= MAX_BODY_BYTES + MAX_DRAIN_BYTES
                )
                while drainable and not body["done"]:
                    if body["seen"] > MAX_BODY_BYTES + MAX_DRAIN_BYTES:
                        break
                    await tracked_receive()
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        problem = self._problem(scope)
        if problem is not None:
            from starlette.responses import JSONResponse

            response = JSONResponse({"error": problem[1]}, status_code=problem[0])
            return await response(scope, tracked_receive, guarded_send)
        return await self.app(scope, tracked_receive, guarded_send)


async def read_json_body(request) -> dict:
    """The JSON object of a request: application/json, at most MAX_BODY_BYTES (RequestError
    415, 413, 400, 422)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, "send the body as application/json")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, "bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    value = parse_json(bytes(body))
    if not isinstance(value, dict):
        raise RequestError(422, "the body must be a JSON object")
    return value


def create_app(annotator: Annotator, allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS):
    """The Starlette app of the tool (None for allowed_hosts answers any Host header)."""
    import logging

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    static = _static_files()
    log = logging.getLogger("sam_jax.annotate.serve")

    def asset(name: str):
        async def endpoint(request):
            data, kind = static[name]
            return Response(data, media_type=kind, headers={"cache-control": "no-cache"})

        return endpoint

    def api(handler):
        async def endpoint(request):
            result = await handler(request)
            status = 200
            if isinstance(result, tuple):
                result, status = result
            return JSONResponse(result, status_code=status, headers={"cache-control": "no-store"})

        return endpoint

    async def images(request):
        return await run_in_threadpool(annotator.list_payload)

    async def open_image(request):
        return await run_in_threadpool(annotator.open_image, request.path_params["name"])

    async def image_png(request):
        data, signature = await run_in_threadpool(annotator.image_png, request.path_params["name"])
        etag = '"' + hashlib.sha1(signature.encode()).hexdigest()[:16] + '"'
        headers = {"etag": etag, "cache-control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/png", headers=headers)

    async def predict(request):
        t0 = time.perf_counter()
        body = await read_json_body(request)
        result = await run_in_threadpool(annotator.predict, body.get("image"), body)
        total = (time.perf_counter() - t0) * 1e3
        server_timing = f"decode;dur={result['server_ms']:.2f}, total;dur={total:.2f}"
        return JSONResponse(
            {**result, "total_ms": round(total, 3)},
            headers={"server-timing": server_timing, "cache-control": "no-store"},
        )

    async def add_object(request):
        body = await read_json_body(request)
        return await run_in_threadpool(annotator.accept, request.path_params["name"], body), 201

    async def one_object(request):
        name, oid = request.path_params["name"], request.path_params["oid"]
        if request.method == "DELETE":
            return await run_in_threadpool(annotator.delete, name, oid)
        body = await read_json_body(request)
        return await run_in_threadpool(annotator.rename, name, oid, body)

    async def proposal(request):
        action = request.path_params["action"]
        if action not in ("accept", "reject"):
            raise RequestError(404, "proposals are accepted or rejected")
        empty = request.headers.get("content-length", "0") == "0"
        body = {} if empty and "transfer-encoding" not in request.headers else None
        body = await read_json_body(request) if body is None else body
        name, pid = request.path_params["name"], request.path_params["pid"]
        return await run_in_threadpool(annotator.decide, name, pid, action == "accept", body)

    async def request_error(request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        message = one_line(f"{type(exc).__name__}: {exc}", 300)
        return JSONResponse({"error": f"internal error: {message}"}, status_code=500)

    routes = [
        Route("/", asset("index.html")),
        Route("/static/app.js", asset("app.js")),
        Route("/static/style.css", asset("style.css")),
        Route("/api/images", api(images)),
        Route("/api/images/{name}", api(open_image)),
        Route("/api/images/{name}/image.png", image_png),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/images/{name}/objects", api(add_object), methods=["POST"]),
        Route("/api/images/{name}/objects/{oid:int}", api(one_object), methods=["PATCH", "DELETE"]),
        Route("/api/images/{name}/proposals/{pid}/{action}", api(proposal), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_Guard, allowed_hosts=allowed_hosts)],
        exception_handlers={
            RequestError: request_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError (one line) if the
    port is taken or the address is not this machine's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections wait in the backlog until the server accepts them
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def allowed_hosts_for(host: str) -> frozenset[str] | None:
    """Loopback binds answer loopback names only; any other bind answers any Host."""
    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS or host.startswith("127.") else None


def _uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=5,
        limit_concurrency=64,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def serve_forever(app, sock: socket.socket) -> None:
    """Serves `app` on the bound socket until Ctrl-C / SIGTERM (then re-raised by uvicorn)."""
    _uvicorn_server(app).run(sockets=[sock])


class BackgroundServer:
    """The tool served from a thread (tests, notebooks): `url`, then `stop()`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the annotation server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
