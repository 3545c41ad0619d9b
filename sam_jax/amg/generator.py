"""SamAutomaticMaskGenerator: the official whole-image mask generator on top of the JAX model.

Per crop (the whole image, then `crop_n_layers` layers of overlapping crops) three compiled calls:
1. the image encoder;
2. `_score_grid`: decodes every grid point (one positive point plus the official (0, 0) padding
   point per prompt) in chunks of `points_per_batch` under `lax.map`, upsamples the logits to the
   crop size as the official post-processing, filters by predicted IoU, stability score and crop
   edge and runs the box NMS, all on the device; only scores, boxes and kept indices come back;
3. `_kept_masks`: decodes the kept prompts again (same chunk shape, hence the same masks) and
   returns their bit-packed masks, so only kept masks leave the device.
Device memory is bounded by one chunk of masks at crop resolution, whatever the number of points.
Crops are computed at their layer's largest crop size rounded up to `transforms.MASK_SIZE_MULTIPLE`
pixels (pixels outside the crop are masked out), so crops and similar image sizes share compiled
versions. Cross-crop NMS,
the optional small-region clean-up (OpenCV, else scipy.ndimage) and the RLE encodings
(pycocotools for COCO RLE) follow, in the official order and with the official tie-breaking.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import tiling, transforms
from sam_jax.amg import masks as au
from sam_jax.amg import tiles
from sam_jax.prompts import bucket_size, pad_rows
from sam_jax.sam_model import unbind

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
MASK_THRESHOLD = 0.0


def _input_frame_points(points: np.ndarray) -> np.ndarray:
    """float64 input-frame points -> float32 x such that the model's float32 `x + 0.5` equals the
    official float64 `points + 0.5` rounded to float32 (the official AMG keeps float64 until the
    prompt encoder casts)."""
    shifted = (np.asarray(points, np.float64) + 0.5).astype(np.float32)
    return shifted - np.float32(0.5)  # exact in float32


def _decode_chunk(model, params, emb, points, taps, resized):
    """points (B, 2) float32 input frame -> logits (B, C, Hp, Wp) at the (padded) crop size, -inf
    outside the crop, and iou (B, C). Same arithmetic as `transforms.postprocess_masks`; the first
    resize is computed over `resized` (>= the input size), the taps read only the input size."""
    b = points.shape[0]
    prompts = jnp.stack([points, jnp.zeros_like(points)], axis=1)[None]  # (1, B, 2, 2)
    labels = jnp.broadcast_to(jnp.array([1, -1], jnp.int32), (1, b, 2))
    low_res, iou = model.apply(
        {"params": params}, emb, prompts, labels, None, None, True, method=model.decode
    )
    # Official post-processing: bilinear to (S, S) (only its top-left `resized` part is needed),
    # crop to the input size and bilinear to the crop size (both folded into the taps).
    x = transforms.postprocess_masks_with_taps(low_res[0], taps, model.config.image_size, resized)
    inside = (taps["rows"][2] + taps["rows"][3] > 0)[:, None] & (
        taps["cols"][2] + taps["cols"][3] > 0
    )[None, :]
    return jnp.where(inside, x, -jnp.inf), iou[0]


@functools.partial(jax.jit, static_argnames=("model", "resized"))
def _score_grid(
    model, params, emb, points, point_valid, taps, crop_box, orig_box, settings, resized
):
    """Scores every mask of a crop's point grid and runs the in-crop box NMS.

    emb (1, g, g, D); points (n_chunks, B, 2) float32 in the input frame; point_valid
    (n_chunks, B) bool; taps from `transforms.resize_taps`; crop_box, orig_box (4,) int32 XYXY;
    settings: dict of scalars. Returns keep (M,) int32 flat indices (point * C + channel) by
    descending predicted IoU, padded with -1; num_kept; iou (M,); stability (M,); boxes (M, 4)
    int32 in the crop frame; M = n_chunks * B * C.
    """

    def one_chunk(pts):
        logits, iou = _decode_chunk(model, params, emb, pts, taps, resized)
        stability = au.calculate_stability_score(
            logits, MASK_THRESHOLD, settings["stability_score_offset"]
        )
        boxes = au.batched_mask_to_box(logits > MASK_THRESHOLD)  # (B, C, 4)
        return iou, stability, boxes

    iou, stability, boxes = jax.lax.map(one_chunk, points)
    c = iou.shape[-1]
    iou, stability, boxes = iou.reshape(-1), stability.reshape(-1), boxes.reshape(-1, 4)
    valid = jnp.repeat(point_valid.reshape(-1), c)
    valid &= jnp.where(settings["use_iou_filter"], iou > settings["pred_iou_thresh"], True)
    valid &= jnp.where(
        settings["use_stability_filter"], stability >= settings["stability_score_thresh"], True
    )
    valid &= ~au.is_box_near_crop_edge(boxes, crop_box, orig_box)
    keep, num_kept = au.box_nms(boxes, iou, settings["box_nms_thresh"], valid=valid)
    return keep, num_kept, iou, stability, boxes


@functools.partial(jax.jit, static_argnames=("model", "resized"))
def _kept_masks(model, params, emb, points, channels, taps, resized):
    """Masks of chosen prompts: points (n_chunks, B, 2), channels (n_chunks, B) int32 ->
    bit-packed bool masks (n_chunks, B, ceil(Hp * Wp / 8)) uint8 (row-major (Hp, Wp) bits).

    Decodes with the same chunk shape as `_score_grid`, so the masks are those it scored."""

    def one_chunk(args):
        pts, ch = args
        logits, _ = _decode_chunk(model, params, emb, pts, taps, resized)
        chosen = jnp.take_along_axis(logits, ch[:, None, None, None], axis=1)[:, 0]
        return jnp.packbits((chosen > MASK_THRESHOLD).reshape(pts.shape[0], -1), axis=-1)

    return jax.lax.map(one_chunk, (points, channels))


def _chunked(x: np.ndarray, chunk: int, n_chunks: int) -> np.ndarray:
    """Pads axis 0 of x with copies of x[0] to n_chunks * chunk and splits it into chunks."""
    x = pad_rows(x, n_chunks * chunk)
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float, high_open: bool = False) -> float:
    if isinstance(value, (bool, str, bytes)):  # float("0.5") and float(True) are not numbers here
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (low <= v < high if high_open else low <= v <= high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {v}")
    return v


_warned_thresholds: set[tuple[str, float]] = set()


def _check_threshold(name: str, value: Any) -> float:
    """A score threshold: any finite number (official), with a warning, once per value, when it
    is above 1 and so keeps no mask."""
    v = _check_float(name, value, -math.inf, math.inf)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if v > 1.0 and (name, v) not in _warned_thresholds:
        _warned_thresholds.add((name, v))
        warnings.warn(
            f"{name}={v} is above 1: the filter keeps no mask (scores are at most 1)",
            stacklevel=3,
        )
    return v


class SamAutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts (official options and
    defaults; see `segment_anything.SamAutomaticMaskGenerator`).

    `SamAutomaticMaskGenerator(sam, points_per_side=...)` with a `SamModel` (the official call;
    options by keyword), or `SamAutomaticMaskGenerator(model, params, ...)` with a Flax module.

    `generate(image)` takes a uint8 (H, W, 3) RGB image and returns a list of records:
    segmentation (bool (H, W) array, or an uncompressed / COCO RLE dict, per `output_mode`),
    area (int), bbox (XYWH ints), predicted_iou (float), point_coords ([[x, y]]),
    stability_score (float), crop_box (XYWH ints).

    Tiled mode (micro_sam's tiled AMG): with tile_shape and halo ((h, w) pixels), the whole
    generation (crops included) runs on every tile-with-halo of the image (`sam_jax.tiling`), and
    `amg.tiles.merge_tiles` maps the masks to the image and merges those that cross tile seams (rule
    in its docstring; crop_nms_thresh is the NMS threshold across tiles). Records are in
    full-image coordinates; a merged mask's crop_box is the box around its tiles' crop boxes. An
    image within one tile gives exactly the untiled records.
    """

    def __init__(
        self,
        model,
        params=None,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        tile_shape: tuple[int, int] | None = None,
        halo: tuple[int, int] | None = None,
    ) -> None:
        # A SamModel alone (the official call), or a module and its params; (None, None) checks
        # the settings only (sam-jax-amg does, before loading a model).
        model, params = unbind(model, params, "SamAutomaticMaskGenerator", allow_none=True)
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given")
        self.crop_n_layers = _check_int("crop_n_layers", crop_n_layers, 0)
        self.crop_n_points_downscale_factor = _check_int(
            "crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1
        )
        if points_per_side is not None:
            points_per_side = _check_int("points_per_side", points_per_side, 1)
            f, n = self.crop_n_points_downscale_factor, self.crop_n_layers
            if int(points_per_side / f**n) < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} leaves no points in crop layer {n} "
                    f"with crop_n_points_downscale_factor={f}"
                )
            self.point_grids = au.build_all_layer_point_grids(points_per_side, n, f)
        else:
            self.point_grids = self._check_point_grids(point_grids, self.crop_n_layers)
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}")
        self.points_per_batch = _check_int("points_per_batch", points_per_batch, 1)
        # Score thresholds take any number, as officially: a value <= 0 turns the filter off (a
        # negative one keeps every mask, which people use with weak or fresh weights), one above
        # 1 keeps no mask (said once).
        self.pred_iou_thresh = _check_threshold("pred_iou_thresh", pred_iou_thresh)
        self.stability_score_thresh = _check_threshold(
            "stability_score_thresh", stability_score_thresh
        )
        self.stability_score_offset = _check_float(
            "stability_score_offset", stability_score_offset, 0.0, math.inf
        )
        self.box_nms_thresh = _check_float("box_nms_thresh", box_nms_thresh, 0.0, 1.0)
        self.crop_nms_thresh = _check_float("crop_nms_thresh", crop_nms_thresh, 0.0, 1.0)
        self.crop_overlap_ratio = _check_float(
            "crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0, high_open=True
        )
        self.min_mask_region_area = _check_int("min_mask_region_area", min_mask_region_area, 0)
        self.output_mode = output_mode
        self.tiling = tiling.check_tiling(tile_shape, halo)  # None: untiled
        self.model, self.params = model, params

    @staticmethod
    def _check_point_grids(point_grids, crop_n_layers: int) -> list[np.ndarray]:
        if not isinstance(point_grids, (list, tuple)):
            raise ValueError("point_grids must be a list of (N, 2) arrays")
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} "
                f"needs {crop_n_layers + 1}"
            )
        grids = []
        for i, g in enumerate(point_grids):
            g = np.asarray(g, np.float64)
            if g.ndim != 2 or g.shape[1] != 2 or g.shape[0] == 0:
                raise ValueError(
                    f"point_grids[{i}] must be a non-empty (N, 2) array, got {g.shape}"
                )
            if not np.all((g >= 0) & (g <= 1)):
                raise ValueError(f"point_grids[{i}] must hold (x, y) normalised to [0, 1]")
            grids.append(g)
        return grids

    def _settings(self) -> dict[str, Any]:
        return {
            "pred_iou_thresh": np.float32(self.pred_iou_thresh),
            "use_iou_filter": np.bool_(self.pred_iou_thresh > 0.0),
            "stability_score_thresh": np.float32(self.stability_score_thresh),
            "use_stability_filter": np.bool_(self.stability_score_thresh > 0.0),
            "stability_score_offset": np.float32(self.stability_score_offset),
            "box_nms_thresh": au.f32_greater_threshold(self.box_nms_thresh),
        }

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for a uint8 (H, W, 3) RGB image, as a list of records (see the class doc)."""
        image = transforms.check_image(transforms.to_host(image))
        if self.tiling is None:
            data = self._generate_masks(image)
        else:
            grid = tiling.TileGrid.build(image.shape[:2], *self.tiling)
            data = tiles.generate_tiled(image, self._generate_masks, grid, self.crop_nms_thresh)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        masks = data["masks"]
        if self.output_mode == "binary_mask":
            segmentations = list(masks)
        else:
            segmentations = au.mask_to_rle(masks)
            if self.output_mode == "coco_rle":
                segmentations = [au.coco_encode_rle(rle) for rle in segmentations]
        records = []
        for i, seg in enumerate(segmentations):
            records.append(
                {
                    "segmentation": seg,
                    "area": int(masks[i].sum()),
                    "bbox": au.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": au.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
                }
            )
        return records

    def _generate_masks(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """All crops, then NMS across crops. Returns a dict of arrays over kept masks: masks
        (K, H, W) bool, boxes (K, 4) int XYXY, iou_preds, stability_score (K,) float32, points
        (K, 2) float64, crop_boxes (K, 4) int."""
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = au.generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        # Crops of a layer are computed at the layer's largest padded crop (and resized input)
        # size, so a layer and similar image sizes share compiled versions.
        s = self.model.config.image_size
        padded = {}
        for (x0, y0, x1, y1), layer in zip(crop_boxes, layer_idxs, strict=True):
            input_size = transforms.get_preprocess_shape(y1 - y0, x1 - x0, s)
            sizes = sum(transforms.padded_mask_sizes(input_size, (y1 - y0, x1 - x0), s), ())
            old = padded.get(layer, sizes)
            padded[layer] = tuple(max(a, b) for a, b in zip(old, sizes, strict=True))
        parts = [
            self._process_crop(image, box, layer, orig_size, padded[layer])
            for box, layer in zip(crop_boxes, layer_idxs, strict=True)
        ]
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "masks"}
        crop_masks = [m for p in parts for m in p["masks"]]
        order = np.arange(len(crop_masks))
        if len(crop_boxes) > 1 and len(crop_masks):
            cb = data["crop_boxes"].astype(np.float32)
            scores = np.float32(1.0) / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            order = au.batched_nms(
                data["boxes"], scores, np.zeros(len(order), np.int64), self.crop_nms_thresh
            )
        data = {k: v[order] for k, v in data.items()}
        h, w = orig_size
        masks = np.zeros((len(order), h, w), bool)
        for j, i in enumerate(order):
            x0, y0, x1, y1 = data["crop_boxes"][j]
            masks[j, y0:y1, x0:x1] = crop_masks[i]
        data["masks"] = masks
        return data

    def _process_crop(self, image, crop_box, layer_idx, orig_size, padded) -> dict[str, np.ndarray]:
        """Kept masks of one crop. padded = (Hp, Wp, Hr, Wr): the padded crop size and the extent
        of the first resize (see `_decode_chunk`)."""
        model, params = self.model, self.params
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = (int(cropped.shape[0]), int(cropped.shape[1]))
        # A crop of the image `generate` checked: the unchecked pre-processing and encoder.
        image_in, input_size = transforms.preprocess_image(cropped, model.config.image_size)
        emb = F.encode_images(model, params, jnp.asarray(image_in[None]))
        padded_size, resized = padded[:2], padded[2:]
        taps = transforms.resize_taps(input_size, crop_size, padded_size)

        # Grid points in the crop frame (float64, as the official code), then the input frame.
        points = self.point_grids[layer_idx] * np.array(crop_size, np.float64)[None, ::-1]
        model_points = _input_frame_points(
            transforms.apply_coords(points, crop_size, model.config.image_size)
        )
        chunk = self.points_per_batch
        n_chunks = -(-len(points) // chunk)
        valid = np.arange(n_chunks * chunk) < len(points)
        keep, num_kept, iou, stability, boxes = _score_grid(
            model,
            params,
            emb,
            _chunked(model_points, chunk, n_chunks),
            valid.reshape(n_chunks, chunk),
            taps,
            np.asarray(crop_box, np.int32),
            np.asarray([0, 0, orig_size[1], orig_size[0]], np.int32),
            self._settings(),
            resized=resized,
        )
        keep = np.asarray(keep)[: int(num_kept)]
        c = iou.shape[0] // (n_chunks * chunk)
        point_idx, channel = keep // c, keep % c
        masks = self._masks_of(emb, model_points, point_idx, channel, taps, padded)
        offset = np.array([x0, y0, x0, y0])
        return {
            "masks": masks[:, : crop_size[0], : crop_size[1]],
            "boxes": np.asarray(boxes)[keep].astype(np.int64) + offset,
            "iou_preds": np.asarray(iou)[keep],
            "stability_score": np.asarray(stability)[keep],
            "points": au.uncrop_points(points[point_idx], crop_box),
            "crop_boxes": np.tile(np.asarray(crop_box, np.int64), (len(keep), 1)),
        }

    def _masks_of(self, emb, model_points, point_idx, channel, taps, padded):
        """bool (K, Hp, Wp) masks of the kept (point, channel) pairs (crop frame, padded)."""
        h, w = padded[:2]
        k = len(point_idx)
        if k == 0:
            return np.zeros((0, h, w), bool)
        chunk = self.points_per_batch
        n_chunks = bucket_size(-(-k // chunk))  # few compiled versions
        packed = _kept_masks(
            self.model,
            self.params,
            emb,
            _chunked(model_points[point_idx], chunk, n_chunks),
            _chunked(channel.astype(np.int32), chunk, n_chunks),
            taps,
            resized=padded[2:],
        )
        packed = np.asarray(packed).reshape(n_chunks * chunk, -1)[:k]
        return np.unpackbits(packed, axis=-1, count=h * w).reshape(k, h, w).astype(bool)

    @staticmethod
    def postprocess_small_regions(
        data: dict[str, np.ndarray], min_area: int, nms_thresh: float
    ) -> dict[str, np.ndarray]:
        """Fills holes and removes islands smaller than min_area in every mask, then reruns box
        NMS preferring unchanged masks (official order and semantics). Returns a new dict."""
        masks = data["masks"]
        if len(masks) == 0:
            return data
        new_masks = np.empty_like(masks)
        scores = np.zeros(len(masks), np.float32)
        for i, mask in enumerate(masks):
            mask, changed_holes = au.remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = au.remove_small_regions(mask, min_area, mode="islands")
            new_masks[i] = mask
            scores[i] = float(not (changed_holes or changed_islands))
        boxes = np.asarray(au.batched_mask_to_box(new_masks)).astype(np.int64)
        keep = au.batched_nms(boxes, scores, np.zeros(len(masks), np.int64), nms_thresh)
        out = {k: v[keep] for k, v in data.items()}
        out["masks"] = new_masks[keep]
        out["boxes"] = np.where((scores[keep] == 0.0)[:, None], boxes[keep], out["boxes"])
        return out
