"""LoRA: adapters applied unmerged equal the merged model, training moves only the adapters (and
what `trainable` names), the exported model is an ordinary SAM, bad settings fail in one line."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sam_jax import errors
from sam_jax.checkpoints import load_converted, params_to_state_dict
from sam_jax.config import get_config, tiny_config
from sam_jax.errors import ConfigError
from sam_jax.modeling import build_sam, lora
from sam_jax.training import initialization, train_loop
from tests.torch_reference import build_official
from tests.training_fakes import fake_iterator, tiny_train_config

ALL_TARGETS = ("qkv", "proj", "mlp", "decoder_attn")


def _random_adapters(shapes, targets, rank, seed=0):
    """Adapters with b != 0 (a fresh init has b = 0, which would make any merge test vacuous)."""
    layers = lora.target_layers(shapes, targets, rank)
    adapters = lora.init_adapters(jax.random.key(seed), layers, rank)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32), adapters)


def test_unmerged_adapters_equal_the_merged_model():
    config = tiny_config(image_size=64, encoder_depth=2, encoder_global_attn_indexes=(1,))
    model = build_sam(config)
    params = model.init_params(jax.random.key(0))
    adapters = _random_adapters(model.param_shapes(), ALL_TARGETS, rank=3)
    scale = 2.0 / 3
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    points = jnp.asarray(rng.uniform(0, 64, (2, 3, 2, 2)), jnp.float32)
    labels = jnp.asarray(np.tile([[1, 0]], (2, 3, 1)), jnp.int32)

    def run(variables):
        emb = model.apply(variables, images, method=model.encode)
        return emb, *model.apply(
            variables, emb, points, labels, None, None, True, method=model.decode
        )

    unmerged = run({"params": params, "lora": lora.lora_variables(adapters, scale)})
    merged = run({"params": lora.merge(params, adapters, scale)})
    base = run({"params": params})
    for u, m, b in zip(unmerged, merged, base, strict=True):
        np.testing.assert_allclose(u, m, rtol=2e-5, atol=2e-5)
        assert not np.allclose(u, b, atol=1e-3)  # the adapters do change the model


def test_tiny_vit_encoder_adapters_equal_the_merged_model():
    """MobileSAM's TinyViT: the encoder targets find its attention and MLP layers (10 qkv, 10
    proj, 20 fc in vit_t) and the adapted encoder equals the merged one."""
    config = get_config("vit_t", image_size=256)
    model = build_sam(config)
    params = model.init_params(jax.random.key(0))
    layers = lora.target_layers(model.param_shapes(), ("qkv", "proj", "mlp"), 3)
    assert len(layers) == 40
    assert "image_encoder/layers_2/blocks_5/mlp/fc2" in layers
    adapters = _random_adapters(model.param_shapes(), ("qkv", "proj", "mlp"), rank=3)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(1, 256, 256, 3)), jnp.float32)

    def encode(variables):
        return model.apply(variables, images, method=model.encode)

    unmerged = encode({"params": params, "lora": lora.lora_variables(adapters, 0.5)})
    merged = encode({"params": lora.merge(params, adapters, 0.5)})
    np.testing.assert_allclose(unmerged, merged, rtol=1e-4, atol=1e-4)
    assert not np.allclose(unmerged, encode({"params": params}), atol=1e-3)


def _lora_config(trainable="none", targets=("qkv", "decoder_attn"), rank=2):
    c = tiny_train_config()
    c.trainable = trainable
    c.lora.rank = rank
    c.lora.alpha = 4.0
    c.lora.targets = targets
    c.lora.dropout = 0.1
    c.total_steps = 3
    c.checkpoint.every_steps = 3
    return c


def _expected_count(config, trainable_base):
    """r (in + out) per adapted layer, from the architecture alone (independent of lora.py)."""
    sam = initialization.sam_config_from(config)
    r, c, d = config.lora.rank, sam.encoder_embed_dim, sam.prompt_embed_dim
    half = d // sam.attention_downsample_rate
    per_encoder_block = r * (c + 3 * c)  # qkv: c -> 3c
    per_decoder_layer = 4 * r * (2 * d) + 2 * 4 * r * (d + half)  # self attn + two cross attns
    final = 4 * r * (d + half)
    return (
        sam.encoder_depth * per_encoder_block
        + sam.decoder_depth * per_decoder_layer
        + final
        + (trainable_base)
    )


@pytest.mark.parametrize("trainable", ["none", "mask_decoder"])
def test_lora_training_moves_only_adapters_and_exports_an_ordinary_sam(tmp_path, capsys, trainable):
    config = _lora_config(trainable)
    workdir = str(tmp_path / "run")
    out = train_loop.train_and_evaluate(config, workdir, fake_iterator)
    assert out["step"] == 3
    sam = initialization.sam_config_from(config)
    model = build_sam(sam)
    init = jax.tree.map(np.asarray, model.init_params(jax.random.key(config.seed)))

    # The printed count equals the formula.
    decoder = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(init["mask_decoder"]))
    want = _expected_count(config, decoder if trainable == "mask_decoder" else 0)
    printed = re.search(r"trainable parameters: ([\d,]+) of", capsys.readouterr().out)
    assert printed and int(printed.group(1).replace(",", "")) == want

    # The checkpoint holds the adapters; the frozen base is bit-identical to the init.
    from sam_jax.checkpoints import training as checkpointing

    ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints", 2, False)
    state, _ = ckpt.restore(None)
    ckpt.close()
    adapters = jax.tree.map(np.asarray, state["adapters"])
    base = jax.tree.map(np.asarray, state["params"])
    assert any(np.abs(x).sum() > 0 for x in jax.tree.leaves(adapters))  # b left zero
    for part in ("image_encoder", "prompt_encoder") + (
        ("mask_decoder",) if trainable == "none" else ()
    ):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), base[part], init[part])
    if trainable == "mask_decoder":
        moved = jax.tree.map(
            lambda a, b: not np.array_equal(a, b), base["mask_decoder"], init["mask_decoder"]
        )
        assert any(jax.tree.leaves(moved))

    # model/ is the base with the adapters merged, and the official model loads it strictly.
    _, exported = load_converted(f"{workdir}/model")
    merged = lora.merge(base, adapters, lora.scale_of(config.lora))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), exported, merged)
    official = build_official(sam, seed=0)
    sd = params_to_state_dict(exported, sam)
    official.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True
    )


def test_lora_resume_continues_bitwise(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    config = _lora_config()
    config.checkpoint.every_steps = 1
    train_loop.train_and_evaluate(config, ref, fake_iterator)
    short = _lora_config()
    short.total_steps = 2
    train_loop.train_and_evaluate(short, run, fake_iterator)
    train_loop.train_and_evaluate(config, run, fake_iterator)
    _, a = load_converted(f"{ref}/model")
    _, b = load_converted(f"{run}/model")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    changed = _lora_config(rank=3)
    with pytest.raises(errors.WorkdirMismatchError, match="lora.rank: 2 -> 3"):
        train_loop.train_and_evaluate(changed, run, fake_iterator)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"lora.targets": ("qkv", "attn")}, "unknown target"),
        ({"lora.rank": 500}, "lora.rank 500 is larger than layer"),
        ({"trainable": "all"}, 'trainable "all" and lora.rank > 0'),
        ({"lora.rank": 0}, 'trainable "none" trains nothing'),
        ({"lora.dropout": 1.0}, "lora.dropout must be < 1"),
        ({"embedding_cache": "on"}, "LoRA adapts the image encoder"),
    ],
)
def test_bad_lora_settings_fail_in_one_line_before_anything_is_written(tmp_path, fields, message):
    config = _lora_config()
    for name, value in fields.items():
        node = config
        *parents, last = name.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        train_loop.train_and_evaluate(config, str(tmp_path / "w"), fake_iterator)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_a_target_that_matches_no_layer_is_named():
    shapes = build_sam(tiny_config()).param_shapes()
    no_decoder = {k: v for k, v in shapes.items() if k != "mask_decoder"}
    with pytest.raises(ConfigError, match="'decoder_attn' matches no layer"):
        lora.target_layers(no_decoder, ("qkv", "decoder_attn"), 2)
