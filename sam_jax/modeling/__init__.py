"""Flax Linen modules of SAM, one per part as in the official code."""

from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import NOT_A_POINT_LABEL, PAD_LABEL, PromptEncoder
from sam_jax.modeling.sam import BUFFER_PARAMS, Sam, build_image_encoder, build_sam
from sam_jax.modeling.transformer import TwoWayTransformer

__all__ = [
    "BUFFER_PARAMS",
    "ImageEncoderViT",
    "MaskDecoder",
    "NOT_A_POINT_LABEL",
    "PAD_LABEL",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "build_image_encoder",
    "build_sam",
]
