"""The SAM model: image encoder + prompt encoder + mask decoder (official `sam.py`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.config import SamConfig
from sam_jax.modeling.common import ATTENTION_IMPLS
from sam_jax.modeling.image_encoder import REMAT_POLICIES, ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from sam_jax.modeling.prompt_encoder import NOT_A_POINT_LABEL, PAD_LABEL, PromptEncoder
from sam_jax.modeling.tiny_vit import TinyViT

# Parameters that the official model keeps as (untrained) buffers.
BUFFER_PARAMS = (("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix"),)


def build_image_encoder(
    c: SamConfig, dtype: Any, attention_impl: str, remat_policy: str | None
) -> nn.Module:
    """The image encoder `c.encoder_type` names: normalised images (B, S, S, 3) -> embeddings
    (B, g, g, prompt_embed_dim). The one place that knows the encoder kinds (the seam)."""
    if c.encoder_type == "vit":
        return ImageEncoderViT(
            img_size=c.image_size,
            patch_size=c.patch_size,
            embed_dim=c.encoder_embed_dim,
            depth=c.encoder_depth,
            num_heads=c.encoder_num_heads,
            mlp_ratio=c.mlp_ratio,
            out_chans=c.prompt_embed_dim,
            window_size=c.window_size,
            global_attn_indexes=c.encoder_global_attn_indexes,
            drop_path_rate=c.drop_path_rate,
            dtype=dtype,
            attention_impl=attention_impl,
            remat_policy=remat_policy,
        )
    if c.encoder_type == "tiny_vit":
        return TinyViT(
            img_size=c.image_size,
            embed_dims=c.tiny_vit_embed_dims,
            depths=c.tiny_vit_depths,
            num_heads=c.tiny_vit_num_heads,
            window_sizes=c.tiny_vit_window_sizes,
            mlp_ratio=c.tiny_vit_mlp_ratio,
            mbconv_expand_ratio=c.tiny_vit_mbconv_expand_ratio,
            local_conv_size=c.tiny_vit_local_conv_size,
            out_chans=c.prompt_embed_dim,
            drop_path_rate=c.drop_path_rate,
            dtype=dtype,
            attention_impl=attention_impl,
            remat_policy=remat_policy,
        )
    raise ValueError(f"no image encoder for encoder_type {c.encoder_type!r}")


class Sam(nn.Module):
    """SAM. Use `encode` once per image and `decode` for any number of prompts.

    Attributes: config (architecture), dtype (compute dtype: float32 or bfloat16; params, LayerNorm
    and softmax stay float32), attention_impl ("xla" | "cudnn" | "auto"), remat_policy for the
    encoder blocks (None, "full", "dots_saveable", ...).
    """

    config: SamConfig
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str | None = None

    def setup(self):
        c = self.config
        g = c.embedding_size
        self.image_encoder = build_image_encoder(
            c, self.dtype, self.attention_impl, self.remat_policy
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=c.prompt_embed_dim,
            image_embedding_size=(g, g),
            input_image_size=(c.image_size, c.image_size),
            mask_in_chans=c.mask_in_chans,
            pe_scale=c.pe_scale,
            dtype=self.dtype,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=c.prompt_embed_dim,
            num_multimask_outputs=c.num_multimask_outputs,
            transformer_depth=c.decoder_depth,
            transformer_mlp_dim=c.decoder_mlp_dim,
            transformer_num_heads=c.decoder_num_heads,
            attention_downsample_rate=c.attention_downsample_rate,
            iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

    def encode(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
        """images (B, S, S, 3) normalised and padded -> embeddings (B, g, g, D) float32."""
        return self.image_encoder(images, deterministic)

    def decode(
        self,
        image_embeddings: jax.Array,
        points: jax.Array,
        labels: jax.Array,
        mask_input: jax.Array | None = None,
        has_mask: jax.Array | None = None,
        multimask_output: bool | None = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Decodes P prompts for each of B images.

        image_embeddings (B, g, g, D); points (B, P, N, 2) xy in the S x S input frame; labels
        (B, P, N) int (1 fg, 0 bg, -1 not-a-point, 2/3 box corners, PAD_LABEL ignored);
        mask_input (B, P, 4g, 4g) logits or None; has_mask (B, P) bool or None.
        Returns low-res mask logits (B, P, K, 4g, 4g) and IoU predictions (B, P, K), float32,
        with K = num_multimask_outputs if multimask_output else 1; multimask_output=None returns
        all num_multimask_outputs + 1 outputs (index 0 is the single-mask output), in one pass.

        Shapes are not checked here: callers pass the shapes above (`functional.decode_prompts`
        checks them for users).
        """
        b, p, n = labels.shape
        g, d = self.config.embedding_size, self.config.prompt_embed_dim
        sparse, token_mask = self.prompt_encoder.embed_points(points, labels)
        dense = self.prompt_encoder.dense_embeddings((b, p), mask_input, has_mask)
        src = jnp.broadcast_to(image_embeddings[:, None], (b, p, g, g, d))
        masks, iou = self.mask_decoder(
            src.reshape(b * p, g, g, d),
            self.prompt_encoder.get_dense_pe(),
            sparse.reshape(b * p, n, d),
            token_mask.reshape(b * p, n),
            dense.reshape(b * p, g, g, d),
            multimask_output,
        )
        return masks.reshape(b, p, *masks.shape[1:]), iou.reshape(b, p, -1)

    def __call__(self, images, points, labels, mask_input=None, multimask_output=True):
        """Encode + decode in one call (used to initialise all parameters)."""
        emb = self.encode(images)
        return self.decode(emb, points, labels, mask_input, None, multimask_output)

    def init_params(self, rng: jax.Array) -> dict:
        """Initialises a float32 params pytree without running the model."""
        s, m = self.config.image_size, self.config.low_res_size
        shapes = (
            jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 2, 2), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, 2), jnp.int32),
            jax.ShapeDtypeStruct((1, 1, m, m), jnp.float32),
        )
        return jax.jit(lambda r: self.lazy_init(r, *shapes)["params"])(rng)

    def param_shapes(self) -> dict:
        """The params pytree as jax.ShapeDtypeStruct leaves (no allocation)."""
        return jax.eval_shape(self.init_params, jax.random.key(0))


def build_sam(
    config: SamConfig,
    dtype: Any = jnp.float32,
    attention_impl: str = "xla",
    remat_policy: str | None = None,
) -> Sam:
    """Builds the SAM module for a config; see `Sam` for the runtime options."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if remat_policy is not None and remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be None or one of {sorted(REMAT_POLICIES)}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return Sam(config, dtype=dtype, attention_impl=attention_impl, remat_policy=remat_policy)


def check_prompts(
    point_coords=None, point_labels=None, boxes=None, pad_to: int | None = None
) -> int | None:
    """Checks the prompt arrays of P prompts on one image; returns their token count T (None
    without points and boxes).

    point_coords (P, N, 2) with point_labels (P, N), and/or boxes (P, 4), agreeing on P;
    pad_to, if given, at least T. Only shapes are checked (values are left as given).
    """
    num = tokens = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        pc, pl = np.shape(point_coords), np.shape(point_labels)
        if len(pc) != 3 or pc[-1] != 2 or pl != pc[:2]:
            raise ValueError(
                f"point_coords must be (P, N, 2) and point_labels (P, N); got {pc} and {pl}"
            )
        num, tokens = pc[0], pc[1] + (boxes is None)
    elif point_labels is not None:
        raise ValueError("point_labels given without point_coords")
    if boxes is not None:
        bx = np.shape(boxes)
        if len(bx) != 2 or bx[-1] != 4:
            raise ValueError(f"boxes must be (P, 4), got {bx}")
        if num is not None and bx[0] != num:
            raise ValueError(f"{bx[0]} boxes for {num} point prompts")
        num, tokens = bx[0], (tokens or 0) + 2
    if tokens is not None and pad_to is not None and pad_to < tokens:
        raise ValueError(f"pad_to={pad_to} is smaller than the {tokens} prompt tokens")
    return tokens


def pack_prompts(
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Builds decoder prompt tokens in the official order, for P prompts of one image.

    point_coords (P, N, 2) and point_labels (P, N), boxes (P, 4) XYXY, all in the input frame.
    Returns points (P, T, 2) float32 and labels (P, T) int32 with T = N (+1 padding point when there
    is no box, as the official prompt encoder) (+2 box corners), padded with PAD_LABEL to `pad_to`.
    """
    if check_prompts(point_coords, point_labels, boxes, pad_to) is None:
        raise ValueError("pack_prompts needs point_coords or boxes")
    return pack_prompt_tokens(point_coords, point_labels, boxes, pad_to)


def pack_prompt_tokens(point_coords, point_labels, boxes, pad_to=None):
    """`pack_prompts` without checks: the arguments satisfy `check_prompts` and are not both
    None (internal callers check at their public boundary)."""
    parts_xy, parts_lab = [], []
    num = None
    if point_coords is not None:
        pc = np.asarray(point_coords, np.float32)
        num = pc.shape[0]
        parts_xy.append(pc)
        parts_lab.append(np.asarray(point_labels, np.int32))
        if boxes is None:
            parts_xy.append(np.zeros((num, 1, 2), np.float32))
            parts_lab.append(np.full((num, 1), NOT_A_POINT_LABEL, np.int32))
    if boxes is not None:
        bx = np.asarray(boxes, np.float32)
        num = bx.shape[0]
        parts_xy.append(bx.reshape(num, 2, 2))
        parts_lab.append(np.tile(np.array([[2, 3]], np.int32), (num, 1)))
    xy = np.concatenate(parts_xy, axis=1)
    lab = np.concatenate(parts_lab, axis=1)
    if pad_to is not None and pad_to > xy.shape[1]:
        extra = pad_to - xy.shape[1]
        xy = np.concatenate([xy, np.zeros((num, extra, 2), np.float32)], axis=1)
        lab = np.concatenate([lab, np.full((num, extra), PAD_LABEL, np.int32)], axis=1)
    return xy, lab
