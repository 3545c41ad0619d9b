"""CLIP in Flax against transformers' CLIPModel and open_clip, on random weights perturbed in
every parameter (LayerNorms, biases, embeddings and the class token included): image and text
embeddings agree to float32 rounding; a transformers folder loads through the table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sam_jax.checkpoints import clip as clip_ckpt
from sam_jax.modeling.clip import Clip

VISION = dict(
    hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8,
)  # fmt: skip
TEXT = dict(
    hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
    vocab_size=99, max_position_embeddings=16,
)  # fmt: skip


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _ours(model, params, images, ids):
    """(image embeddings, text embeddings) of NCHW images and token ids."""
    variables = {"params": params}
    img = model.apply(variables, images.transpose(0, 2, 3, 1), method=model.encode_image)
    txt = model.apply(variables, jnp.asarray(ids, jnp.int32), method=model.encode_text)
    return img, txt


def _inputs(image_size: int, vocab: int, length: int, eot: int):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, image_size, image_size)).astype(np.float32)
    ids = rng.integers(1, eot - 1, size=(2, length)).astype(np.int64)
    ids[0, 5], ids[0, 6:] = eot, 0  # padded after the end-of-text token
    ids[1, -1] = eot
    return images, ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers_clip(act, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    hf_config = CLIPConfig(
        text_config={**TEXT, "hidden_act": act, "eos_token_id": 2},
        vision_config={**VISION, "hidden_act": act},
        projection_dim=24,
    )
    torch.manual_seed(0)
    ref = _perturb(CLIPModel(hf_config), seed=1)
    ref.save_pretrained(tmp_path / "clip")
    config, params = clip_ckpt.load_hf_clip(tmp_path / "clip")
    assert config.hidden_act == act and config.eos_token_id is None
    model = Clip(config)
    images, ids = _inputs(32, TEXT["vocab_size"], 12, TEXT["vocab_size"] - 1)
    with torch.no_grad():
        want_img = ref.get_image_features(pixel_values=torch.from_numpy(images)).pooler_output
        want_txt = ref.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    got_img = model.apply(
        {"params": params}, images.transpose(0, 2, 3, 1), method=model.encode_image
    )
    got_txt = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.encode_text)
    assert _rel(got_img, want_img.numpy()) <= 1e-5
    assert _rel(got_txt, want_txt.numpy()) <= 1e-5
    assert float(params["logit_scale"]) == pytest.approx(float(ref.logit_scale.detach()))


def test_first_eos_pooling_of_newer_configs(tmp_path):
    """A config whose eos_token_id is not 2 pools the first end-of-text token, as transformers."""
    from transformers import CLIPConfig, CLIPModel

    eos = 7
    hf_config = CLIPConfig(
        text_config={**TEXT, "eos_token_id": eos}, vision_config=VISION, projection_dim=24
    )
    torch.manual_seed(0)
    ref = _perturb(CLIPModel(hf_config), seed=2)
    ref.save_pretrained(tmp_path / "clip")
    config, params = clip_ckpt.load_hf_clip(tmp_path / "clip")
    assert config.eos_token_id == eos
    ids = np.random.default_rng(1).integers(10, 90, size=(2, 12))
    ids[0, 4] = ids[0, 8] = eos  # the first one counts
    ids[1, 9] = eos
    with torch.no_grad():
        want = ref.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    model = Clip(config)
    got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.encode_text)
    assert _rel(got, want.numpy()) <= 1e-5


def test_matches_open_clip():
    """open_clip's layout (packed q/k/v, projection matrices, ln_pre/ln_post) through the rename
    table; GELU as its default models."""
    import open_clip

    vision = dict(image_size=32, patch_size=8, width=48, layers=2, head_width=12, mlp_ratio=2.0)
    text = dict(context_length=16, vocab_size=99, width=40, heads=5, layers=2, mlp_ratio=2.0)
    torch.manual_seed(0)
    ref = _perturb(open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text), seed=3)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    config = clip_ckpt.config_from_open_clip(sd, hidden_act="gelu", vision_heads=4, text_heads=5)
    assert (config.vision_width, config.vision_layers, config.vision_mlp_dim) == (48, 2, 96)
    assert (config.text_width, config.context_length, config.embed_dim) == (40, 16, 24)
    params = clip_ckpt.hf_to_params(clip_ckpt.open_clip_to_hf(sd), config)
    model = Clip(config)
    images, ids = _inputs(32, 99, 16, 98)
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(images))
        want_txt = ref.encode_text(torch.from_numpy(ids))
    got_img = model.apply(
        {"params": params}, images.transpose(0, 2, 3, 1), method=model.encode_image
    )
    got_txt = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), method=model.encode_text)
    assert _rel(got_img, want_img.numpy()) <= 1e-5
    assert _rel(got_txt, want_txt.numpy()) <= 1e-5


def test_bad_checkpoints_are_one_line(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION)).save_pretrained(tmp_path / "c")
    doc = (tmp_path / "c" / "config.json").read_text().replace('"clip"', '"bert"', 1)
    (tmp_path / "c" / "config.json").write_text(doc)
    with pytest.raises(clip_ckpt.CheckpointError, match="is not a CLIP"):
        clip_ckpt.load_hf_clip(tmp_path / "c")
    config = clip_ckpt.ClipConfig(vision_width=48, vision_heads=4)
    with pytest.raises(
        clip_ckpt.CheckpointError, match="does not match its CLIP config: .*missing"
    ):
        clip_ckpt.hf_to_params({"logit_scale": np.zeros(())}, config)


def test_random_init_has_the_table_s_shapes():
    config = clip_ckpt.ClipConfig(
        image_size=32, patch_size=8, vision_width=48, vision_layers=1, vision_heads=4,
        vision_mlp_dim=64, vocab_size=50, context_length=8, text_width=40, text_layers=1,
        text_heads=5, text_mlp_dim=64, embed_dim=16,
    )  # fmt: skip
    params = Clip(config).init_params(jax.random.key(0))
    flat = {"/".join(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
            and __import__("flax").traverse_util.flatten_dict(params).items()}  # fmt: skip
    want = {
        "/".join(leaf.flax_path): leaf.flax_shape for leaf in clip_ckpt.clip_leaves(config).values()
    }
    assert flat == want
