"""Boundary-detection metrics of the BSDS500 benchmark: ODS, OIS, AP and R50 (SAM paper 7.2, D.2).

The benchmark's definition (Arbeláez et al. 2011, its `evaluation_bdry_image.m` and
`collect_eval_bdry.m`), which this module follows:
- thresholds: `n` evenly spaced in (0, 1), t_i = i / (n + 1), i = 1..n (99 by default);
- at each threshold the edge map (H, W) in [0, 1] is binarised (`>= t`) and thinned to 1-pixel
  wide lines (morphological thinning, MATLAB's bwmorph 'thin', inf: `skimage.morphology.thin`);
- the thinned map is matched against each human boundary map: a one-to-one correspondence of
  pixels at most max_dist * (image diagonal) apart (max_dist 0.0075). Recall counts the matched
  pixels of every human map (cntR over sumR, summed over annotators); precision counts the
  predicted pixels matched to any annotator (cntP over sumP);
- ODS: the best F-measure (2PR / (P + R)) of the dataset-wide P/R curve (counts summed over
  images), linearly interpolated between consecutive thresholds (100 steps, as `findBestRF`);
- OIS: F of the counts summed over images, each image at its own best threshold (the last one of
  maximal F, as `collect_eval_bdry` does);
- AP: the area under the dataset P/R curve: precision at the curve's distinct recall values,
  linearly interpolated at recall 0, 0.01, ..., 1 (0 outside the measured range), times 0.01;
- R50: recall at 50% precision, linearly interpolated along the curve where precision crosses
  0.5 (the highest such recall; 0 when precision never reaches 0.5).

Two matchers: "bsds", the benchmark's own correspondence (its C++ `matchEdgeMaps`, a min-cost
assignment with outlier costs, compiled by the pyEdgeEval package: `pip install sam_jax[edges]`),
and "exact", a maximum-cardinality bipartite matching of the pixels within the tolerance (scipy's
Hopcroft-Karp), written here as an independent check. They agree on clean edges; the benchmark's
graph can leave a few pixels unmatched that a maximum matching pairs (e.g. 348 of 350 for a
line shifted 4 px with a 4.3 px tolerance), so "bsds" is the default for numbers compared with
published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLDS = 99
MAX_DIST = 0.0075
MATCHERS = ("bsds", "exact")


def thresholds(n: int = DEFAULT_THRESHOLDS) -> np.ndarray:
    """The benchmark's n thresholds: float64 (n,) = i / (n + 1), i = 1..n."""
    if n < 1:
        raise ValueError(f"the number of thresholds must be >= 1, got {n}")
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


def thin(binary: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel lines (bwmorph 'thin', inf): bool (H, W)."""
    from skimage.morphology import thin as skimage_thin

    return skimage_thin(np.asarray(binary, dtype=bool))


def _exact_match(pred: np.ndarray, gt: np.ndarray, radius: float):
    from scipy import sparse
    from scipy.sparse.csgraph import maximum_bipartite_matching
    from scipy.spatial import cKDTree

    p, g = np.argwhere(pred), np.argwhere(gt)
    match_pred, match_gt = np.zeros(pred.shape, bool), np.zeros(gt.shape, bool)
    if len(p) == 0 or len(g) == 0:
        return match_pred, match_gt
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(g), radius, output_type="coo_matrix")
    # sparse_distance_matrix drops zero distances (coincident pixels): add them back.
    same = {tuple(x): j for j, x in enumerate(g)}
    rows, cols = list(pairs.row), list(pairs.col)
    for i, x in enumerate(p):
        j = same.get(tuple(x))
        if j is not None:
            rows.append(i)
            cols.append(j)
    graph = sparse.csr_matrix(
        (np.ones(len(rows), np.int8), (np.asarray(rows), np.asarray(cols))), shape=(len(p), len(g))
    )
    graph.sum_duplicates()
    partner = maximum_bipartite_matching(graph, perm_type="column")  # (len(p),) gt index or -1
    matched = partner >= 0
    match_pred[tuple(p[matched].T)] = True
    match_gt[tuple(g[partner[matched]].T)] = True
    return match_pred, match_gt


def match_boundaries(
    pred: np.ndarray, gt: np.ndarray, max_dist: float = MAX_DIST, matcher: str = "bsds"
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one correspondence of two boundary maps (bool (H, W) each) within max_dist of the
    image diagonal. Returns (predicted pixels matched, human pixels matched), bool (H, W)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"boundary maps must be (H, W) of one size, got {pred.shape}, {gt.shape}")
    if matcher == "exact":
        return _exact_match(pred, gt, max_dist * float(np.hypot(*pred.shape)))
    if matcher != "bsds":
        raise ValueError(f"unknown matcher {matcher!r}; expected one of {MATCHERS}")
    try:
        from pyEdgeEval._lib import correspond_pixels
    except ImportError:
        raise ImportError(
            "the BSDS boundary matcher needs pyEdgeEval: pip install 'sam_jax[edges]'"
        ) from None
    m1, m2, _, _ = correspond_pixels(pred.astype(np.float64), gt.astype(np.float64), max_dist)
    return m1 > 0, m2 > 0


def image_counts(
    edge_map: np.ndarray,
    human: np.ndarray,
    thresholds_: Sequence[float] | np.ndarray,
    max_dist: float = MAX_DIST,
    matcher: str = "bsds",
) -> np.ndarray:
    """Match counts of one image at every threshold.

    Args:
      edge_map: float (H, W) in [0, 1].
      human: bool (K, H, W), the annotators' boundary maps.
    Returns:
      float64 (T, 4): cntR, sumR, cntP, sumP per threshold.
    """
    edge_map = np.asarray(edge_map, dtype=np.float64)
    human = np.asarray(human, dtype=bool)
    if human.ndim != 3 or human.shape[1:] != edge_map.shape:
        raise ValueError(f"human maps {human.shape} do not match the edge map {edge_map.shape}")
    out = np.zeros((len(thresholds_), 4))
    for i, t in enumerate(thresholds_):
        pred = thin(edge_map >= t)
        matched_any = np.zeros(pred.shape, bool)
        for gt in human:
            m_pred, m_gt = match_boundaries(pred, gt, max_dist, matcher)
            matched_any |= m_pred
            out[i, 0] += m_gt.sum()
            out[i, 1] += gt.sum()
        out[i, 2] = matched_any.sum()
        out[i, 3] = pred.sum()
    return out


def _rpf(counts: np.ndarray):
    cnt_r, sum_r, cnt_p, sum_p = (counts[..., k] for k in range(4))
    r = cnt_r / np.where(sum_r == 0, 1, sum_r)
    p = cnt_p / np.where(sum_p == 0, 1, sum_p)
    return r, p, f_measure(r, p)


def f_measure(r, p):
    """2PR / (P + R), 0 where both are 0."""
    r, p = np.asarray(r, np.float64), np.asarray(p, np.float64)
    s = p + r
    return np.where(s > 0, 2 * p * r / np.where(s > 0, s, 1), 0.0)


def best_f(t: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, recall, precision, F) of the best F along the curve, interpolated linearly
    between consecutive thresholds in 100 steps (the benchmark's findBestRF)."""
    best = (float(t[0]), float(r[0]), float(p[0]), float(f_measure(r[0], p[0])))
    d = np.linspace(0.0, 1.0, 100)
    for i in range(1, len(t)):
        tt = t[i] * d + t[i - 1] * (1 - d)
        rt = r[i] * d + r[i - 1] * (1 - d)
        pt = p[i] * d + p[i - 1] * (1 - d)
        ft = f_measure(rt, pt)
        j = int(np.argmax(ft))
        if ft[j] > best[3]:
            best = (float(tt[j]), float(rt[j]), float(pt[j]), float(ft[j]))
    return best


def average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """Area under the P/R curve as the benchmark computes it (see the module docstring)."""
    ru, first = np.unique(r, return_index=True)
    if len(ru) < 2:
        return 0.0
    grid = np.linspace(0.0, 1.0, 101)
    pi = np.interp(grid, ru, p[first], left=np.nan, right=np.nan)
    return float(np.nan_to_num(pi, nan=0.0).sum() * 0.01)


def recall_at_precision(r: np.ndarray, p: np.ndarray, level: float = 0.5) -> float:
    """Highest recall where the curve (in threshold order) reaches precision `level`, linearly
    interpolated between the two thresholds that bracket the crossing."""
    best = 0.0
    for i in range(len(r)):
        if p[i] >= level:
            best = max(best, float(r[i]))
        if i and (p[i - 1] - level) * (p[i] - level) < 0:
            w = (level - p[i - 1]) / (p[i] - p[i - 1])
            best = max(best, float(r[i - 1] + w * (r[i] - r[i - 1])))
    return best


def boundary_metrics(thresholds_: np.ndarray, per_image: Sequence[np.ndarray]) -> dict:
    """ODS, OIS, AP and R50 of a dataset from its per-image counts (`image_counts`, (T, 4) each).

    Returns {"ODS", "ODS_threshold", "ODS_recall", "ODS_precision", "OIS", "AP", "R50",
    "num_images", "curve": {"threshold", "recall", "precision"}} (fractions)."""
    if not per_image:
        raise ValueError("no image to score")
    t = np.asarray(thresholds_, np.float64)
    per_image = [np.asarray(c, np.float64) for c in per_image]
    total = np.sum(per_image, axis=0)
    r, p, _ = _rpf(total)
    ods_t, ods_r, ods_p, ods_f = best_f(t, r, p)
    best_counts = np.zeros(4)
    for c in per_image:
        _, _, f = _rpf(c)
        best_counts += c[np.flatnonzero(f == f.max())[-1]]
    _, _, ois = _rpf(best_counts)
    return {
        "ODS": ods_f,
        "ODS_threshold": ods_t,
        "ODS_recall": ods_r,
        "ODS_precision": ods_p,
        "OIS": float(ois),
        "AP": average_precision(r, p),
        "R50": recall_at_precision(r, p, 0.5),
        "num_images": len(per_image),
        "curve": {"threshold": t.tolist(), "recall": r.tolist(), "precision": p.tolist()},
    }
