"""Tests of the optimizer: schedule, layer-wise lr decay, frozen parts, weight decay, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sam_jax.training import optimizer as opt


def _params():
    k = jnp.ones
    return {
        "image_encoder": {
            "patch_embed": {"proj": {"kernel": k((2, 2)), "bias": k((2,))}},
            "pos_embed": k((1, 2, 2, 3)),
            "blocks_0": {"mlp": {"lin1": {"kernel": k((3, 3))}}, "norm1": {"scale": k((3,))}},
            "blocks_1": {"mlp": {"lin1": {"kernel": k((3, 3))}}},
            "neck_0": {"kernel": k((1, 1, 3, 3))},
        },
        "prompt_encoder": {
            "pe_layer": {"positional_encoding_gaussian_matrix": k((2, 4))},
            "point_embeddings_0": {"embedding": k((1, 4))},
        },
        "mask_decoder": {
            "iou_prediction_head": {"layers_0": {"kernel": k((3, 3)), "bias": k((3,))}}
        },
    }


def _config(**opt_fields):
    base = dict(
        lr=0.1,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        decay="constant",
        decay_steps=(),
        decay_factor=0.1,
        layer_decay=1.0,
        grad_clip_norm=0.0,
    )
    base.update(opt_fields)
    return ml_collections.ConfigDict(dict(total_steps=100, trainable="all", optimizer=base))


def test_layer_ids_follow_vitdet():
    assert opt.layer_id("image_encoder/patch_embed/proj/kernel", 12) == 0
    assert opt.layer_id("image_encoder/pos_embed", 12) == 0
    assert opt.layer_id("image_encoder/blocks_0/attn/qkv/kernel", 12) == 1
    assert opt.layer_id("image_encoder/blocks_11/mlp/lin2/bias", 12) == 12
    assert opt.layer_id("image_encoder/neck_0/kernel", 12) == 13
    assert opt.layer_id("mask_decoder/iou_token/embedding", 12) == 13
    scales = opt.layer_lr_scales(_params(), 2, 0.5)
    assert scales["image_encoder"]["pos_embed"] == 0.125
    assert scales["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"] == 0.25
    assert scales["image_encoder"]["blocks_1"]["mlp"]["lin1"]["kernel"] == 0.5
    assert scales["mask_decoder"]["iou_prediction_head"]["layers_0"]["bias"] == 1.0


def test_lr_schedule_warmup_and_step_decay():
    f = opt.make_lr_schedule(1.0, 100, warmup_steps=10, decay="step", decay_steps=(50, 80))
    np.testing.assert_allclose(
        [float(f(s)) for s in (0, 4, 9, 10, 49, 50, 79, 80, 99)],
        [0.1, 0.5, 1, 1, 1, 0.1, 0.1, 0.01, 0.01],
        rtol=1e-6,
    )
    c = opt.make_lr_schedule(1.0, 100, warmup_steps=0, decay="cosine")
    assert float(c(0)) == pytest.approx(1.0) and float(c(50)) == pytest.approx(0.5)
    assert float(c(100)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="lr decay"):
        opt.make_lr_schedule(1.0, 10, decay="linear")


def test_weight_decay_mask():
    mask = opt.weight_decay_mask(_params())
    assert mask["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"]
    assert mask["image_encoder"]["neck_0"]["kernel"]
    assert not mask["image_encoder"]["patch_embed"]["proj"]["bias"]
    assert not mask["image_encoder"]["pos_embed"]
    assert not mask["image_encoder"]["blocks_0"]["norm1"]["scale"]
    assert not mask["prompt_encoder"]["point_embeddings_0"]["embedding"]


def _tree(params, adapters=None):
    """What make_optimizer's optimizer updates: the params beside the LoRA adapters."""
    return {"params": params, "adapters": adapters or {}}


def _two_steps(tx, params):
    state = tx.init(params)
    rng = np.random.default_rng(0)
    outs = []
    for scale in (100.0, 0.01):
        g = jax.tree.map(
            lambda p, s=scale: jnp.asarray(rng.normal(0, s, p.shape), jnp.float32), params
        )
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        outs.append(params)
    return outs[-1]


def test_matches_optax_adamw_with_clipping():
    params = _params()
    cfg = _config(weight_decay=0.1, grad_clip_norm=1.0)
    cfg.trainable = "all"
    got = _two_steps(opt.make_optimizer(cfg, params, 2), _tree(params))["params"]
    labels = opt.trainable_labels(params, "all")
    ref_tx = optax.multi_transform(
        {
            "train": optax.chain(
                optax.clip_by_global_norm(1.0),
                optax.adamw(0.1, weight_decay=0.1, mask=opt.weight_decay_mask(params)),
            ),
            "freeze": optax.set_to_zero(),
        },
        labels,
    )
    want = _two_steps(ref_tx, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    # Without clipping the huge first gradient changes the second step.
    tx = opt.make_optimizer(_config(weight_decay=0.1), params, 2)
    unclipped = _two_steps(tx, _tree(params))["params"]
    k = ("mask_decoder", "iou_prediction_head", "layers_0", "kernel")
    a, b = got, unclipped
    for name in k:
        a, b = a[name], b[name]
    assert not np.allclose(a, b)


def test_layer_decay_scales_updates():
    params = _params()
    tx = opt.make_optimizer(_config(layer_decay=0.5), params, 2)
    g = jax.tree.map(jnp.ones_like, _tree(params))
    u, _ = tx.update(g, tx.init(_tree(params)), _tree(params))
    u = u["params"]
    top = float(u["mask_decoder"]["iou_prediction_head"]["layers_0"]["kernel"][0, 0])
    b0 = float(u["image_encoder"]["blocks_0"]["mlp"]["lin1"]["kernel"][0, 0])
    pe = float(u["image_encoder"]["pos_embed"].ravel()[0])
    assert top == pytest.approx(-0.1, rel=1e-4)
    assert b0 == pytest.approx(0.25 * top, rel=1e-4) and pe == pytest.approx(0.125 * top, rel=1e-4)


@pytest.mark.parametrize(
    "trainable,trained",
    [
        ("all", {"image_encoder", "prompt_encoder", "mask_decoder"}),
        ("prompt_encoder_and_decoder", {"prompt_encoder", "mask_decoder"}),
        ("mask_decoder", {"mask_decoder"}),
    ],
)
def test_frozen_parts_do_not_move(trainable, trained):
    params = _params()
    cfg = _config()
    cfg.trainable = trainable
    tx = opt.make_optimizer(cfg, params, 2)
    g = jax.tree.map(jnp.ones_like, _tree(params))
    u, _ = tx.update(g, tx.init(_tree(params)), _tree(params))
    u = u["params"]
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        moved = [float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(u[part])]
        if part not in trained:
            assert not any(moved), part
    # The PE gaussian matrix is an official buffer: never trained.
    assert (
        float(jnp.abs(u["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"]).sum())
        == 0
    )
    if "mask_decoder" in trained:
        assert (
            float(jnp.abs(u["mask_decoder"]["iou_prediction_head"]["layers_0"]["bias"]).sum()) > 0
        )
    with pytest.raises(ValueError, match="trainable must be one of"):
        opt.trainable_labels(params, "encoder")


def test_lora_adapters_train_with_their_layer_lr_and_the_base_has_no_state():
    params = _params()
    adapters = {
        "image_encoder": {
            "blocks_0": {"mlp": {"lin1": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 3))}}}
        }
    }
    cfg = _config(layer_decay=0.5)
    cfg.trainable = "none"
    tx = opt.make_optimizer(cfg, params, 2, adapters)
    tree = _tree(params, adapters)
    state = tx.init(tree)
    # Adam moments exist for the two adapter arrays only (frozen leaves hold MaskedNodes).
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2]
    assert sorted(x.shape for x in moments) == [(2, 3), (2, 3), (3, 2), (3, 2)]
    u, _ = tx.update(jax.tree.map(jnp.ones_like, tree), state, tree)
    assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(u["params"]))
    # blocks_0 is ViTDet layer 1 of L=2: lr * 0.5 ** (2 + 1 - 1) = 0.1 * 0.25
    a = u["adapters"]["image_encoder"]["blocks_0"]["mlp"]["lin1"]["a"]
    np.testing.assert_allclose(a, -0.025, rtol=1e-4)
