"""Checkpoint mapping, config inference, conversion round trips and the orbax format."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l

from sam_jax import checkpoints
from sam_jax.checkpoints.mapping import (
    check_state_dict,
    expected_leaves,
    flatten_params,
    infer_config,
    params_to_state_dict,
    state_dict_to_params,
)
from sam_jax.config import get_config, tiny_config
from sam_jax.modeling import build_sam
from tests.torch_reference import build_official, state_dict_numpy

OFFICIAL_BUILDERS = {"vit_b": build_sam_vit_b, "vit_l": build_sam_vit_l, "vit_h": build_sam_vit_h}

# Custom sizes, built with the official classes: other image/patch size, window size, global
# blocks, depths, MLP ratio, decoder width/depth, number of masks, IoU head, attention downsampling.
CUSTOM = {
    "tiny": tiny_config(),
    "custom": tiny_config(
        image_size=96,
        patch_size=8,
        encoder_embed_dim=48,
        encoder_depth=5,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(0, 3),
        window_size=5,
        mlp_ratio=3.0,
        prompt_embed_dim=64,
        mask_in_chans=8,
        decoder_depth=1,
        decoder_mlp_dim=40,
        decoder_num_heads=8,
        attention_downsample_rate=4,
        num_multimask_outputs=2,
        iou_head_depth=2,
        iou_head_hidden_dim=24,
    ),
    # Window size 0: every block attends globally (official semantics).
    "all_global": tiny_config(window_size=0, encoder_global_attn_indexes=(0, 1)),
    # A window larger than the grid (the grid is padded to one window).
    "big_window": tiny_config(window_size=11, encoder_depth=3, encoder_global_attn_indexes=(2,)),
}


def _meta_state_dict(name):
    """Official state_dict on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        if name in OFFICIAL_BUILDERS:
            model = OFFICIAL_BUILDERS[name]()
        else:
            model = build_official(CUSTOM[name], perturb=0)
    return model.state_dict()


def _known_config(name):
    return get_config(name) if name in OFFICIAL_BUILDERS else CUSTOM[name]


ALL = [*OFFICIAL_BUILDERS, *CUSTOM]


@pytest.fixture(scope="module")
def vit_b():
    official = build_official(get_config("vit_b"), seed=1, perturb=0.05)
    return official, state_dict_numpy(official)


@pytest.mark.parametrize("name", ALL)
def test_expected_keys_and_shapes_equal_official(name):
    sd = _meta_state_dict(name)
    leaves = expected_leaves(_known_config(name))
    assert list(leaves) == list(sd)  # same keys, same order
    assert {k: leaf.torch_shape for k, leaf in leaves.items()} == {
        k: tuple(v.shape) for k, v in sd.items()
    }


@pytest.mark.parametrize("name", ALL)
def test_infer_config_equals_known_config(name):
    known = _known_config(name)
    heads = None if name in OFFICIAL_BUILDERS else known.decoder_num_heads  # not in the weights
    assert infer_config(_meta_state_dict(name), decoder_num_heads=heads) == known


def test_infer_config_decoder_heads():
    sd = _meta_state_dict("tiny")  # decoder attention widths 32 (self) and 16 (cross)
    assert infer_config(sd).decoder_num_heads == 8
    assert infer_config(sd, decoder_num_heads=4) == tiny_config()
    with pytest.raises(ValueError, match="decoder_num_heads 3 does not divide"):
        infer_config(sd, decoder_num_heads=3)


def test_infer_config_fine_tuned_mlp_ratio():
    config = tiny_config(encoder_embed_dim=48, encoder_num_heads=2, mlp_ratio=100 / 48)
    sd = _meta_state_dict_for(config)
    assert sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] == 100
    inferred = infer_config(sd, decoder_num_heads=4)
    assert int(inferred.encoder_embed_dim * inferred.mlp_ratio) == 100
    check_state_dict(sd, inferred)


def _meta_state_dict_for(config):
    with torch.device("meta"):
        return build_official(config, perturb=0).state_dict()


def test_infer_config_names_missing_key():
    sd = dict(_meta_state_dict("tiny"))
    del sd["image_encoder.neck.0.weight"]
    with pytest.raises(ValueError, match=r"missing key image_encoder\.neck\.0\.weight"):
        infer_config(sd)


@pytest.mark.parametrize("name", ["tiny", "custom"])
def test_round_trip_is_bit_identical_and_strict_loadable(name):
    config = CUSTOM[name]
    official = build_official(config, seed=3)
    sd = state_dict_numpy(official)
    params = state_dict_to_params(sd, config)
    back = params_to_state_dict(params, config)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == np.float32 and np.array_equal(back[k], v), k
    fresh = build_official(config, seed=4)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert np.array_equal(v.numpy(), sd[k]), k


def test_vit_b_round_trip(vit_b):
    official, sd = vit_b
    config = infer_config(sd)
    assert config == get_config("vit_b")
    back = params_to_state_dict(state_dict_to_params(sd, config), config)
    assert list(back) == list(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
    official.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_params_follow_the_naming_rule(vit_b):
    """Spot checks of the spec's rule, written out by hand per module type."""
    _, sd = vit_b
    p = state_dict_to_params(sd, get_config("vit_b"))
    enc, pe, dec = p["image_encoder"], p["prompt_encoder"], p["mask_decoder"]
    w = sd["image_encoder.blocks.3.attn.qkv.weight"]  # Linear
    np.testing.assert_array_equal(enc["blocks_3"]["attn"]["qkv"]["kernel"], w.T)
    w = sd["image_encoder.patch_embed.proj.weight"]  # Conv2d (out, in, kh, kw)
    k = enc["patch_embed"]["proj"]["kernel"]
    assert k.shape == (16, 16, 3, 768)
    assert k[2, 5, 1, 7] == w[7, 1, 2, 5]
    w = sd["mask_decoder.output_upscaling.0.weight"]  # ConvTranspose2d (in, out, kh, kw)
    k = dec["output_upscaling_0"]["kernel"]
    assert k.shape == (2, 2, 256, 64)
    assert k[1, 0, 9, 3] == w[9, 3, 1, 0]
    np.testing.assert_array_equal(enc["neck_1"]["scale"], sd["image_encoder.neck.1.weight"])
    np.testing.assert_array_equal(
        enc["blocks_0"]["norm1"]["scale"], sd["image_encoder.blocks.0.norm1.weight"]
    )
    np.testing.assert_array_equal(enc["pos_embed"], sd["image_encoder.pos_embed"])
    np.testing.assert_array_equal(
        enc["blocks_2"]["attn"]["rel_pos_w"], sd["image_encoder.blocks.2.attn.rel_pos_w"]
    )
    np.testing.assert_array_equal(
        pe["point_embeddings_2"]["embedding"], sd["prompt_encoder.point_embeddings.2.weight"]
    )
    np.testing.assert_array_equal(
        pe["pe_layer"]["positional_encoding_gaussian_matrix"],
        sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    np.testing.assert_array_equal(
        pe["mask_downscaling_3"]["bias"], sd["prompt_encoder.mask_downscaling.3.bias"]
    )
    np.testing.assert_array_equal(
        dec["output_hypernetworks_mlps_3"]["layers_2"]["kernel"],
        sd["mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"].T,
    )
    np.testing.assert_array_equal(
        dec["transformer"]["layers_1"]["cross_attn_image_to_token"]["out_proj"]["bias"],
        sd["mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias"],
    )
    np.testing.assert_array_equal(
        dec["mask_tokens"]["embedding"], sd["mask_decoder.mask_tokens.weight"]
    )


@pytest.mark.parametrize("name", ["tiny", "vit_b"])
def test_converter_tree_equals_model_params(name):
    config = _known_config(name)
    sd = {k: np.zeros(v.shape, np.float32) for k, v in _meta_state_dict(name).items()}
    converted = flatten_params(state_dict_to_params(sd, config))
    shapes = jax.eval_shape(build_sam(config).init_params, jax.random.key(0))
    model_tree = {
        tuple(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    assert {p: v.shape for p, v in converted.items()} == model_tree


def test_errors_name_the_key():
    config = tiny_config()
    sd = state_dict_numpy(build_official(config))
    bad = dict(sd)
    del bad["mask_decoder.iou_token.weight"]
    bad["image_encoder.extra.weight"] = np.zeros(3, np.float32)
    bad["prompt_encoder.no_mask_embed.weight"] = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError) as e:
        state_dict_to_params(bad, config)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing key: mask_decoder.iou_token.weight" in msg
    assert "unexpected key: image_encoder.extra.weight" in msg
    assert "mis-shaped key: prompt_encoder.no_mask_embed.weight (2, 32) (expected (1, 32))" in msg
    params = state_dict_to_params(sd, config)
    del params["mask_decoder"]["iou_token"]
    with pytest.raises(ValueError, match="missing key: mask_decoder/iou_token/embedding"):
        params_to_state_dict(params, config)
    with pytest.raises(ValueError, match="floating point"):
        state_dict_to_params(
            {**sd, "image_encoder.pos_embed": np.zeros((1, 8, 8, 64), int)}, config
        )


def test_save_and_load_converted(tmp_path):
    config = CUSTOM["custom"]
    sd = state_dict_numpy(build_official(config, seed=5))
    params = state_dict_to_params(sd, config)
    path = tmp_path / "ckpt"
    checkpoints.save_converted(path, config, jax.tree.map(jnp.asarray, params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    assert json.loads((path / "config" / "metadata").read_text()) == config.to_dict()
    config2, params2 = checkpoints.load_converted(path)
    assert config2 == config
    flat, flat2 = flatten_params(params), flatten_params(params2)
    assert flat.keys() == flat2.keys()
    assert all(flat2[k].dtype == np.float32 and np.array_equal(flat[k], flat2[k]) for k in flat)
    with pytest.raises(FileExistsError, match="exists already"):
        checkpoints.save_converted(path, config, params)
    checkpoints.save_converted(path, config, params, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(ValueError, match="params do not match"):
        checkpoints.save_converted(tmp_path / "other", tiny_config(), params)
    assert not (tmp_path / "other").exists()


def test_load_converted_checks_params_against_stored_config(tmp_path):
    config = tiny_config()
    params = state_dict_to_params(state_dict_numpy(build_official(config)), config)
    checkpoints.save_converted(tmp_path / "c", config, params)
    (tmp_path / "c" / "config" / "metadata").write_text(tiny_config(decoder_mlp_dim=48).to_json())
    (tmp_path / "c" / "manifest.json").unlink()  # else the edit reads as damage (manifest test)
    with pytest.raises(ValueError, match=r"mis-shaped key.*transformer/layers_0/mlp/lin1/kernel"):
        checkpoints.load_converted(tmp_path / "c")
    with pytest.raises(ValueError, match="not a converted sam_jax checkpoint"):
        checkpoints.load_converted(tmp_path)


def test_load_pth_unwraps_and_checks_model_type(tmp_path):
    config = tiny_config()
    official = build_official(config, seed=6)
    sd = official.state_dict()
    expected = state_dict_numpy(official)
    for i, obj in enumerate(
        [
            sd,
            {"model": sd, "epoch": 3},
            {"state_dict": sd},
            {f"module.{k}": v for k, v in sd.items()},
        ]
    ):
        torch.save(obj, tmp_path / f"{i}.pth")
        got_config, params = checkpoints.load_pth(tmp_path / f"{i}.pth", decoder_num_heads=4)
        assert got_config == config
        back = params_to_state_dict(params, config)
        assert all(np.array_equal(back[k], expected[k]) for k in expected)
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "ambiguous.pth")
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        checkpoints.load_pth(tmp_path / "ambiguous.pth")
    with pytest.raises(ValueError, match=r"does not match model type vit_b: .*image_encoder\."):
        checkpoints.load_pth(tmp_path / "0.pth", model_type="vit_b")
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pth")
    _, params = checkpoints.load_pth(tmp_path / "half.pth")
    assert all(v.dtype == np.float32 for v in flatten_params(params).values())


def test_load_builds_the_model(tmp_path):
    config = tiny_config()
    official = build_official(config, seed=7)
    torch.save(official.state_dict(), tmp_path / "tiny.pth")
    model, params = checkpoints.load(tmp_path / "tiny.pth")
    assert model.config == config.replace(decoder_num_heads=8)  # not in the weights: official 8
    assert checkpoints.load(tmp_path / "tiny.pth", decoder_num_heads=4)[0].config == config
    checkpoints.save_converted(tmp_path / "conv", config, params)
    model2, params2 = checkpoints.load(tmp_path / "conv", dtype=jnp.float32)
    assert model2.config == config
    images = np.random.default_rng(0).normal(size=(1, 128, 128, 3)).astype(np.float32)
    with torch.no_grad():
        ref = official.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2))
    ref = ref.permute(0, 2, 3, 1).numpy()
    for m, p in [(model, params), (model2, params2)]:
        assert isinstance(jax.tree.leaves(p)[0], jax.Array)
        emb = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x, method=m.encode))(p, images)
        np.testing.assert_allclose(np.asarray(emb), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError):
        checkpoints.load(tmp_path / "missing")


def test_import_does_not_load_torch_or_orbax():
    code = (
        "import sys, sam_jax.checkpoints, sam_jax.checkpoints.mapping, convert_weights; "
        "print(sorted(m for m in ('torch', 'orbax', 'segment_anything') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_vit_h_round_trip():
    """Full-size official ViT-H state_dict (random init), in memory (about 8 GB)."""
    torch.manual_seed(0)
    sd = {k: v.numpy() for k, v in build_sam_vit_h().state_dict().items()}
    config = checkpoints.config_for_state_dict(sd, model_type="vit_h")
    assert infer_config(sd) == config == get_config("vit_h")
    back = params_to_state_dict(state_dict_to_params(sd, config), config)
    assert list(back) == list(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)
