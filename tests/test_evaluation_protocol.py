"""Point and box protocols over fake predictors whose outputs are worked out by hand."""

import numpy as np
import pytest

from sam_jax.evaluation.protocol import (
    evaluate_boxes,
    evaluate_points,
    run_point_rounds,
    select_masks,
)


def square(shape, xy, half):
    m = np.zeros(shape, bool)
    x, y = int(xy[0]), int(xy[1])
    m[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1] = True
    return m


class FakePredictor:
    """Masks from click geometry. Multimask: squares of half-size 2, 4, 5 around the first click
    with predicted IoUs `iou_multi`. Single output: union of 7x7 squares around positive clicks
    minus 3x3 squares around negative clicks. Boxes: the box filled (inclusive max).
    low_res[b, c] is filled with 1000 * call + 10 * b + c so fed-back masks can be traced."""

    def __init__(self, iou_multi=(0.2, 0.5, 0.9), single=None):
        self.iou_multi = np.asarray(iou_multi)
        self.single = single or self._single
        self.set_calls, self.calls = 0, []

    def set_image(self, image):
        self.shape = image.shape[:2]
        self.set_calls += 1

    @staticmethod
    def _single(shape, coords, labels):
        m = np.zeros(shape, bool)
        for (x, y), lab in zip(coords, labels, strict=True):
            if lab == 1:
                m |= square(shape, (x, y), 3)
        for (x, y), lab in zip(coords, labels, strict=True):
            if lab == 0:
                m &= ~square(shape, (x, y), 1)
        return m

    def predict_batch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output=True,
        return_logits=False,
    ):
        b = len(point_coords if point_coords is not None else boxes)
        self.calls.append(
            {
                "B": b,
                "N": None if point_coords is None else point_coords.shape[1],
                "multi": multimask_output,
                "mask_input": None if mask_input is None else mask_input.copy(),
                "coords": None if point_coords is None else point_coords.copy(),
                "labels": None if point_labels is None else point_labels.copy(),
            }
        )
        c = 3 if multimask_output else 1
        masks = np.zeros((b, c, *self.shape), bool)
        for i in range(b):
            if boxes is not None:
                x0, y0, x1, y1 = boxes[i].astype(int)
                masks[i, :, y0 : y1 + 1, x0 : x1 + 1] = True
            elif multimask_output:
                for j, half in enumerate((2, 4, 5)):
                    masks[i, j] = square(self.shape, point_coords[i, 0], half)
            else:
                masks[i, 0] = self.single(self.shape, point_coords[i], point_labels[i])
        iou = np.tile(self.iou_multi if c == 3 else np.ones(1), (b, 1))
        low = 1000.0 * len(self.calls) + 10.0 * np.arange(b)[:, None] + np.arange(c)[None]
        low = np.broadcast_to(low[:, :, None, None], (b, c, 8, 8)).astype(np.float32)
        return masks, iou, low


def example(shape, masks, image_id="img"):
    return {
        "image": np.zeros((*shape, 3), np.uint8),
        "masks": np.stack(masks),
        "image_id": image_id,
    }


def test_rounds_by_hand():
    shape = (30, 30)
    gt = square(shape, (9, 9), 4)  # 9x9, rows/cols 5..13
    p = FakePredictor()
    p.set_image(np.zeros((*shape, 3), np.uint8))
    r = run_point_rounds(p, gt[None], np.array([[9, 9]]), num_rounds=3)
    # Round 1: 11x11 square chosen (predicted IoU 0.9): IoU 81/121; the 9x9 one is the oracle.
    assert r["ious"][0, 0] == pytest.approx(81 / 121)
    assert r["oracle"][0] == pytest.approx(1.0)
    # Round 2: the false-positive ring (distance 1 everywhere) -> negative click at its first
    # pixel (4, 4); single output = 7x7 around (9, 9) minus 3x3 around (4, 4): IoU 49/81.
    np.testing.assert_array_equal(r["clicks"][0, 1], [4, 4])
    assert r["labels"][0, 1] == 0
    assert r["ious"][0, 1] == pytest.approx(49 / 81)
    # Round 3: the false-negative ring of width 1 -> positive click at (5, 5).
    np.testing.assert_array_equal(r["clicks"][0, 2], [5, 5])
    assert r["labels"][0, 2] == 1
    # 7x7 around (9,9) | 7x7 around (5,5) minus 3x3 around (4,4): 49 + 49 - 9 overlap - 4
    # removed inside the union (rows/cols 3..5 minus the pixels outside (5,5)'s square: none).
    pred3 = (square(shape, (9, 9), 3) | square(shape, (5, 5), 3)) & ~square(shape, (4, 4), 1)
    assert pred3.sum() == 49 + 49 - 9 - 9
    inter = (pred3 & gt).sum()  # pixels of pred3 in rows/cols 5..13
    assert inter == 49 + 16 - 9 - 1
    assert r["ious"][0, 2] == pytest.approx(inter / (pred3 | gt).sum())
    assert r["num_clicks"][0] == 3
    # One batched call per round: 3 outputs for the first click, 1 afterwards.
    assert [(c["N"], c["multi"]) for c in p.calls] == [(1, True), (2, False), (3, False)]


def test_perfect_prediction_stops_adding_clicks():
    shape = (20, 20)
    gts = [square(shape, (5, 5), 2), square(shape, (14, 12), 3)]

    def exact(s, coords, labels):  # the ground truth under the first click
        return next(g for g in gts if g[int(coords[0][1]), int(coords[0][0])])

    p = FakePredictor(single=exact)
    res = evaluate_points(p, [example(shape, gts)], num_points=(1, 2, 4), return_per_mask=True)
    # Round 1 picks the 11x11 square (not perfect); round 2 gives the exact mask; no error is
    # left, so no third or fourth click is added and IoU 1 is kept.
    per = res["per_mask"]
    assert per["ious"][:, 0] == pytest.approx([25 / 121, 49 / 121])
    np.testing.assert_array_equal(per["ious"][:, 1:], 1.0)
    assert res["miou"] == {"1": pytest.approx((25 / 121 + 49 / 121) / 2), "2": 1.0, "4": 1.0}
    np.testing.assert_array_equal(per["clicks"][:, 2], per["clicks"][:, 1])  # repeated, not new
    np.testing.assert_array_equal(per["clicks"][:, 3], per["clicks"][:, 1])


def test_empty_prediction_gives_zero_iou_and_positive_clicks():
    shape = (12, 12)
    gt = square(shape, (5, 5), 2)  # 5x5: centre (5, 5), then the ring at distance 2
    p = FakePredictor(single=lambda s, coords, labels: np.zeros(s, bool))
    p.set_image(np.zeros((*shape, 3), np.uint8))
    r = run_point_rounds(p, gt[None], np.array([[5, 5]]), num_rounds=3, multimask="never")
    # Empty predictions: positive clicks at the FN maximum; the centre (5, 5) is already clicked,
    # so the first pixels at distance 2 follow: (4, 4), then (5, 4).
    assert r["ious"][0].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_array_equal(r["clicks"][0], [[5, 5], [4, 4], [5, 4]])
    np.testing.assert_array_equal(r["labels"][0], [1, 1, 1])
    p2 = FakePredictor(single=lambda s, coords, labels: np.zeros(s, bool))
    p2.set_image(np.zeros((*shape, 3), np.uint8))
    r2 = run_point_rounds(p2, gt[None], np.array([[5, 5]]), num_rounds=3)
    # Round 1's chosen 11x11 mask (rows/cols 0..10) covers the object: negative click at the
    # first pixel 2 from the frame's boundary (1, 1); then the empty prediction: positive (4, 4).
    np.testing.assert_array_equal(r2["clicks"][0, 1], [1, 1])
    assert r2["labels"][0, 1] == 0 and r2["labels"][0, 2] == 1
    np.testing.assert_array_equal(r2["clicks"][0, 2], [4, 4])


def test_return_masks_are_the_chosen_masks_and_stay_once_nothing_is_left_to_click():
    shape = (20, 20)
    gt = square(shape, (9, 9), 3)
    calls = []

    def single(s, coords, labels):  # exact on the first call, empty afterwards
        calls.append(len(coords))
        return gt if len(calls) == 1 else np.zeros(s, bool)

    p = FakePredictor(single=single)
    p.set_image(np.zeros((*shape, 3), np.uint8))
    r = run_point_rounds(
        p, gt[None], np.array([[9, 9]]), num_rounds=3, multimask="never", return_masks=True
    )
    assert r["masks"].shape == (1, 3, *shape) and r["masks"].dtype == bool
    # Round 0 is perfect: no click is left, so rounds 1 and 2 keep its mask and IoU.
    assert len(calls) == 3 and r["num_clicks"][0] == 1
    assert r["ious"][0].tolist() == [1.0, 1.0, 1.0]
    for t in range(3):
        np.testing.assert_array_equal(r["masks"][0, t], gt)
    # Multimask first round: the chosen (most confident) output is returned.
    p2 = FakePredictor(single=lambda s, coords, labels: np.zeros(s, bool))
    p2.set_image(np.zeros((*shape, 3), np.uint8))
    r2 = run_point_rounds(p2, gt[None], np.array([[9, 9]]), num_rounds=2, return_masks=True)
    np.testing.assert_array_equal(r2["masks"][0, 0], square(shape, (9, 9), 5))
    assert not r2["masks"][0, 1].any()
    assert "masks" not in run_point_rounds(p2, gt[None], np.array([[9, 9]]), num_rounds=1)


def _many_masks(rng, shape, n):
    return [square(shape, rng.integers(3, 37, size=2), int(rng.integers(1, 6))) for _ in range(n)]


def test_batching_is_invisible_and_encoder_runs_once_per_image():
    rng = np.random.default_rng(0)
    shape = (40, 40)
    data = [example(shape, _many_masks(rng, shape, n), f"im{n}") for n in (7, 1, 12)]
    results = []
    for bs in (1, 4, 64):
        p = FakePredictor()
        results.append(
            evaluate_points(
                p, data, num_points=(1, 2, 3, 5), batch_size=bs, gt_boxes=True, return_per_mask=True
            )
        )
        assert p.set_calls == 3
        point_calls = [c for c in p.calls if c["N"] is not None]
        chunks = sum(-(-n // bs) for n in (7, 1, 12))
        assert len(point_calls) == 5 * chunks
        # The real rows of each chunk: padding them is the predictor's job, not the protocol's.
        chunk_sizes = {min(bs, n - s) for n in (7, 1, 12) for s in range(0, n, bs)}
        assert {c["B"] for c in p.calls} == chunk_sizes
    for r in results[1:]:
        np.testing.assert_array_equal(r["per_mask"]["ious"], results[0]["per_mask"]["ious"])
        np.testing.assert_array_equal(r["per_mask"]["clicks"], results[0]["per_mask"]["clicks"])
        assert r["miou"] == results[0]["miou"]
    assert results[0]["num_images"] == 3 and results[0]["num_masks"] == 20


def test_feed_mask_passes_previous_chosen_low_res():
    shape = (30, 30)
    gts = [square(shape, (9, 9), 4), square(shape, (20, 20), 3)]
    p = FakePredictor()
    res = evaluate_points(p, [example(shape, gts)], num_points=(3,), feed_mask=True)
    assert res["protocol"]["feed_mask"] is True
    assert p.calls[0]["mask_input"] is None
    # Call 1 chose output 2 (highest predicted IoU) of rows 0, 1: low_res 1000 + 10 * b + 2.
    np.testing.assert_array_equal(p.calls[1]["mask_input"][:, 0, 0, 0], [1002, 1012])
    assert p.calls[1]["mask_input"].shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(p.calls[2]["mask_input"][:2, 0, 0, 0], [2000, 2010])
    p2 = FakePredictor()
    evaluate_points(p2, [example(shape, gts)], num_points=(3,), feed_mask=False)
    assert all(c["mask_input"] is None for c in p2.calls)


def test_multimask_modes():
    shape = (30, 30)
    data = [example(shape, [square(shape, (9, 9), 4)])]
    p = FakePredictor()
    res = evaluate_points(p, data, num_points=(1, 2), multimask="always")
    assert [c["multi"] for c in p.calls] == [True, True]
    assert res["protocol"]["multimask"] == "always"
    p = FakePredictor()
    res = evaluate_points(p, data, num_points=(1,), multimask="never")
    assert [c["multi"] for c in p.calls] == [False]
    assert res["oracle_miou_1"] == res["miou"]["1"] == pytest.approx(49 / 81)
    with pytest.raises(ValueError, match="multimask"):
        evaluate_points(p, data, multimask="sometimes")


def test_empty_masks_are_skipped_and_counted():
    shape = (20, 20)
    empty = np.zeros(shape, bool)
    data = [
        example(shape, [square(shape, (5, 5), 2), empty, square(shape, (14, 14), 2)], "a"),
        example(shape, [empty, empty], "b"),
    ]
    p = FakePredictor()
    res = evaluate_points(p, data, num_points=(1,), return_per_mask=True)
    assert res["num_masks"] == 2 and res["skipped_empty_masks"] == 3
    assert res["num_images"] == 1 and p.set_calls == 1
    np.testing.assert_array_equal(res["per_mask"]["mask_index"], [0, 2])
    with pytest.raises(ValueError, match="no masks to evaluate"):
        evaluate_points(FakePredictor(), [data[1]], num_points=(1,))


def test_select_masks_is_exact_seeded_and_order_free():
    counts = [(f"im{i}", n) for i, n in enumerate([5, 0, 30, 12, 3])]
    sel = select_masks(counts, 10, seed=0)
    assert sum(len(v) for v in sel.values()) == 10
    assert all(len(set(v)) == len(v) and v.max() < dict(counts)[k] for k, v in sel.items())
    again = select_masks(list(reversed(counts)), 10, seed=0)
    assert {k: v.tolist() for k, v in sel.items()} == {k: v.tolist() for k, v in again.items()}
    other = select_masks(counts, 10, seed=1)
    assert {k: v.tolist() for k, v in sel.items()} != {k: v.tolist() for k, v in other.items()}
    everything = select_masks(counts, 100)
    assert sum(len(v) for v in everything.values()) == 50
    # Roughly uniform: over many seeds, each mask is picked about 10/50 of the time.
    hits = np.zeros(50)
    offsets = np.cumsum([0] + [n for _, n in counts])
    for s in range(200):
        for k, v in select_masks(counts, 10, seed=s).items():
            hits[offsets[int(k[2:])] + v] += 1
    assert 0.1 < hits.min() / 200 and hits.max() / 200 < 0.35
    with pytest.raises(ValueError, match="positive"):
        select_masks(counts, 0)


def test_max_masks_subsamples_with_two_passes():
    rng = np.random.default_rng(1)
    shape = (40, 40)
    data = [example(shape, _many_masks(rng, shape, n), f"im{i}") for i, n in enumerate((6, 9, 4))]
    res = evaluate_points(
        FakePredictor(), data, num_points=(1,), max_masks=5, seed=3, return_per_mask=True
    )
    assert res["num_masks"] == 5 and res["num_masks_available"] == 19
    assert res["protocol"]["max_masks"] == 5 and res["protocol"]["seed"] == 3
    res2 = evaluate_points(
        FakePredictor(),
        lambda: iter(data),
        num_points=(1,),
        max_masks=5,
        seed=3,
        return_per_mask=True,
    )
    assert res2["per_mask"]["image_id"] == res["per_mask"]["image_id"]
    np.testing.assert_array_equal(res2["per_mask"]["mask_index"], res["per_mask"]["mask_index"])
    with pytest.raises(ValueError, match="two passes"):
        evaluate_points(FakePredictor(), iter(data), num_points=(1,), max_masks=5)


def test_random_first_point_is_seeded():
    shape = (40, 40)
    data = [example(shape, [square(shape, (20, 20), 8)] * 4)]

    def firsts(seed):
        r = evaluate_points(
            FakePredictor(),
            data,
            num_points=(1,),
            first_point="random",
            seed=seed,
            return_per_mask=True,
        )
        return r["per_mask"]["clicks"][:, 0].tolist()

    a = firsts(0)
    assert a == firsts(0) and a != firsts(1)
    assert len({tuple(c) for c in a}) > 1  # each mask draws its own point
    assert all(12 <= x <= 28 and 12 <= y <= 28 for x, y in a)


def test_box_protocol():
    shape = (20, 20)
    triangle = np.tril(np.ones((6, 6), bool))  # 21 of the 36 box pixels
    tri = np.zeros(shape, bool)
    tri[3:9, 4:10] = triangle
    data = [example(shape, [square(shape, (12, 12), 3), tri])]
    p = FakePredictor()
    res = evaluate_boxes(p, data, return_per_mask=True)
    np.testing.assert_allclose(res["per_mask"]["box_iou"], [1.0, 21 / 36])
    assert res["box_miou"] == pytest.approx((1 + 21 / 36) / 2)
    assert res["miou"] == {} and res["oracle_miou_1"] is None
    assert [c["multi"] for c in p.calls] == [False]


def test_bad_arguments():
    data = [example((8, 8), [square((8, 8), (4, 4), 1)])]
    with pytest.raises(ValueError, match="first-point"):
        evaluate_points(FakePredictor(), data, first_point="edge")
    with pytest.raises(ValueError, match=">= 1"):
        evaluate_points(FakePredictor(), data, num_points=(0, 1))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_points(FakePredictor(), data, num_points=())
