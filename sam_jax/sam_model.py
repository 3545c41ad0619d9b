"""`SamModel` and `sam_model_registry`: the official `Sam` object and its loading line.

A `SamModel` is a Flax `Sam` module bound to its params, with the parts of the official
`segment_anything.modeling.Sam` interface that user code touches, so that code written for Meta's
package ports by changing the import and the loading line:

    sam = sam_jax.sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")  # or converted
    predictor = sam_jax.SamPredictor(sam)
    generator = sam_jax.SamAutomaticMaskGenerator(sam, points_per_side=32)
    outputs = sam(batched_input, multimask_output=False)  # the official Sam.forward

`SamModel(*sam_jax.load(path))` binds any checkpoint (custom sizes, bfloat16, cuDNN attention).
Inputs may be numpy or jax arrays (or torch tensors when torch is imported); outputs are numpy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import functional as F
from sam_jax import transforms
from sam_jax.checkpoints.load import load
from sam_jax.config import PIXEL_MEAN, PIXEL_STD, SamConfig, get_config
from sam_jax.errors import one_line
from sam_jax.modeling.sam import Sam, build_sam
from sam_jax.prompts import DEFAULT_MIN_BUCKET, ImagePrompts, check_frame

# `sam_model_registry[...](checkpoint=None)` initialises random weights from this PRNG seed (the
# official registry builds torch's default random init; ours is reproducible).
RANDOM_INIT_SEED = 0
RECORD_KEYS = ("image", "original_size", "point_coords", "point_labels", "boxes", "mask_inputs")


def device_of(x: jax.Array) -> jax.Device:
    """The device holding a jax array (the lowest-id one when it is sharded over several)."""
    devices = x.devices()
    return next(iter(devices)) if len(devices) == 1 else min(devices, key=lambda d: d.id)


def resolve_device(device) -> jax.Device:
    """A jax device from a jax.Device, a platform name ("cpu", "gpu", "cuda", "tpu", with an
    optional ":index") or a torch.device (read by its name; torch is not imported)."""
    if isinstance(device, jax.Device):
        return device
    name = str(device).strip().lower()
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not available to jax: {one_line(e)}") from None
    try:
        i = int(index) if index else 0
    except ValueError:
        raise ValueError(f"bad device {device!r}: expected e.g. 'cuda:0' or a jax.Device") from None
    if not 0 <= i < len(devices):
        raise ValueError(f"device {device!r}: jax sees {len(devices)} {platform} device(s)")
    return devices[i]


class ImageEncoderInfo(NamedTuple):
    """What code written for the official model reads of `sam.image_encoder`."""

    img_size: int


@dataclasses.dataclass(frozen=True, eq=False)
class SamModel:
    """A Flax `Sam` module (`model`) bound to its `params`: the official `Sam` object.

    `sam(batched_input, multimask_output)` is the official `Sam.forward`; `SamPredictor(sam)` and
    `SamAutomaticMaskGenerator(sam, ...)` take it. Params go to the default jax device once.
    """

    model: Sam
    params: Mapping[str, Any] = dataclasses.field(repr=False)

    mask_threshold: ClassVar[float] = 0.0
    image_format: ClassVar[str] = "RGB"

    def __post_init__(self):
        if not isinstance(self.model, Sam):
            raise TypeError(
                f"SamModel takes a sam_jax.modeling.Sam module, got {type(self.model).__name__}"
            )
        if not isinstance(self.params, Mapping):
            raise TypeError(f"SamModel params must be a dict, got {type(self.params).__name__}")
        params = jax.tree_util.tree_map(
            lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), self.params
        )
        object.__setattr__(self, "params", params)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SamModel(image_size={c.image_size}, encoder_embed_dim={c.encoder_embed_dim}, "
            f"encoder_depth={c.encoder_depth}, dtype={jnp.dtype(self.model.dtype).name}, "
            f"device={self.device})"
        )

    @property
    def config(self) -> SamConfig:
        return self.model.config

    @property
    def image_encoder(self) -> ImageEncoderInfo:
        """`sam.image_encoder.img_size` (the model input size S), as the official model."""
        return ImageEncoderInfo(img_size=self.config.image_size)

    @property
    def device(self) -> jax.Device:
        """The jax device holding the params."""
        return device_of(jax.tree_util.tree_leaves(self.params)[0])

    def to(self, device=None) -> SamModel:
        """The model with its params on `device` (a jax.Device, "cpu", "cuda", "cuda:1", "tpu" or
        a torch.device). Returns self when they are there already (the usual case: jax puts them
        on the default device, the GPU or TPU when there is one); otherwise a new SamModel, so
        write `sam = sam.to(device)`. A device jax does not have is a ValueError."""
        if device is None:
            return self
        target = resolve_device(device)
        leaves = jax.tree_util.tree_leaves(self.params)
        if all(leaf.devices() == {target} for leaf in leaves):
            return self
        return dataclasses.replace(self, params=jax.device_put(self.params, target))

    # ------------------------------------------------------------------ official Sam methods

    def __call__(self, batched_input: Sequence[Mapping[str, Any]], multimask_output: bool):
        """The official `Sam.forward`: masks end to end for a list of images and their prompts.

        Each record (dict): 'image' (3, h, w) already resized (`ResizeLongestSide.apply_image`,
        channels first; uint8 or float), 'original_size' (H, W) before resizing, and optionally
        'point_coords' (B, N, 2) with 'point_labels' (B, N), 'boxes' (B, 4) (both in the resized
        input frame: `apply_coords(_torch)` / `apply_boxes(_torch)`), 'mask_inputs'
        (B, 1, m, m) logits. A record without prompts gets one prompt-free mask (B = 1), as the
        official model. Returns one dict per record: 'masks' bool (B, C, H, W) at the original
        size, 'iou_predictions' (B, C), 'low_res_logits' (B, C, m, m); numpy arrays.
        """
        if (
            isinstance(batched_input, (Mapping, str, bytes))
            or not isinstance(batched_input, Sequence)
            or not batched_input
        ):
            raise TypeError("batched_input must be a non-empty list of dicts, one per image")
        s, m = self.config.image_size, self.config.low_res_size
        images, records = [], []
        for i, rec in enumerate(batched_input):
            name = f"batched_input[{i}]"
            if not isinstance(rec, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(rec).__name__}")
            unknown = sorted(set(rec) - set(RECORD_KEYS))
            if unknown:
                raise ValueError(f"{name} has unknown keys {unknown}; expected {RECORD_KEYS}")
            missing = [k for k in RECORD_KEYS[:2] if k not in rec]
            if missing:
                raise ValueError(f"{name} needs {' and '.join(missing)}")
            hwc, original, input_size = transforms.check_resized_image(
                rec["image"], s, rec["original_size"], f"{name}['image']"
            )
            check_frame(rec.get("point_coords"), f"{name}['point_coords']", s)
            check_frame(rec.get("boxes"), f"{name}['boxes']", s)
            prompts = ImagePrompts.batch(
                m,
                rec.get("point_coords"),
                rec.get("point_labels"),
                rec.get("boxes"),
                rec.get("mask_inputs"),
                name,
                input_frame=True,
                allow_none=True,
            )
            images.append(transforms.normalize_and_pad(hwc, s))
            records.append((original, input_size, prompts))
        # One encoder call for all images (as the official model), then the decoder per image.
        emb = F.encode_images(self.model, self.params, jnp.asarray(np.stack(images)))
        outputs = []
        for i, (original, input_size, prompts) in enumerate(records):
            masks, iou, low_res = F.decode_image_prompts(
                self.model,
                self.params,
                emb[i : i + 1],
                prompts,
                original,
                input_size,
                multimask_output,
                False,
                DEFAULT_MIN_BUCKET,
            )
            outputs.append({"masks": masks, "iou_predictions": iou, "low_res_logits": low_res})
        return outputs

    def preprocess(self, x) -> np.ndarray:
        """The official `Sam.preprocess`: (..., 3, h, w) resized image(s) -> normalised and
        zero-padded float32 (..., 3, S, S), channels first as the official one (our encoder,
        `functional.encode_images`, takes channels last: `transforms.normalize_and_pad`)."""
        x = np.asarray(transforms.to_host(x), np.float32)
        s = self.config.image_size
        if x.ndim < 3 or x.shape[-3] != 3 or not (0 < x.shape[-2] <= s and 0 < x.shape[-1] <= s):
            raise ValueError(f"preprocess takes (..., 3, h, w) with h, w <= {s}, got {x.shape}")
        mean = np.asarray(PIXEL_MEAN, np.float32)[:, None, None]
        std = np.asarray(PIXEL_STD, np.float32)[:, None, None]
        h, w = x.shape[-2:]
        out = np.zeros((*x.shape[:-2], s, s), np.float32)
        out[..., :h, :w] = (x - mean) / std
        return out

    def postprocess_masks(self, masks, input_size, original_size) -> np.ndarray:
        """The official `Sam.postprocess_masks`: low-res logits (..., m, m) -> float32 logits
        (..., H, W) at original_size (upsample, crop to input_size (h, w), resize)."""
        low_res = jnp.asarray(transforms.to_host(masks), jnp.float32)
        out = F.postprocess_masks(
            low_res, tuple(input_size), tuple(original_size), self.config.image_size
        )
        return np.asarray(out)


def unbind(model, params, who: str, allow_none: bool = False):
    """(module, params) from `who(sam)` with a SamModel or `who(model, params)` with a module."""
    if isinstance(model, SamModel):
        if params is not None:
            raise TypeError(
                f"{who}(sam) with a SamModel takes no params (they are sam.params): "
                f"pass the other options by keyword, e.g. points_per_side=32"
            )
        return model.model, model.params
    if model is None and allow_none:
        return None, params
    if model is None or params is None:
        raise TypeError(
            f"{who} takes a SamModel (sam_jax.sam_model_registry[...](checkpoint)) or a "
            f"Flax Sam module and its params: {who}(model, params)"
        )
    return model, params


def build_registered(model_type: str, checkpoint: str | os.PathLike | None = None) -> SamModel:
    """`sam_model_registry[model_type](checkpoint)`: any checkpoint `sam_jax.load` reads, whose
    architecture must be `model_type`'s; None builds random weights (seed RANDOM_INIT_SEED)."""
    if checkpoint is None:
        model = build_sam(get_config(model_type))
        return SamModel(model, model.init_params(jax.random.key(RANDOM_INIT_SEED)))
    return SamModel(*load(checkpoint, model_type=model_type))


def build_sam_vit_h(checkpoint=None) -> SamModel:
    return build_registered("vit_h", checkpoint)


def build_sam_vit_l(checkpoint=None) -> SamModel:
    return build_registered("vit_l", checkpoint)


def build_sam_vit_b(checkpoint=None) -> SamModel:
    return build_registered("vit_b", checkpoint)


# The official registry: the same keys ("default" is vit_h), a SamModel instead of a torch Sam.
sam_model_registry = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
}
