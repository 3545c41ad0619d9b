"""Tiled inference (sam_jax.tiling): predictor and automatic mask generator on large images.

A tiny model with random weights (image_size 128) stands in for SAM where its own results are
compared (one tile = untiled; a tiled prompt = the untiled predictor on its tile's crop). The
seam merge is tested with a perfect per-tile mask source: the connected components of the tile's
crop of a synthetic label image (what a perfect model restricted to the tile could see), fed to
`amg.tiles.generate_tiled`, the function the generator calls with its own per-tile generation.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from scipy import ndimage

from sam_jax import functional as F
from sam_jax import tiling
from sam_jax.amg import masks as au
from sam_jax.amg import tiles
from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.config import tiny_config
from sam_jax.errors import ConfigError, UsageError
from sam_jax.modeling import build_sam
from sam_jax.predictor import SamPredictor
from tests.torch_reference import build_official, state_dict_numpy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
TILE, HALO = (200, 200), (24, 24)  # on a 600 x 800 image: 3 x 4 tiles
AMG = dict(
    points_per_side=6,
    points_per_batch=64,
    pred_iou_thresh=0.0,
    stability_score_thresh=0.0,
    box_nms_thresh=0.9,
)


@pytest.fixture(scope="module")
def model_params():
    """Perturbed random weights (as tests/test_amg_generator.py): varied masks, several per tile."""
    config = tiny_config()
    official = build_official(config, seed=0, perturb=0.05)
    params = state_dict_to_params(state_dict_numpy(official), config)
    return build_sam(config), jax.tree_util.tree_map(jax.numpy.asarray, params)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 60, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(15, 60)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return (img + rng.integers(0, 25, img.shape)).astype(np.uint8)


@pytest.fixture(scope="module")
def large_image():
    return _image(600, 800)


# ----------------------------------------------------------------------------- (1) one tile


def test_image_within_one_tile_is_exactly_untiled(model_params):
    model, params = model_params
    image = _image(100, 120, seed=1)
    plain, tiled = (
        SamPredictor(model, params),
        SamPredictor(model, params, tile_shape=(256, 256), halo=(32, 32)),
    )
    plain.set_image(image)
    tiled.set_image(image)
    prompts = [
        dict(point_coords=np.array([[40.0, 50.0]]), point_labels=np.array([1])),
        dict(box=np.array([10.0, 20.0, 90.0, 80.0]), multimask_output=False),
        dict(
            point_coords=np.array([[40.0, 50.0], [5.0, 7.0]]),
            point_labels=np.array([1, 0]),
            return_logits=True,
        ),
    ]
    for kwargs in prompts:
        for a, b in zip(plain.predict(**kwargs), tiled.predict(**kwargs), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    batch = dict(boxes=np.array([[10.0, 20.0, 90.0, 80.0], [0.0, 0.0, 30.0, 30.0]]))
    for a, b in zip(plain.predict_batch(**batch), tiled.predict_batch(**batch), strict=True):
        assert np.array_equal(a, b)
    assert tiled.tile_ids.tolist() == [0, 0]

    for mode in ("binary_mask", "uncompressed_rle"):
        kw = dict(AMG, output_mode=mode)
        ours = SamAutomaticMaskGenerator(model, params, tile_shape=(256, 256), halo=(32, 32), **kw)
        theirs = SamAutomaticMaskGenerator(model, params, **kw).generate(image)
        ours = ours.generate(image)
        assert len(ours) == len(theirs) > 0
        for r, s in zip(ours, theirs, strict=True):
            assert r.keys() == s.keys()
            for k in r:
                if mode == "binary_mask" and k == "segmentation":
                    assert np.array_equal(r[k], s[k])
                else:
                    assert r[k] == s[k], k


# ----------------------------------------------------------------------------- (2) predictor


def _outer(t):
    """Outer (tile-with-halo) XYXY box of tile t of the 600 x 800 grid, written out by hand."""
    row, col = divmod(t, 4)
    x0, y0 = max(200 * col - 24, 0), max(200 * row - 24, 0)
    return x0, y0, min(200 * col + 224, 800), min(200 * row + 224, 600)


# (prompt, the tile chosen, by hand): margins to the sides of each tile-with-halo that are not
# image edges; a box over several tiles goes to the tile it overlaps most.
SEAM_PROMPTS = [
    # 3 px left of the seam x = 200: tile 4 (margin 27) beats tile 5 (21)
    (dict(point_coords=np.array([[197.0, 300.0]]), point_labels=np.array([1])), 4),
    # a box over the seam x = 200, too wide for tile 4 (ends at x = 224): tile 5, margin 14
    (dict(box=np.array([190.0, 250.0, 260.0, 330.0]), multimask_output=False), 5),
    # near the corner of tiles 4, 5, 8, 9, inside tile 5's inner box: margin 29 (tile 9: 4)
    (
        dict(
            point_coords=np.array([[205.0, 395.0], [230.0, 380.0]]),
            point_labels=np.array([1, 0]),
            return_logits=True,
        ),
        5,
    ),
    # larger than any tile: the one it overlaps most (249 x 249 pixels of tile 5)
    (dict(box=np.array([100.0, 100.0, 500.0, 500.0])), 5),
    # at the right image edge (no margin needed there) and near the seam y = 400: tile 7
    (dict(point_coords=np.array([[799.0, 398.0]]), point_labels=np.array([1])), 7),
]


def _shifted(kwargs, x0, y0):
    out = dict(kwargs)
    if "point_coords" in out:
        out["point_coords"] = out["point_coords"] - [x0, y0]
    if "box" in out:
        out["box"] = out["box"] - [x0, y0, x0, y0]
    return out


def _margin(kwargs, box):
    """Smallest distance from the prompt to a side of box that is not an image edge."""
    pts = [kwargs["point_coords"]] if "point_coords" in kwargs else []
    if "box" in kwargs:
        pts.append(kwargs["box"].reshape(2, 2))
    pts = np.concatenate(pts)
    x0, y0, x1, y1 = box
    sides = [
        pts[:, 0].min() - x0 if x0 > 0 else np.inf,
        pts[:, 1].min() - y0 if y0 > 0 else np.inf,
        x1 - pts[:, 0].max() if x1 < 800 else np.inf,
        y1 - pts[:, 1].max() if y1 < 600 else np.inf,
    ]
    return min(sides)


def test_tiled_prompt_is_the_untiled_prediction_on_its_tile(model_params, large_image):
    model, params = model_params
    tiled = SamPredictor(model, params, tile_shape=TILE, halo=HALO)
    tiled.set_image(large_image)
    assert tiled.tiles.grid.num_tiles == 12
    assert [tuple(b) for b in tiled.tiles.grid.outer] == [_outer(t) for t in range(12)]
    plain = SamPredictor(model, params)
    for kwargs, expected in SEAM_PROMPTS:
        masks, iou, low_res = tiled.predict(**kwargs)
        assert tiled.tile_ids.tolist() == [expected]
        margins = [_margin(kwargs, _outer(t)) for t in range(12)]
        if max(margins) >= 0:  # the chosen tile holds the prompt with the most margin
            assert margins[expected] == max(margins)
        x0, y0, x1, y1 = _outer(expected)
        plain.set_image(large_image[y0:y1, x0:x1])
        m, s, lr = plain.predict(**_shifted(kwargs, x0, y0))
        logits = kwargs.get("return_logits", False)
        assert masks.shape == (len(m), 600, 800) and masks.dtype == m.dtype
        assert np.array_equal(masks[:, y0:y1, x0:x1], m)
        outside = np.ones((600, 800), bool)
        outside[y0:y1, x0:x1] = False
        fill = -np.inf if logits else False
        assert np.all(masks[:, outside] == fill)
        assert np.array_equal(masks, tiling.paste(m, tiled.tiles.grid, expected, fill))
        assert np.array_equal(iou, s) and np.array_equal(low_res, lr)

    # a batch over two tiles: each row is the untiled batch prediction on its own tile
    pts = np.array([[[197.0, 300.0]], [[650.0, 90.0]]])
    masks, iou, low_res = tiled.predict_batch(pts, np.ones((2, 1), int), multimask_output=False)
    assert tiled.tile_ids.tolist() == [4, 3]
    for row, t in enumerate((4, 3)):
        x0, y0, x1, y1 = _outer(t)
        plain.set_image(large_image[y0:y1, x0:x1])
        m, s, lr = plain.predict_batch(
            pts[row : row + 1] - [x0, y0], np.ones((1, 1), int), None, multimask_output=False
        )
        assert np.array_equal(masks[row, :, y0:y1, x0:x1], m[0])
        assert not masks[row][:, :y0].any() and not masks[row][:, y1:].any()
        assert np.array_equal(iou[row], s[0]) and np.array_equal(low_res[row], lr[0])

    with pytest.raises(ValueError, match="point or a box"):
        tiled.predict()
    with pytest.raises(ValueError, match="tiled mode"):
        tiled.predict_torch(point_coords=pts, point_labels=np.ones((2, 1), int))
    assert tiled.get_image_embedding().shape == (12, 8, 8, 32)


# ----------------------------------------------------------------------------- (3) seam merge

SCENE_TILE, SCENE_HALO = (1000, 1000), (100, 100)  # 3000 x 4000: 3 x 4 tiles, seams every 1000
SCENE = [  # ("disc", cx, cy, r) or ("rect", x0, y0, x1, y1) (exclusive)
    ("disc", 1000, 500, 150),  # over the seam x = 1000, wider than the overlap window
    ("disc", 2000, 1000, 180),  # over a 4-tile corner
    ("disc", 500, 2000, 60),  # inside the window of the seam y = 2000: both tiles see it whole
    ("disc", 1050, 300, 30),  # in tile 0's halo only, inside tile 1's inner box
    ("rect", 1500, 2400, 3600, 2600),  # over three tiles, longer than a tile-with-halo
    ("rect", 200, 1200, 400, 1400),  # inside one tile
    ("disc", 3000, 2000, 40),  # inside the corner window of 4 tiles
    ("rect", 3900, 950, 4000, 1050),  # on the right image edge, over the seam y = 1000
]


@pytest.fixture(scope="module")
def scene():
    labels = np.zeros((3000, 4000), np.int32)
    for i, obj in enumerate(SCENE, start=1):
        if obj[0] == "rect":
            _, x0, y0, x1, y1 = obj
            labels[y0:y1, x0:x1] = i
        else:
            _, cx, cy, r = obj
            yy, xx = np.mgrid[cy - r : cy + r + 1, cx - r : cx + r + 1]
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            labels[cy - r : cy + r + 1, cx - r : cx + r + 1][inside] = i
    return labels


def components(tile_labels: np.ndarray) -> dict[str, np.ndarray]:
    """A perfect mask source restricted to a tile: one mask per 8-connected component of each
    label of the tile's crop, in the AMG data format of the tile frame."""
    masks = []
    for v in np.unique(tile_labels)[1:]:
        parts, n = ndimage.label(tile_labels == v, structure=np.ones((3, 3), int))
        masks += [parts == i for i in range(1, n + 1)]
    h, w = tile_labels.shape
    masks = np.array(masks, bool).reshape(-1, h, w)
    k = len(masks)
    points = np.array([np.argwhere(m)[0][::-1] for m in masks], np.float64).reshape(k, 2)
    return {
        "masks": masks,
        "boxes": np.asarray(au.batched_mask_to_box(masks), np.int64).reshape(k, 4),
        "iou_preds": np.ones(k, np.float32),
        "stability_score": np.ones(k, np.float32),
        "points": points,
        "crop_boxes": np.tile(np.array([0, 0, w, h], np.int64), (k, 1)),
    }


def _overlaps(masks, labels):
    """(K, n_objects + 1) pixel counts of every mask over every label (0 = background)."""
    return np.stack([np.bincount(labels[m], minlength=len(SCENE) + 1) for m in masks])


def test_seam_merge_gives_each_object_once_and_whole(scene):
    grid = tiling.TileGrid.build(scene.shape, SCENE_TILE, SCENE_HALO)
    assert grid.num_tiles == 12
    data = tiles.generate_tiled(scene, components, grid, nms_thresh=0.7)
    masks = data["masks"]
    assert masks.shape == (len(SCENE), 3000, 4000)
    gt_area = np.bincount(scene.ravel(), minlength=len(SCENE) + 1)
    over = _overlaps(masks, scene)
    assert np.all(over[:, 0] == 0)  # no background pixel
    owner = over[:, 1:].argmax(1) + 1
    assert sorted(owner.tolist()) == list(range(1, len(SCENE) + 1))  # each object exactly once
    for k, obj in enumerate(owner):
        union = masks[k].sum() + gt_area[obj] - over[k, obj]
        tiled_iou = over[k, obj] / union
        # the untiled source on a crop around the object (which holds all of it)
        ys, xs = np.nonzero(scene == obj)
        y0, x0 = max(ys.min() - 16, 0), max(xs.min() - 16, 0)
        crop = scene[y0 : ys.max() + 17, x0 : xs.max() + 17]
        crop_masks = components(crop)["masks"]
        crop_iou = max(np.sum(m & (crop == obj)) / np.sum(m | (crop == obj)) for m in crop_masks)
        assert tiled_iou >= crop_iou and tiled_iou == 1.0, (SCENE[obj - 1], tiled_iou)
        ys, xs = np.nonzero(masks[k])
        assert data["boxes"][k].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        x0, y0 = data["points"][k].astype(int)
        assert scene[y0, x0] == obj
    # ownership: the object wholly in tile 0's halo comes from tile 1, where it is inner
    k = int(np.flatnonzero(owner == 4)[0])
    assert data["crop_boxes"][k].tolist() == grid.outer[1].tolist()
    # the corner object joined the pieces of its 4 tiles
    k = int(np.flatnonzero(owner == 2)[0])
    corner = grid.outer[[1, 2, 5, 6]]
    assert data["crop_boxes"][k].tolist() == [*corner[:, :2].min(0), *corner[:, 2:].max(0)]

    # control: without the seam merge (a threshold no IoU passes) the objects over seams come
    # back in pieces, one per tile (the identical pieces of objects inside a window are removed
    # by the NMS; the pieces of objects 1, 2 and 5 overlap too little for it)
    unmerged = tiles.generate_tiled(scene, components, grid, nms_thresh=0.7, iou_thresh=1.1)
    owners = _overlaps(unmerged["masks"], scene)[:, 1:].argmax(1) + 1
    pieces = np.bincount(owners, minlength=len(SCENE) + 1)[1:]
    assert pieces.tolist() == [2, 4, 1, 1, 3, 1, 1, 1]


# ----------------------------------------------------------------------------- (3b) generator


def _single_tile_records(records, grid):
    """{tile: records whose crop_box is that tile-with-halo (masks from that tile alone)}."""
    out = {}
    for r in records:
        x, y, w, h = r["crop_box"]
        for t, box in enumerate(grid.outer.tolist()):
            if box == [x, y, x + w, y + h]:
                out.setdefault(t, []).append(r)
    return out


def test_tiled_generator_end_to_end(model_params, large_image):
    model, params = model_params
    gen = SamAutomaticMaskGenerator(model, params, tile_shape=TILE, halo=HALO, **AMG)
    records = gen.generate(large_image)
    grid = tiling.TileGrid.build((600, 800), TILE, HALO)
    assert records
    masks = np.stack([r["segmentation"] for r in records])
    assert masks.shape[1:] == (600, 800) and masks.dtype == bool
    for r in records:
        m = r["segmentation"]
        ys, xs = np.nonzero(m)
        assert r["area"] == m.sum() > 0
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        x, y, w, h = r["crop_box"]
        assert 0 <= x and 0 <= y and x + w <= 800 and y + h <= 600
        assert not m[:y].any() and not m[y + h :].any()  # inside its crop box
        assert not m[:, :x].any() and not m[:, x + w :].any()
        ((px, py),) = r["point_coords"]
        assert x <= px <= x + w and y <= py <= y + h
        assert 0 <= r["predicted_iou"] and 0 <= r["stability_score"] <= 1
    # no record twice (across the halo or otherwise)
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    inter = flat @ flat.T
    iou = inter / (flat.sum(1)[:, None] + flat.sum(1)[None] - inter)
    np.fill_diagonal(iou, 0)
    assert iou.max() < 0.95, iou.max()
    # masks of a single tile are the untiled generator's on that tile's crop, shifted
    plain = SamAutomaticMaskGenerator(model, params, **AMG)
    single = _single_tile_records(records, grid)
    assert sum(map(len, single.values())) >= 10
    assert len(single) >= 8
    assert any(
        r["crop_box"] not in [list(au.box_xyxy_to_xywh(b)) for b in grid.outer] for r in records
    )
    for t, rs in single.items():
        x0, y0, x1, y1 = grid.outer[t]
        theirs = plain.generate(large_image[y0:y1, x0:x1])
        for r in rs:
            match = [
                s
                for s in theirs
                if np.array_equal(s["segmentation"], r["segmentation"][y0:y1, x0:x1])
            ]
            assert match, (t, r["bbox"])
            s = match[0]
            assert r["bbox"] == [s["bbox"][0] + x0, s["bbox"][1] + y0, *s["bbox"][2:]]
            assert r["point_coords"] == [
                [s["point_coords"][0][0] + x0, s["point_coords"][0][1] + y0]
            ]
            assert r["predicted_iou"] == s["predicted_iou"]
            assert r["stability_score"] == s["stability_score"]
    # RLE output: the same masks
    rle = SamAutomaticMaskGenerator(
        model, params, tile_shape=TILE, halo=HALO, output_mode="uncompressed_rle", **AMG
    ).generate(large_image)
    assert len(rle) == len(records)
    for r, s in zip(rle, records, strict=True):
        assert r["segmentation"]["size"] == [600, 800]
        assert np.array_equal(au.rle_to_mask(r["segmentation"]), s["segmentation"])
        assert {k: v for k, v in r.items() if k != "segmentation"} == {
            k: v for k, v in s.items() if k != "segmentation"
        }


# ----------------------------------------------------------------------------- (4) bad input

BAD = [
    ((64, 64), (32, 32), "larger than 2 * halo"),
    ((64, 64), (40, 8), "larger than 2 * halo"),  # tile smaller than the halo's double
    ((64, 64), (-1, 8), "halo must be positive"),
    ((0, 64), (8, 8), "tile_shape must be positive"),
    ((64,), (8, 8), "tile_shape must be two integers"),
    ((64, 64), (8, 8, 8), "halo must be two integers"),
    ((64.0, 64), (8, 8), "tile_shape must be two integers"),
    ("64,64", (8, 8), "tile_shape must be two integers"),
    (None, (8, 8), "go together"),
]


@pytest.mark.parametrize("tile_shape, halo, fragment", BAD)
def test_bad_tiling_is_a_one_line_typed_error(model_params, tile_shape, halo, fragment):
    model, params = model_params
    calls = [
        lambda: SamPredictor(model, params, tile_shape=tile_shape, halo=halo),
        lambda: SamAutomaticMaskGenerator(None, None, tile_shape=tile_shape, halo=halo),
        lambda: F.encode_image_tiled(
            model, params, np.zeros((8, 8, 3), np.uint8), tile_shape, halo
        ),
    ]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            call()
        assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_tiling_on_the_command_line(tmp_path):
    cases = [
        ("amg", ["--tile-shape", "64,64", "--halo", "32,32"], "larger than 2 * halo"),
        ("predict", ["--point", "1,1", "--tile-shape", "64", "--halo", "8,8"], "expected H,W"),
    ]
    common = ["--checkpoint", "nope", "--output", str(tmp_path / "out")]
    io = {"amg": ["--input", "nope.png"], "predict": ["--image", "nope.png"]}

    def run(case):
        command, argv, _ = case
        code = f"import sys; from sam_jax.cli.{command} import main; sys.exit(main())"
        cmd = [sys.executable, "-c", code, *common, *io[command], *argv]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run, cases))
    for (command, _, fragment), proc in zip(cases, procs, strict=True):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"sam-jax-{command}: error: "), lines
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- (5) memory


def test_encoder_input_shape_does_not_depend_on_image_size(model_params, monkeypatch):
    model, params = model_params
    real, shapes = F.encode_images, []

    def recording(model, params, images):
        shapes.append(tuple(images.shape))
        return real(model, params, images)

    monkeypatch.setattr(F, "encode_images", recording)
    small = F.encode_image_tiled(model, params, _image(300, 400, seed=2), TILE, HALO)
    compiled = F.compiled_versions()["encode"]
    assert len(shapes) == small.grid.num_tiles == 4
    predictor = SamPredictor(model, params, tile_shape=TILE, halo=HALO)
    predictor.set_image(_image(1000, 1400, seed=3))  # 5 x 7 tiles
    assert len(shapes) == 4 + 35 and len(predictor.tiles.features) == 35
    assert set(shapes) == {(1, 128, 128, 3)}  # one tile at a time, one input shape
    assert F.compiled_versions()["encode"] == compiled  # no new compilation for the larger image
    assert {f.shape for f in predictor.tiles.features} == {(1, 8, 8, 32)}
