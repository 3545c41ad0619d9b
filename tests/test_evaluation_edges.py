"""Edge detection (paper 7.2, D.2): the BSDS500 reader on its real layout, the benchmark metrics
against answers known by construction and against an independent exact matcher, and SAM's edge
map from a fake predictor whose masks are known."""

import numpy as np
import pytest
from PIL import Image
from scipy import io as sio

from sam_jax.data.bsds import BsdsSource, iterate_boundaries, read_boundaries
from sam_jax.data.spec import parse_dataset_spec
from sam_jax.evaluation import boundaries as B
from sam_jax.evaluation.edges import evaluate_edges, outer_boundary, sam_edge_map

H, W = 150, 200  # tolerance 0.0075 * 250 = 1.875 px


def _lines(shift=0, h=H, w=W):
    """A horizontal and a vertical 1-pixel line (a T), shifted down/right by `shift`."""
    m = np.zeros((h, w), bool)
    m[40 + shift, 20:180] = True
    m[40 + shift : 120 + shift, 100 + shift] = True
    return m


def write_mat(path, boundaries):
    """A BSDS500 groundTruth .mat: a 1 x K cell array of structs (Segmentation, Boundaries)."""
    cell = np.empty((1, len(boundaries)), dtype=object)
    for k, b in enumerate(boundaries):
        seg = (np.cumsum(b, axis=0) > 0).astype(np.uint16) + 1
        cell[0, k] = {"Segmentation": seg, "Boundaries": b.astype(np.uint8)}
    sio.savemat(path, {"groundTruth": cell})


def write_bsds(root, split="test", images=None, missing_mat=False):
    """BSDS500 layout: images/SPLIT/<id>.jpg, groundTruth/SPLIT/<id>.mat; `images` maps an id to
    (uint8 (H, W, 3) image, list of boundary maps)."""
    (root / "images" / split).mkdir(parents=True)
    (root / "groundTruth" / split).mkdir(parents=True)
    for image_id, (image, bounds) in images.items():
        Image.fromarray(image).save(root / "images" / split / f"{image_id}.jpg", quality=95)
        write_mat(root / "groundTruth" / split / f"{image_id}.mat", bounds)
    if missing_mat:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / split / "999.jpg")
    return root


def test_bsds_reader_reads_the_layout(tmp_path):
    a, b = _lines(), _lines(1)
    img = np.full((H, W, 3), 90, np.uint8)
    write_bsds(tmp_path, images={"100007": (img, [a, b]), "2018": (img, [b])}, missing_mat=True)
    spec = parse_dataset_spec(f"bsds:{tmp_path}:test")
    assert (spec.kind, spec.path, spec.split) == ("bsds", str(tmp_path), "test")
    source = BsdsSource(str(tmp_path), "test")
    assert len(source) == 3 and source.image_id(0) == "100007"
    rec = source.load(0)
    assert rec.image.shape == (H, W, 3) and rec.boundaries.dtype == bool
    np.testing.assert_array_equal(rec.boundaries, np.stack([a, b]))
    stats = {}
    recs = list(iterate_boundaries(str(tmp_path), "test", stats=stats))
    assert [r.image_id for r in recs] == ["100007", "2018"] and stats["skipped_images"] == 1
    shares = [
        r.image_id
        for p in range(2)
        for r in iterate_boundaries(str(tmp_path), "test", None, None, p, 2)
    ]
    assert sorted(shares) == ["100007", "2018"]


def test_bsds_refusals(tmp_path):
    with pytest.raises(ValueError, match="groundTruth"):
        read_boundaries(_mat_bytes(tmp_path, {"other": np.zeros((2, 2))}))
    with pytest.raises(ValueError, match="not a MATLAB"):
        read_boundaries(b"not a mat file")
    write_mat(tmp_path / "g.mat", [_lines()])
    with pytest.raises(ValueError, match="size"):
        read_boundaries((tmp_path / "g.mat").read_bytes(), (10, 10))
    with pytest.raises(ValueError, match="bsds split"):
        parse_dataset_spec(f"bsds:{tmp_path}:bogus")
    with pytest.raises(FileNotFoundError):
        parse_dataset_spec(f"bsds:{tmp_path}/nowhere")


def _mat_bytes(tmp_path, variables):
    sio.savemat(tmp_path / "x.mat", variables)
    return (tmp_path / "x.mat").read_bytes()


def test_thresholds_are_the_benchmarks():
    t = B.thresholds(99)
    assert len(t) == 99 and t[0] == pytest.approx(0.01) and t[-1] == pytest.approx(0.99)


@pytest.mark.parametrize("shift, matched", [(0, True), (1, True), (3, False)])
def test_matchers_agree_within_and_outside_tolerance(shift, matched):
    gt, pred = _lines(), _lines(shift)
    exact = B.match_boundaries(pred, gt, matcher="exact")
    bsds = B.match_boundaries(pred, gt, matcher="bsds")
    n = gt.sum()
    if matched:  # the exact matcher pairs every pixel; the benchmark's a few fewer at most
        assert exact[0].sum() == exact[1].sum() == n
        assert n - 4 <= bsds[1].sum() <= n
    else:  # 3 px > 1.875 px: only pixels near where the two T's cross match
        assert exact[1].sum() <= 6 and bsds[1].sum() <= exact[1].sum()
        line, shifted = np.zeros_like(gt), np.zeros_like(gt)
        line[40, 20:180], shifted[43, 20:180] = True, True
        for m in B.MATCHERS:
            assert B.match_boundaries(shifted, line, matcher=m)[1].sum() == 0


def _metrics(edge_maps, humans, matcher="exact"):
    t = B.thresholds(99)
    counts = [
        B.image_counts(e, h, t, matcher=matcher) for e, h in zip(edge_maps, humans, strict=True)
    ]
    return B.boundary_metrics(t, counts)


def test_perfect_edge_map_scores_one_and_its_ap_is_the_pr_area():
    gt = _lines()
    strengths = np.random.default_rng(0).uniform(0.0101, 1.0, gt.sum())
    edge = np.zeros(gt.shape)
    edge[gt] = strengths
    m = _metrics([edge], [gt[None]])
    assert m["ODS"] == pytest.approx(1.0) and m["OIS"] == pytest.approx(1.0)
    assert m["R50"] == pytest.approx(1.0)
    # Independently: precision is 1 at every threshold, recall(t) = share of strengths >= t, so
    # the area is 0.01 per recall grid point between the lowest and the highest recall.
    recall = [(strengths >= t).mean() for t in B.thresholds(99)]
    grid = np.linspace(0, 1, 101)
    expected = 0.01 * np.sum((grid >= min(recall) - 1e-12) & (grid <= max(recall) + 1e-12))
    assert m["AP"] == pytest.approx(expected)
    bsds = _metrics([edge], [gt[None]], matcher="bsds")  # the benchmark's matcher: nearly 1
    assert bsds["ODS"] > 0.97


def test_shifted_edges_within_and_outside_tolerance():
    gt = _lines()[None]
    assert _metrics([_lines(1).astype(float)], [gt])["ODS"] == pytest.approx(1.0)
    # 3 px: only the 3 pixels where the shifted T crosses the original are within tolerance
    assert _metrics([_lines(3).astype(float)], [gt])["ODS"] == pytest.approx(3 / 239)


def test_partial_edges_and_several_annotators():
    gt = _lines()
    half = gt.copy()
    half[60:120, 100] = False  # 60 of the 239 pixels gone: R = 179/239, P = 1
    assert (B.thin(half) == half).all()  # a T stays as it is (a corner would be thinned)
    m = _metrics([half.astype(float)], [gt[None]])
    r = 179 / 239
    assert m["ODS"] == pytest.approx(2 * r / (1 + r)) and m["OIS"] == pytest.approx(m["ODS"])
    # Two annotators, the prediction is the first's map: recall = |A| / (|A| + |B|), P = 1.
    other = np.zeros_like(gt)
    other[130, 10:70] = True
    m = _metrics([gt.astype(float)], [np.stack([gt, other])])
    assert m["ODS_recall"] == pytest.approx(239 / 299) and m["ODS_precision"] == pytest.approx(1)


def test_ois_takes_each_images_best_threshold():
    """Image 1 is best at a high threshold, image 2 at a low one: OIS > ODS."""
    gt = _lines()
    noise = np.zeros(gt.shape)
    noise[100:110, 150:190] = 0.3  # false edges below 0.3
    e1 = gt * 0.9 + noise
    e2 = gt * 0.2
    m = _metrics([e1, e2], [gt[None], gt[None]])
    assert m["OIS"] == pytest.approx(1.0) and m["ODS"] < 0.99


def test_recall_at_precision_interpolates_the_crossing():
    r = np.array([1.0, 0.8, 0.4])
    p = np.array([0.3, 0.4, 0.9])  # crosses 0.5 between the 2nd and 3rd thresholds
    assert B.recall_at_precision(r, p) == pytest.approx(0.8 + (0.1 / 0.5) * (0.4 - 0.8))
    assert B.recall_at_precision(r, np.array([0.1, 0.2, 0.3])) == 0.0


YY, XX = np.mgrid[:H, :W]
BIG = (YY - 70) ** 2 + (XX - 100) ** 2 < 45**2
SMALL = (YY - 70) ** 2 + (XX - 100) ** 2 < 12**2
# (Disks, not squares: the edge NMS takes its orientation from second derivatives, which are
# degenerate on perfectly axis-aligned lines, as in the benchmark's MATLAB code.)


class DiskPredictor:
    """Every point prompt gets the same 3 masks: a disk, a smaller disk, an empty mask."""

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_batch(self, point_coords, point_labels, multimask_output, return_logits):
        assert multimask_output and return_logits and point_coords.shape[1:] == (1, 2)
        logits = np.full((len(point_coords), 3, *self.shape), -8.0, np.float32)
        logits[:, 0, BIG] = 8.0
        logits[:, 1, SMALL] = 8.0
        iou = np.tile(np.array([0.9, 0.8, 0.7], np.float32), (len(point_coords), 1))
        return logits, iou, None


def test_sam_edge_map_keeps_sobel_on_outer_boundaries_only():
    image = np.zeros((H, W, 3), np.uint8)
    raw, info = sam_edge_map(DiskPredictor(), image, points_per_side=4, thin=False)
    assert info["num_masks"] == 48
    # 16 points x 2 non-empty masks; duplicates of a box go at NMS: one big, one small disk
    assert info["num_kept"] == 2
    ring = outer_boundary(BIG) | outer_boundary(SMALL)
    assert raw.max() == pytest.approx(1.0) and np.all(raw[~ring] == 0)
    assert raw[ring].min() > 0.3
    thin, _ = sam_edge_map(DiskPredictor(), image, points_per_side=4)
    on = thin > 0
    assert thin.max() <= 1.0 and on.sum() <= 1.2 * ring.sum() and (on & ring).sum() > 0.8 * on.sum()


def test_evaluate_edges_on_the_layout(tmp_path):
    """The fake predictor's disks' outlines as human boundaries: SAM's map scores ODS ~ 1."""
    human = B.thin(outer_boundary(BIG) | outer_boundary(SMALL))  # 1-pixel outlines
    write_bsds(tmp_path, "val", images={"1": (np.zeros((H, W, 3), np.uint8), [human])})
    pred = DiskPredictor()
    out = evaluate_edges(
        lambda im: sam_edge_map(pred, im, points_per_side=2)[0],
        str(tmp_path),
        "val",
        num_thresholds=19,
        matcher="exact",
    )
    assert out["num_images"] == 1 and out["skipped_images"] == 0
    assert out["edges"]["ODS"] > 0.98 and out["edges"]["R50"] > 0.98
