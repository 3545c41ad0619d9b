"""Parity of each SAM module with the official PyTorch model (random perturbed weights, float32)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sam_jax.checkpoints.mapping import state_dict_to_params
from sam_jax.config import tiny_config
from sam_jax.modeling import PAD_LABEL, build_sam
from sam_jax.modeling.image_encoder import Block
from sam_jax.prompts import pack_prompts
from tests.torch_reference import build_official, rel_err, state_dict_numpy

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    # 8x8 grid, window 3 (the grid is padded to 9x9), blocks 0 windowed, 1 global; a 4-block variant
    # with two global blocks checks the block indexing.
    config = tiny_config(encoder_depth=4, encoder_global_attn_indexes=(1, 3))
    official = build_official(config, seed=0)
    params = state_dict_to_params(state_dict_numpy(official), config)
    return config, official, build_sam(config), jax.tree_util.tree_map(jnp.asarray, params)


@partial(jax.jit, static_argnums=0, static_argnames="multimask_output")
def _decode(model, params, *args, multimask_output=True):
    return model.apply(
        {"params": params}, *args, multimask_output=multimask_output, method=model.decode
    )


def _image(config, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, config.image_size, config.image_size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))


def test_image_encoder_matches_official(pair):
    config, official, model, params = pair
    x = _image(config)
    ours = jax.jit(partial(model.apply, method=model.encode))({"params": params}, x)
    with torch.no_grad():
        ref = official.image_encoder(_nchw(x)).numpy()
    assert ours.shape == (2, config.embedding_size, config.embedding_size, config.prompt_embed_dim)
    assert rel_err(np.moveaxis(np.asarray(ours), -1, 1), ref) < TOL


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
def test_encoder_block_matches_official(pair, index):
    config, official, _, params = pair
    g = config.embedding_size
    tblock = official.image_encoder.blocks[index]
    block = Block(
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        window_size=tblock.window_size,
        input_size=(g, g),
    )
    x = np.random.default_rng(1).normal(size=(2, g, g, config.encoder_embed_dim))
    x = x.astype(np.float32)
    ours = block.apply({"params": params["image_encoder"][f"blocks_{index}"]}, x)
    with torch.no_grad():
        ref = tblock(torch.from_numpy(x)).numpy()
    assert (tblock.window_size == 0) == (index in config.encoder_global_attn_indexes)
    assert rel_err(ours, ref) < TOL


def _official_prompt(official, points=None, labels=None, boxes=None, masks=None):
    pts = None if points is None else (torch.from_numpy(points), torch.from_numpy(labels))
    with torch.no_grad():
        sparse, dense = official.prompt_encoder(
            points=pts,
            boxes=None if boxes is None else torch.from_numpy(boxes),
            masks=None if masks is None else torch.from_numpy(masks),
        )
    return sparse.detach(), dense.detach()


PROMPTS = {
    "points": dict(points=[[[10.0, 20.5], [100.0, 3.0]]], labels=[[1, 0]]),
    "box": dict(boxes=[[5.0, 7.0, 90.0, 120.0]]),
    "points_box": dict(points=[[[30.0, 40.0]]], labels=[[1]], boxes=[[5.0, 7.0, 90.0, 120.0]]),
    "not_a_point": dict(points=[[[30.0, 40.0], [0.0, 0.0]]], labels=[[1, -1]]),
}


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_prompt_encoder_sparse_matches_official(pair, kind):
    config, official, model, params = pair
    p = PROMPTS[kind]
    pts = None if "points" not in p else np.array(p["points"], np.float32)
    labels = None if "labels" not in p else np.array(p["labels"], np.int64)
    boxes = None if "boxes" not in p else np.array(p["boxes"], np.float32)
    ref_sparse, ref_dense = _official_prompt(official, pts, labels, boxes)
    xy, lab = pack_prompts(pts, labels, boxes)
    sparse, valid = model.apply(
        {"params": params}, xy, lab, method=lambda m, a, b: m.prompt_encoder.embed_points(a, b)
    )
    assert bool(np.all(valid))
    assert rel_err(sparse, ref_sparse.numpy()) < TOL
    dense = model.apply(
        {"params": params}, method=lambda m: m.prompt_encoder.dense_embeddings((1,))
    )
    assert rel_err(np.moveaxis(np.asarray(dense), -1, 1), ref_dense.numpy()) < TOL


def test_prompt_encoder_mask_and_dense_pe_match_official(pair):
    config, official, model, params = pair
    m = config.low_res_size
    masks = np.random.default_rng(2).normal(size=(3, 1, m, m)).astype(np.float32) * 4
    _, ref_dense = _official_prompt(official, boxes=np.zeros((3, 4), np.float32), masks=masks)
    dense = model.apply(
        {"params": params}, masks[:, 0], method=lambda mod, x: mod.prompt_encoder.embed_masks(x)
    )
    assert rel_err(np.moveaxis(np.asarray(dense), -1, 1), ref_dense.numpy()) < TOL
    pe = model.apply({"params": params}, method=lambda mod: mod.prompt_encoder.get_dense_pe())
    with torch.no_grad():
        ref_pe = official.prompt_encoder.get_dense_pe()[0].numpy()
    assert rel_err(np.moveaxis(np.asarray(pe), -1, 0), ref_pe) < TOL


def _official_decode(official, emb_nchw, pts, labels, boxes, masks, multimask):
    sparse, dense = _official_prompt(official, pts, labels, boxes, masks)
    with torch.no_grad():
        low, iou = official.mask_decoder(
            image_embeddings=emb_nchw,
            image_pe=official.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    return low.numpy(), iou.numpy()


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", ["points", "box", "points_box", "mask"])
def test_mask_decoder_matches_official(pair, kind, multimask):
    config, official, model, params = pair
    rng = np.random.default_rng(3)
    g, d, m = config.embedding_size, config.prompt_embed_dim, config.low_res_size
    emb = rng.normal(size=(1, g, g, d)).astype(np.float32)
    num = 3
    pts = labels = boxes = masks = None
    if kind in ("points", "points_box", "mask"):
        pts = rng.uniform(0, config.image_size, size=(num, 2, 2)).astype(np.float32)
        labels = np.array([[1, 0], [1, 1], [0, 1]], np.int64)
    if kind in ("box", "points_box"):
        lo = rng.uniform(0, 60, size=(num, 2))
        boxes = np.concatenate([lo, lo + rng.uniform(5, 60, size=(num, 2))], 1).astype(np.float32)
    if kind == "mask":
        masks = rng.normal(size=(num, 1, m, m)).astype(np.float32) * 3
    ref_low, ref_iou = _official_decode(official, _nchw(emb), pts, labels, boxes, masks, multimask)
    xy, lab = pack_prompts(pts, labels, boxes)
    low, iou = _decode(
        model,
        params,
        emb,
        xy[None],
        lab[None],
        None if masks is None else masks[None, :, 0],
        multimask_output=multimask,
    )
    k = 3 if multimask else 1
    assert low.shape == (1, num, k, m, m) and iou.shape == (1, num, k)
    assert rel_err(low[0], ref_low) < TOL
    assert np.abs(np.asarray(iou[0]) - ref_iou).max() < TOL


def test_padding_tokens_do_not_change_results(pair):
    config, _, model, params = pair
    rng = np.random.default_rng(4)
    g, d = config.embedding_size, config.prompt_embed_dim
    emb = rng.normal(size=(1, g, g, d)).astype(np.float32)
    pts = rng.uniform(0, config.image_size, size=(2, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, 1], [1, 1, 0]])
    xy, lab = pack_prompts(pts, labels)
    xy_pad, lab_pad = pack_prompts(pts, labels, pad_to=9)
    assert (lab_pad[:, 4:] == PAD_LABEL).all()
    xy_pad[:, 4:] = rng.uniform(0, 100, size=(2, 5, 2))  # garbage coordinates in padded slots
    a = _decode(model, params, emb, xy[None], lab[None])
    b = _decode(model, params, emb, xy_pad[None], lab_pad[None])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_batch_of_images_equals_separate_calls(pair):
    config, _, model, params = pair
    rng = np.random.default_rng(5)
    g, d, m = config.embedding_size, config.prompt_embed_dim, config.low_res_size
    emb = rng.normal(size=(2, g, g, d)).astype(np.float32)
    xy = rng.uniform(0, config.image_size, size=(2, 4, 3, 2)).astype(np.float32)
    lab = rng.integers(0, 2, size=(2, 4, 3)).astype(np.int32)
    masks = rng.normal(size=(2, 4, m, m)).astype(np.float32)
    has_mask = np.array([[True, False, True, False], [False, False, True, True]])
    low, iou = _decode(model, params, emb, xy, lab, masks, has_mask)
    for i in range(2):
        for j in range(4):
            # Without a mask the official no_mask_embed is used: pass has_mask=False.
            l1, i1 = _decode(
                model,
                params,
                emb[i : i + 1],
                xy[i : i + 1, j : j + 1],
                lab[i : i + 1, j : j + 1],
                masks[i : i + 1, j : j + 1],
                has_mask[i : i + 1, j : j + 1],
            )
            np.testing.assert_allclose(low[i, j], l1[0, 0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(iou[i, j], i1[0, 0], rtol=1e-5, atol=1e-5)


def test_bad_model_options_raise():
    with pytest.raises(ValueError, match="attention_impl"):
        build_sam(tiny_config(), attention_impl="flash")
    with pytest.raises(ValueError, match="remat_policy"):
        build_sam(tiny_config(), remat_policy="sometimes")
    with pytest.raises(ValueError, match="invalid SamConfig"):
        tiny_config(encoder_global_attn_indexes=(5,))


def test_all_outputs_are_single_and_multimask_outputs(pair):
    config, _, model, params = pair
    rng = np.random.default_rng(6)
    g, d = config.embedding_size, config.prompt_embed_dim
    emb = rng.normal(size=(1, g, g, d)).astype(np.float32)
    xy, lab = pack_prompts(rng.uniform(0, 100, size=(2, 1, 2)), np.ones((2, 1)))
    low_all, iou_all = _decode(model, params, emb, xy[None], lab[None], multimask_output=None)
    low_one, iou_one = _decode(model, params, emb, xy[None], lab[None], multimask_output=False)
    low_three, iou_three = _decode(model, params, emb, xy[None], lab[None], multimask_output=True)
    assert low_all.shape[2] == config.num_multimask_outputs + 1
    np.testing.assert_array_equal(low_all[:, :, :1], low_one)
    np.testing.assert_array_equal(low_all[:, :, 1:], low_three)
    np.testing.assert_array_equal(iou_all[:, :, :1], iou_one)
    np.testing.assert_array_equal(iou_all[:, :, 1:], iou_three)


def test_pe_scale_sets_the_random_fourier_matrix_std():
    """`SamConfig.pe_scale` scales the (frozen) Fourier matrix at init, as the official `scale`."""
    matrices = {}
    for scale in (1.0, 3.0):
        config = tiny_config(image_size=64, encoder_depth=1, encoder_global_attn_indexes=(0,))
        params = build_sam(config.replace(pe_scale=scale)).init_params(jax.random.key(0))
        matrices[scale] = params["prompt_encoder"]["pe_layer"][
            "positional_encoding_gaussian_matrix"
        ]
    np.testing.assert_allclose(matrices[3.0], 3.0 * matrices[1.0], rtol=1e-6)


@pytest.mark.parametrize("block_bytes", [None, 4 * 240, 4 * 240 * 40, 4 * 240 * 240 * 3, 1 << 30])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_equals_dense(block_bytes, dtype):
    """The blocked rel-pos attention of the XLA path (one query, 40 queries, 3 heads, everything
    at once) gives the dense attention with the full decomposed rel-pos bias."""
    from einops import rearrange

    from sam_jax.modeling.common import attention
    from sam_jax.modeling.image_encoder import blocked_rel_pos_attention, decomposed_rel_pos_bias

    rng = np.random.default_rng(0)
    h, w, heads, hd = 12, 20, 3, 8
    q, k, v = (jnp.asarray(rng.normal(size=(2, h * w, heads, hd)), dtype) for _ in range(3))
    rel_h = jnp.asarray(rng.normal(size=(2 * h - 1, hd)), jnp.float32)
    rel_w = jnp.asarray(rng.normal(size=(2 * w - 1, hd)), jnp.float32)
    dense = attention(q, k, v, bias=decomposed_rel_pos_bias(q, rel_h, rel_w, (h, w)))
    items = [rearrange(x, "b t n d -> (b n) t d") for x in (q, k, v)]
    blocked = blocked_rel_pos_attention(*items, rel_h, rel_w, (h, w), block_bytes=block_bytes)
    blocked = rearrange(blocked, "(b n) t d -> b t n d", n=heads)
    assert blocked.shape == dense.shape and blocked.dtype == dense.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(blocked, np.float32), np.asarray(dense, np.float32), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_rounds_once_from_a_float32_product(dtype):
    """Dense in bfloat16 on a CPU takes the bf16 x bf16 -> f32 product (the one XLA runs on AMX
    or AVX-512 BF16) and rounds once, after the bias: its output is the float32 result of the
    rounded operands, rounded to bf16. In float32 it is the plain product (same jaxpr as
    lax.dot_general without a preferred type)."""
    from sam_jax.modeling.common import Dense

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 96)), jnp.float32)
    layer = Dense(48, dtype=dtype)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
    jaxpr = jax.make_jaxpr(lambda p: layer.apply(p, x))(params)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    want = jnp.float32 if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else None
    assert [e.params["preferred_element_type"] for e in dots] == [want]
    y = layer.apply(params, x)
    assert y.dtype == dtype
    p = params["params"]
    r = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)  # noqa: E731
    exact = r(x) @ r(p["kernel"]) + r(p["bias"])
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-22
    # once-rounded: within half a bf16 ulp of the exact value (float32 accumulation adds ~1e-6)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= 0.5 * ulp * np.abs(exact) + 1e-5)
