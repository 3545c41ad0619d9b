"""The official MobileSAM (PyPI `mobilesam-mirror`, byte-identical to ChaoningZhang/MobileSAM at
34bbbfd) built from a `SamConfig`, with perturbed random weights, for parity tests.

Every parameter and buffer is perturbed (BatchNorm statistics, LayerNorms, biases, attention
bias tables) so that a port that ignored any of them would fail. The official `TinyViT`
hard-codes a 64 x 64 embedding grid (`forward_features` views its tokens as (B, 64, 64, C)), so
it only runs at 1024 px; for smaller images `build_official_mobile_sam` replaces that one view
with the grid of the config (`_forward_features`, the official method with `64` -> g).
"""

from __future__ import annotations

import types

import numpy as np
import torch
from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer

from sam_jax.config import PIXEL_MEAN, PIXEL_STD, SamConfig


def _forward_features(self, x):
    """Official `TinyViT.forward_features` with the grid g = img_size // 16 instead of 64."""
    x = self.patch_embed(x)
    x = self.layers[0](x)
    for i in range(1, len(self.layers)):
        x = self.layers[i](x)
    b, _, c = x.size()
    g = self.img_size // 16
    x = x.view(b, g, g, c).permute(0, 3, 1, 2)
    return self.neck(x)


def official_tiny_vit(config: SamConfig) -> TinyViT:
    """The official TinyViT of `config` (as `build_sam_vit_t` builds it for vit_t)."""
    encoder = TinyViT(
        img_size=config.image_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=list(config.tiny_vit_embed_dims),
        depths=list(config.tiny_vit_depths),
        num_heads=list(config.tiny_vit_num_heads),
        window_sizes=list(config.tiny_vit_window_sizes),
        mlp_ratio=config.tiny_vit_mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=config.tiny_vit_mbconv_expand_ratio,
        local_conv_size=config.tiny_vit_local_conv_size,
        layer_lr_decay=0.8,
    )
    if config.image_size != 1024:
        encoder.forward_features = types.MethodType(_forward_features, encoder)
    return encoder


def build_official_mobile_sam(config: SamConfig, seed: int = 0, perturb: float = 0.05) -> Sam:
    """Official MobileSAM `Sam` of `config`, random weights perturbed everywhere, in eval mode
    (`eval()` after the perturbation: it rebuilds the attention bias caches `ab`)."""
    torch.manual_seed(seed)
    g = config.embedding_size
    d = config.prompt_embed_dim
    sam = Sam(
        image_encoder=official_tiny_vit(config),
        prompt_encoder=PromptEncoder(
            embed_dim=d,
            image_embedding_size=(g, g),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=d,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=d,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, t in sam.state_dict().items():
                if name.endswith(("pixel_mean", "pixel_std", "num_batches_tracked")):
                    continue
                noise = torch.randn(t.shape, generator=gen)
                if name.endswith("running_var"):  # positive, and far from 1
                    t.mul_(torch.exp(4 * perturb * noise))
                elif name.endswith("running_mean"):
                    t.add_(2 * perturb * noise)
                else:
                    t.add_(perturb * noise)
    return sam.eval()


def mobile_sam_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The official state_dict as numpy (float32; num_batches_tracked int64), without the
    pixel mean/std buffers."""
    out = {}
    for k, v in model.state_dict().items():
        if k in ("pixel_mean", "pixel_std"):
            continue
        v = v.detach().cpu().numpy()
        out[k] = v if v.dtype == np.int64 else v.astype(np.float32)
    return out
