"""Tests of model init for training: MAE checkpoint mapping and SAM checkpoint loading."""

import jax
import ml_collections
import numpy as np
import pytest
import torch

from sam_jax.config import tiny_config
from sam_jax.modeling import build_sam
from sam_jax.training import initialization


def _mae_state_dict(config, mae_patch, mae_grid, seed=0):
    """A fake official MAE ViT state_dict (with a cls slot and MAE decoder keys to ignore)."""
    g = torch.Generator().manual_seed(seed)
    e, hidden = config.encoder_embed_dim, int(config.encoder_embed_dim * config.mlp_ratio)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, e),
        "pos_embed": r(1, 1 + mae_grid * mae_grid, e),
        "patch_embed.proj.weight": r(e, 3, mae_patch, mae_patch),
        "patch_embed.proj.bias": r(e),
        "norm.weight": r(e),
        "norm.bias": r(e),
        "decoder_embed.weight": r(16, e),
        "mask_token": r(1, 1, 16),
    }
    for i in range(config.encoder_depth):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": r(e),
            b + "norm1.bias": r(e),
            b + "attn.qkv.weight": r(3 * e, e),
            b + "attn.qkv.bias": r(3 * e),
            b + "attn.proj.weight": r(e, e),
            b + "attn.proj.bias": r(e),
            b + "norm2.weight": r(e),
            b + "norm2.bias": r(e),
            b + "mlp.fc1.weight": r(hidden, e),
            b + "mlp.fc1.bias": r(hidden),
            b + "mlp.fc2.weight": r(e, hidden),
            b + "mlp.fc2.bias": r(e),
        }
    return sd


def test_mae_checkpoint_is_mapped_into_the_encoder(tmp_path):
    config = tiny_config()  # 128 px, patch 16 -> 8x8 grid
    sd = _mae_state_dict(config, mae_patch=14, mae_grid=4)
    path = tmp_path / "mae.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    model = build_sam(config)
    init = jax.device_get(model.init_params(jax.random.key(0)))
    params = initialization.load_mae_params(str(path), config, init)

    enc = params["image_encoder"]
    b1 = enc["blocks_1"]
    np.testing.assert_array_equal(b1["mlp"]["lin1"]["kernel"], sd["blocks.1.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(b1["attn"]["qkv"]["bias"], sd["blocks.1.attn.qkv.bias"])
    np.testing.assert_array_equal(b1["norm2"]["scale"], sd["blocks.1.norm2.weight"])
    # pos_embed: the cls slot dropped, 4x4 resized to the 8x8 grid.
    assert enc["pos_embed"].shape == (1, 8, 8, config.encoder_embed_dim)
    grid = sd["pos_embed"][0, 1:].reshape(4, 4, -1).numpy()
    np.testing.assert_allclose(enc["pos_embed"][0].mean((0, 1)), grid.mean((0, 1)), atol=0.1)
    # Patch kernel 14x14 -> 16x16 (torch (out, in, kh, kw) -> flax (kh, kw, in, out)).
    assert enc["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, config.encoder_embed_dim)
    # Untouched: relative positions, the neck, prompt encoder and decoder keep their init.
    np.testing.assert_array_equal(
        enc["neck_0"]["kernel"], init["image_encoder"]["neck_0"]["kernel"]
    )
    np.testing.assert_array_equal(
        b1["attn"]["rel_pos_h"], init["image_encoder"]["blocks_1"]["attn"]["rel_pos_h"]
    )
    jax.tree.map(np.testing.assert_array_equal, params["mask_decoder"], init["mask_decoder"])
    assert jax.tree.structure(params) == jax.tree.structure(init)


def test_mae_depth_mismatch_is_reported(tmp_path):
    config = tiny_config()
    sd = _mae_state_dict(config.replace(encoder_depth=3), mae_patch=16, mae_grid=8)
    path = tmp_path / "mae3.pth"
    torch.save({"model": sd}, path)
    init = jax.device_get(build_sam(config).init_params(jax.random.key(0)))
    with pytest.raises(ValueError, match="3 blocks"):
        initialization.load_mae_params(str(path), config, init)


def test_sam_init_from_converted_checkpoint(tmp_path):
    from sam_jax.checkpoints import save_converted

    config = tiny_config()
    params = jax.device_get(build_sam(config).init_params(jax.random.key(3)))
    save_converted(tmp_path / "sam", config, params)
    exp = ml_collections.ConfigDict(
        {
            "model": "vit_h",
            "model_overrides": {"drop_path_rate": 0.2},
            "seed": 0,
            "init": {"type": "sam", "path": str(tmp_path / "sam")},
        }
    )
    sam_config = initialization.sam_config_from(exp)
    assert sam_config == config.replace(drop_path_rate=0.2)  # architecture from the checkpoint
    loaded = initialization.initial_params(exp, sam_config, build_sam(sam_config))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    exp.init.type = "imagenet"
    with pytest.raises(ValueError, match="init.type"):
        initialization.initial_params(exp, sam_config, None)
