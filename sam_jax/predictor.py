"""SamPredictor: the official `segment_anything.SamPredictor` API on top of `sam_jax.functional`.

Set an image once (the image encoder runs once), then predict masks for any number of prompts.
Inputs and outputs are numpy. Prompts are checked into `sam_jax.prompts.ImagePrompts` (their one
home: frames, checks, packing, buckets) and decoded by `functional.decode_image_prompts`, the one
decode path of an image's prompts, which pads token and prompt counts to power-of-two buckets so
that a changing number of points or prompts compiles only a few decoder versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import tiling, transforms
from sam_jax.errors import NoTextPathError, check_bool
from sam_jax.prompts import (
    DEFAULT_MIN_BUCKET,
    Box,
    ImagePrompts,
    Point,
    ResizeLongestSide,
    check_frame,
    default_multimask,
    refuse_resized,
)
from sam_jax.sam_model import device_of, unbind
from sam_jax.text import TextEncoder, check_text_path, load_text_encoder
from sam_jax.transforms import to_host


class SamPredictor:
    """Official-style predictor: `set_image` once, then `predict` / `predict_batch` /
    `predict_torch`.

    `SamPredictor(sam)` with a `SamModel` (from `sam_model_registry`), or `SamPredictor(model,
    params)` with a `sam_jax.modeling.Sam` (from `build_sam` or `sam_jax.load`) and its params.
    min_batch_bucket: `predict_batch` / `predict_torch` pad the number of prompts B to a power of
    two of at least this (padded rows are dropped from the outputs), so that batches of 1..8
    prompts share one compiled version; `predict` (one prompt) is not padded.

    Tiled mode (micro_sam's): with tile_shape and halo ((h, w) pixels, `sam_jax.tiling`),
    `set_image` encodes every tile-with-halo separately (`functional.encode_image_tiled`), and
    each prompt (points and/or box, in full-image pixels) is decoded in the tile that holds it
    with the most margin (`tiling.choose_tiles`; `tile_ids` holds the last call's choices).
    Masks come back at the full (H, W), False (logits -inf) outside the chosen tile; iou is that
    tile's; low_res_masks are in the chosen tile's frame (its tile-with-halo resized), so pass them
    back as mask_input only with prompts decoded in the same tile. A prompt needs a point or a
    box; `predict_torch` and `set_torch_image` (resized-frame inputs) are refused. An image
    within one tile gives exactly the untiled results.

    Text prompts (a SAM trained with a text path, `docs/text_prompts.md`): `predict(text=...)`,
    `predict_batch(texts=...)`. text_encoder: a `sam_jax.text.TextEncoder`, or a CLIP folder or
    Hub id; by default the CLIP the model's config names (`text_encoder`), loaded at the first
    text prompt. A model without a text path refuses text prompts (NoTextPathError, one line).
    """

    def __init__(
        self,
        model,
        params=None,
        min_batch_bucket: int = DEFAULT_MIN_BUCKET,
        *,
        tile_shape=None,
        halo=None,
        text_encoder: TextEncoder | str | None = None,
    ):
        model, params = unbind(model, params, "SamPredictor")
        self.model = model
        self._text_encoder = text_encoder
        self.min_batch_bucket = int(min_batch_bucket)
        self.tiling = tiling.check_tiling(tile_shape, halo)  # None: untiled
        # Host (numpy) leaves go to the device once, not on every call.
        self.params = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params
        )
        self.image_size = model.config.image_size
        self.low_res_size = model.config.low_res_size
        self.transform = ResizeLongestSide(self.image_size)
        self.reset_image()

    @property
    def device(self) -> jax.Device:
        """The jax device of the image embedding (before `set_image`, that of the params): where
        to put inputs, e.g. `jnp.asarray(boxes, device=predictor.device)`."""
        if self.features is not None:
            return device_of(self.features)
        if self.tiles is not None:
            return device_of(self.tiles.features[0])
        return device_of(jax.tree_util.tree_leaves(self.params)[0])

    # ----------------------------------------------------------------------- image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of a uint8 (H, W, 3) image in "RGB" or "BGR" channel order."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = transforms.check_image(to_host(image))
        if image_format == "BGR":
            image = image[..., ::-1]
        if self.tiling is not None:
            grid = tiling.TileGrid.build(image.shape[:2], *self.tiling)
            tiles = F.encode_tiles(self.model, self.params, image, grid)
            self.reset_image()
            self.tiles, self.original_size, self.is_image_set = tiles, image.shape[:2], True
            return
        x, input_size = transforms.preprocess_image(image, self.image_size)
        emb = F.encode_images(self.model, self.params, jnp.asarray(x[None]))
        self.set_embedding(emb, image.shape[:2], input_size)

    def set_torch_image(self, transformed_image, original_image_size) -> None:
        """`set_image` of an image already resized (official `set_torch_image`): (1, 3, h, w)
        (numpy, jax or torch; uint8 or float values) from `transform.apply_image`, and the
        original (H, W)."""
        self._refuse_tiled("set_torch_image", "set_image")
        x = to_host(transformed_image)
        shape = np.shape(x)
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError(f"set_torch_image takes a (1, 3, h, w) image, got shape {shape}")
        hwc, original, input_size = transforms.check_resized_image(
            x[0], self.image_size, original_image_size, "transformed_image[0]"
        )
        x = transforms.normalize_and_pad(hwc, self.image_size)
        emb = F.encode_images(self.model, self.params, jnp.asarray(x[None]))
        self.set_embedding(emb, original, input_size)

    def set_embedding(self, features, original_size, input_size) -> None:
        """Makes `features` (1, g, g, D) the current image's embedding: that of an image of
        original (H, W) `original_size` resized to (h, w) `input_size` (from `set_image`, or a
        cache of embeddings such as the annotation tool's)."""
        g, d = self.model.config.embedding_size, self.model.config.prompt_embed_dim
        if tuple(np.shape(features)) != (1, g, g, d):
            raise ValueError(f"features must be (1, {g}, {g}, {d}), got {np.shape(features)}")
        self.reset_image()
        self.features = features
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.is_image_set = True

    def get_image_embedding(self):
        """The embedding of the current image: jax array (1, g, g, D) (NHWC); in tiled mode
        (T, g, g, D), one per tile of `tiles.grid` (row-major)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to get an embedding.")
        if self.tiles is not None:
            return jnp.concatenate(self.tiles.features)
        return self.features

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self.tiles = None  # tiling.TiledEmbeddings in tiled mode
        self.tile_ids = None  # (P,) tile of each prompt of the last tiled call

    # ----------------------------------------------------------------------- prompts

    @property
    def text_encoder(self) -> TextEncoder:
        """The CLIP of text prompts (loaded at first use; see the class docstring)."""
        check_text_path(self.model)
        enc = self._text_encoder
        if enc is None:
            enc = self.model.config.text_encoder
            if not enc:
                raise NoTextPathError(
                    "this checkpoint's config names no CLIP (text_encoder): pass "
                    "SamPredictor(..., text_encoder=CLIP_FOLDER_OR_HUB_ID)"
                )
        if not isinstance(enc, TextEncoder):
            enc = load_text_encoder(enc)
        check_text_path(self.model, enc)
        self._text_encoder = enc
        return enc

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Phrases -> the (P, E) CLIP text embeddings the text path takes."""
        check_text_path(self.model)
        return self.text_encoder.embed_texts(texts)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        text: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the current image (official `SamPredictor.predict`).

        point_coords (N, 2) xy pixels of the original image, point_labels (N,) in {0, 1}; box
        (4,) XYXY; mask_input (1, m, m) low-res logits from a previous call (float: a bool or
        uint8 mask is refused). Returns masks (C, H, W) (bool, or float32 logits with
        return_logits), iou (C,) and low-res logits (C, m, m); C = 3 or 1. multimask_output and
        return_logits must be bools (TypeError). As officially, points outside the image and a
        call without any prompt are accepted (the latter decodes the no-prompt embedding).
        text: a phrase (SAM's text prompt; alone, or with points, box and mask_input), for a
        model with a text path.
        """
        self._require_image()
        emb = None
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"text must be a string, got {type(text).__name__}")
            self._refuse_tiled_text()
            emb = self.embed_texts([text])[0]
        prompts = ImagePrompts.single(
            self.low_res_size, point_coords, point_labels, box, mask_input, emb
        )
        out = self._predict(prompts, 1, multimask_output, return_logits)
        return tuple(o[0] for o in out)

    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        texts: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts on the current image in one call, in original-image pixels like `predict`
        (`predict_torch` takes the same prompts in the resized input frame).

        point_coords (B, N, 2), point_labels (B, N); boxes (B, 4) XYXY; mask_input (B, 1, m, m)
        (or (B, m, m)); texts: B phrases (a model with a text path). Returns masks (B, C, H, W),
        iou (B, C), low-res logits (B, C, m, m).
        """
        self._require_image()
        refuse_resized(point_coords, "point_coords", "predict_batch")
        refuse_resized(boxes, "boxes", "predict_batch")
        emb = None
        if texts is not None:
            if isinstance(texts, str):
                raise TypeError("texts must be a list of strings (one per prompt), not a string")
            self._refuse_tiled_text()
            emb = self.embed_texts(list(texts)) if len(texts) else np.zeros((0, 1), np.float32)
        prompts = ImagePrompts.batch(
            self.low_res_size, point_coords, point_labels, boxes, mask_input, "predict_batch",
            text_embeddings=emb,
        )  # fmt: skip
        return self._predict(prompts, self.min_batch_bucket, multimask_output, return_logits)

    def predict_torch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The official `predict_torch`: B prompts ALREADY in the resized input frame.

        point_coords (B, N, 2) and boxes (B, 4) from `transform.apply_coords(_torch)` /
        `apply_boxes(_torch)` (or any array in that frame: longest image side = `image_size`);
        point_labels (B, N); mask_input (B, 1, m, m). numpy, jax or torch inputs. Returns numpy
        masks (B, C, H, W) at the original size, iou (B, C), low-res logits (B, C, m, m).
        """
        self._require_image()
        self._refuse_tiled("predict_torch", "predict_batch")
        check_frame(point_coords, "point_coords", self.image_size)
        check_frame(boxes, "boxes", self.image_size)
        prompts = ImagePrompts.batch(
            self.low_res_size,
            point_coords,
            point_labels,
            boxes,
            mask_input,
            "predict_torch",
            input_frame=True,
        )
        return self._predict(prompts, self.min_batch_bucket, multimask_output, return_logits)

    # ----------------------------------------------------------------------- internals

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def _refuse_tiled_text(self) -> None:
        if self.tiling is not None:
            raise ValueError("text prompts are not placed in a tile: use an untiled predictor")

    def _refuse_tiled(self, method: str, instead: str) -> None:
        if self.tiling is not None:
            raise ValueError(
                f"{method} takes resized-frame inputs, which tiled mode has not: use {instead}"
            )

    def _predict(self, prompts: ImagePrompts, min_bucket: int, multimask_output, logits):
        """`functional.decode_image_prompts` on the current image, or in tiled mode on each
        prompt's tile (`tiling.choose_tiles`), pasted back into the full image."""
        multimask_output = check_bool("multimask_output", multimask_output)
        logits = check_bool("return_logits", logits)
        if self.tiles is None:
            return F.decode_image_prompts(
                self.model,
                self.params,
                self.features,
                prompts,
                self.original_size,
                self.input_size,
                multimask_output,
                logits,
                min_bucket,
            )
        grid = self.tiles.grid
        self.tile_ids = tiling.choose_tiles(grid, prompts.point_coords, prompts.boxes)

        def predict_tile(t, rows, offset):
            return F.decode_image_prompts(
                self.model,
                self.params,
                self.tiles.features[t],
                prompts.select(rows, offset),
                grid.outer_shape(t),
                self.tiles.input_sizes[t],
                multimask_output,
                logits,
                min_bucket,
            )

        fill = -np.inf if logits else False
        return tiling.predict_in_tiles(grid, self.tile_ids, predict_tile, fill)


def segment(
    model,
    params,
    image: np.ndarray,
    points: Sequence[Point] = (),
    box: Box | None = None,
    multimask_output: bool | None = None,
    tile_shape=None,
    halo=None,
    text: str | None = None,
    text_encoder: TextEncoder | str | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(masks bool (C, H, W), predicted IoU (C,), multimask_output) for the prompts (tiled with
    tile_shape and halo, see `SamPredictor`); text: a phrase, for a SAM with a text path (its
    CLIP: text_encoder, else the one its config names)."""
    if not points and box is None and text is None:
        raise ValueError("give at least one point, a box or a text")
    if text is not None:
        check_text_path(model)  # before the image is encoded
    if multimask_output is None:
        multimask_output = default_multimask(points, box, text is not None)
    coords = np.array([p[:2] for p in points], np.float64) if points else None
    labels = np.array([p[2] for p in points], np.int32) if points else None
    predictor = SamPredictor(
        model, params, tile_shape=tile_shape, halo=halo, text_encoder=text_encoder
    )
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        box=None if box is None else np.array(box, np.float64),
        multimask_output=multimask_output,
        text=text,
    )
    return np.asarray(masks, bool), np.asarray(scores, np.float64), multimask_output
