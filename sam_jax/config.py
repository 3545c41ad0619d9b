"""Architecture configs for SAM: the released sizes and any custom size.

A `SamConfig` holds only the architecture (what the weights mean). Runtime choices such as the
compute dtype or the attention kernel are arguments of `sam_jax.modeling.build_sam`.

The image encoder is a seam: `encoder_type` names it ("vit": SAM's ViTDet encoder, fields
`encoder_*`, `window_size`, `mlp_ratio`; "tiny_vit": MobileSAM's TinyViT, fields `tiny_vit_*`).
Every encoder maps the normalised (B, S, S, 3) image to the (B, g, g, prompt_embed_dim)
embedding, so the prompt encoder, the mask decoder and everything above them are shared; the
fields of the other encoder are ignored (and kept at their defaults).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """SAM architecture.

    Attributes mirror the constructor arguments of the official `build_sam` functions.
    """

    # Which image encoder (see ENCODER_TYPES); the fields below it describe that encoder.
    encoder_type: str = "vit"
    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    # TinyViT (MobileSAM's encoder, encoder_type="tiny_vit"): four stages, the first of MBConv
    # blocks, the others of windowed-attention blocks; 4x patch embedding, 2x merges.
    tiny_vit_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_vit_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_vit_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_vit_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tiny_vit_mlp_ratio: float = 4.0
    tiny_vit_mbconv_expand_ratio: float = 4.0
    tiny_vit_local_conv_size: int = 3
    # Prompt encoder and mask decoder.
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # LayerNorm epsilons where other SAM implementations differ from the official values kept
    # here (transformers reads them from its config.json: 1e-6 for its decoder blocks).
    prompt_layer_norm_eps: float = 1e-6  # the mask prompt's downscaling LayerNorm2d
    decoder_layer_norm_eps: float = 1e-5  # the two-way transformer blocks' norm1..norm4
    # Training-only (no effect at inference): drop path, and the std of the prompt encoder's random
    # Fourier matrix at random init (a fixed buffer; 1.0 as official, checkpoints carry its value).
    drop_path_rate: float = 0.0
    pe_scale: float = 1.0
    # Text prompts (SAM paper 7.5, D.5): the width of the CLIP embeddings the prompt encoder
    # projects into one more sparse token (0: no text path, as every released SAM), and the CLIP
    # checkpoint those embeddings come from (a transformers CLIPModel folder or Hub id; what the
    # projection's weights mean, and what `SamPredictor.predict(text=...)` loads by default).
    text_embed_dim: int = 0
    text_encoder: str = ""

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        problems = []
        if self.encoder_type not in ENCODER_TYPES:
            problems.append(
                f"encoder_type {self.encoder_type!r} is not one of {sorted(ENCODER_TYPES)}"
            )
        elif self.encoder_type == "tiny_vit":
            problems += _tiny_vit_problems(self)
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            problems.append(
                f"image_size {self.image_size} must be a positive multiple of "
                f"patch_size {self.patch_size}"
            )
        if self.encoder_num_heads <= 0 or self.encoder_embed_dim % max(self.encoder_num_heads, 1):
            problems.append(
                f"encoder_embed_dim {self.encoder_embed_dim} must be divisible by "
                f"encoder_num_heads {self.encoder_num_heads}"
            )
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            problems.append(f"global attention indexes {bad} outside 0..{self.encoder_depth - 1}")
        if self.window_size < 0:
            problems.append(f"window_size must be >= 0, got {self.window_size}")
        if self.text_embed_dim < 0:
            problems.append("text_embed_dim must be >= 0 (0: no text path)")
        if self.prompt_embed_dim % self.decoder_num_heads:
            problems.append("prompt_embed_dim must be divisible by decoder_num_heads")
        if problems:
            raise ValueError("invalid SamConfig: " + "; ".join(problems))

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for 1024 / 16)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (256 for SAM)."""
        return 4 * self.embedding_size

    @property
    def encoder_head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_num_heads

    def replace(self, **changes: Any) -> SamConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SamConfig fields: {unknown}")
        return cls(**dict(d))


# Which fields hold tuples (JSON gives lists back).
_TUPLE_FIELDS = (
    "encoder_global_attn_indexes",
    "tiny_vit_embed_dims",
    "tiny_vit_depths",
    "tiny_vit_num_heads",
    "tiny_vit_window_sizes",
)
# The image encoders a SamConfig can name, and what each is.
ENCODER_TYPES = {
    "vit": "SAM's ViTDet image encoder (vit_b, vit_l, vit_h)",
    "tiny_vit": "MobileSAM's TinyViT image encoder (vit_t)",
}


def _tiny_vit_problems(c: SamConfig) -> list[str]:
    problems = []
    lengths = {
        len(c.tiny_vit_embed_dims),
        len(c.tiny_vit_depths),
        len(c.tiny_vit_num_heads),
        len(c.tiny_vit_window_sizes),
    }
    if lengths != {4}:
        problems.append("tiny_vit_embed_dims, _depths, _num_heads and _window_sizes need 4 stages")
        return problems
    for dim, heads in zip(c.tiny_vit_embed_dims[1:], c.tiny_vit_num_heads[1:], strict=True):
        if heads <= 0 or dim % heads:
            problems.append(f"tiny_vit stage dim {dim} is not divisible by {heads} heads")
    # 4x patch embedding, then 2x merges after stages 0 and 1 (the last merge keeps the size).
    if c.patch_size != 16:
        problems.append(
            f"a tiny_vit encoder has patch_size 16 (4x embedding, 2 merges), got {c.patch_size}"
        )
    return problems


VIT_B = SamConfig()
VIT_L = SamConfig(
    encoder_embed_dim=1024,
    encoder_depth=24,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(5, 11, 17, 23),
)
VIT_H = SamConfig(
    encoder_embed_dim=1280,
    encoder_depth=32,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(7, 15, 23, 31),
)

# MobileSAM (Zhang et al. 2023): TinyViT-5M's encoder with SAM's neck, SAM's prompt encoder and
# mask decoder (the official `build_sam_vit_t`).
VIT_T = SamConfig(encoder_type="tiny_vit")

MODEL_TYPES = {"vit_b": VIT_B, "vit_l": VIT_L, "vit_h": VIT_H, "vit_t": VIT_T, "default": VIT_H}


def get_config(name: str, **overrides: Any) -> SamConfig:
    """Returns the config of a released model ("vit_b", "vit_l", "vit_h", "vit_t"), with
    overrides."""
    if name not in MODEL_TYPES:
        raise ValueError(f"unknown model type {name!r}; expected one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[name].replace(**overrides)


def tiny_config(**overrides: Any) -> SamConfig:
    """A small SAM for tests and CPU experiments (128x128 images, 8x8 embedding grid)."""
    base = SamConfig(
        image_size=128,
        patch_size=16,
        encoder_embed_dim=64,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        window_size=3,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_mlp_dim=64,
        decoder_num_heads=4,
        iou_head_hidden_dim=32,
    )
    return base.replace(**overrides)
