"""The official PyTorch SAM built from a `SamConfig`, perturbed random weights, for parity tests.

The official model initialises relative-position tables, the absolute position embedding and the
norms to zeros and ones; `build_official` perturbs every tensor so that a port that ignored any of
them would fail the comparison.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from sam_jax.config import PIXEL_MEAN, PIXEL_STD, SamConfig


def build_official(config: SamConfig, seed: int = 0, perturb: float = 0.05) -> Sam:
    """Official `Sam` with the architecture of `config`, random weights, in eval mode."""
    torch.manual_seed(seed)
    g = config.embedding_size
    encoder = ImageEncoderViT(
        depth=config.encoder_depth,
        embed_dim=config.encoder_embed_dim,
        img_size=config.image_size,
        mlp_ratio=config.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.encoder_num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.encoder_global_attn_indexes,
        window_size=config.window_size,
        out_chans=config.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(g, g),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
            attention_downsample_rate=config.attention_downsample_rate,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    sam = Sam(
        encoder, prompt_encoder, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)
    )
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, t in sam.state_dict().items():
                if name.endswith(("pixel_mean", "pixel_std")):
                    continue
                t.add_(perturb * torch.randn(t.shape, generator=gen))
    return sam.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The official state_dict as float32 numpy arrays, without the pixel mean/std buffers."""
    return {
        k: v.detach().cpu().numpy().astype(np.float32)
        for k, v in model.state_dict().items()
        if k not in ("pixel_mean", "pixel_std")
    }


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
