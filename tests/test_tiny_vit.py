"""MobileSAM (vit_t, TinyViT encoder) against the official MobileSAM code (`mobilesam-mirror`, see
tests/mobilesam_reference.py) on random weights perturbed in every parameter and buffer.

Image sizes: 256 px (grids 32 / 16 / 16 in stages 1-3: every stage has several windows and
pads them: 32 -> 35, 16 -> 28, 16 -> 21), 128 px (16 -> 21; 8 -> 14: one padded window of 14;
8 -> 14) and the official 1024 px once, where the official code runs unmodified.
"""

import functools
import http.server
import os
import subprocess
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data
import torch
from mobile_sam import SamPredictor as OfficialPredictor

from sam_jax.checkpoints import load_pth, registry, save_pth
from sam_jax.checkpoints.load import read_checkpoint
from sam_jax.checkpoints.mapping import (
    expected_param_shapes,
    flatten_params,
    infer_config,
    params_to_state_dict,
    state_dict_to_params,
    unused_tensors,
)
from sam_jax.cli.convert import main as convert_main
from sam_jax.config import get_config
from sam_jax.errors import CheckpointError
from sam_jax.modeling import build_sam
from sam_jax.modeling.tiny_vit import BN_EPS, Conv2dBN, attention_bias_index, depthwise_conv
from sam_jax.predictor import SamPredictor
from sam_jax.training.optimizer import trainable_labels
from tests.mobilesam_reference import build_official_mobile_sam, mobile_sam_state_dict
from tests.torch_reference import rel_err

TOL = 1e-4
CONFIG = get_config("vit_t", image_size=256)


@pytest.fixture(scope="module")
def pair():
    official = build_official_mobile_sam(CONFIG)
    sd = mobile_sam_state_dict(official)
    params = jax.tree.map(jnp.asarray, state_dict_to_params(sd, CONFIG))
    return official, sd, params


def _encode(config, params, images_nchw, dtype=jnp.float32):
    model = build_sam(config, dtype=dtype)
    x = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
    return np.asarray(out, np.float32).transpose(0, 3, 1, 2)


def _official_encode(official, images_nchw):
    with torch.no_grad():
        return official.image_encoder(torch.from_numpy(images_nchw)).numpy()


def test_state_dict_layout_matches_official(pair):
    _, sd, params = pair
    # Every official tensor is in the table, in the official order; params hold all but the
    # unused ones (BatchNorm counters, the classification head).
    back = params_to_state_dict(params, CONFIG)
    assert list(back) == list(sd)
    unused = unused_tensors(CONFIG)
    assert (
        sum(k.endswith("num_batches_tracked") for k in unused) == 27
    )  # 2 patch_embed + 6 MBConv + 9 merging + 10 local_conv
    assert set(unused) - {k for k in unused if k.endswith("num_batches_tracked")} == {
        "image_encoder.norm_head.weight",
        "image_encoder.norm_head.bias",
        "image_encoder.head.weight",
        "image_encoder.head.bias",
    }
    for k, v in back.items():
        if k not in unused:
            np.testing.assert_array_equal(v, sd[k], err_msg=k)
    # The Flax module creates exactly the params the table lists.
    shapes = jax.tree.map(lambda x: x.shape, build_sam(CONFIG).param_shapes())
    assert shapes == expected_param_shapes(CONFIG)
    # infer_config tells MobileSAM from SAM by its keys (the image size is not in the weights:
    # the official 1024).
    assert infer_config(sd) == CONFIG.replace(image_size=1024) == get_config("vit_t")


def test_attention_bias_index_matches_official(pair):
    official, _, _ = pair
    for i in (1, 2, 3):
        attn = official.image_encoder.layers[i].blocks[0].attn
        ws = CONFIG.tiny_vit_window_sizes[i]
        idx, n = attention_bias_index((ws, ws))
        np.testing.assert_array_equal(idx, attn.attention_bias_idxs.numpy())
        assert n == attn.attention_biases.shape[1] == ws * ws


@pytest.mark.parametrize("size", [256, 128])
def test_encoder_matches_official(size):
    config = get_config("vit_t", image_size=size)
    official = build_official_mobile_sam(config, seed=size)
    params = state_dict_to_params(mobile_sam_state_dict(official), config)
    images = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
    ours, ref = _encode(config, params, images), _official_encode(official, images)
    assert ours.shape == ref.shape == (2, 256, size // 16, size // 16)
    assert rel_err(ours, ref) <= TOL


def test_encoder_matches_unmodified_official_at_1024():
    """The official TinyViT hard-codes the 64 x 64 grid: at 1024 px it runs as published."""
    config = get_config("vit_t")
    official = build_official_mobile_sam(config, seed=3)
    assert "forward_features" not in vars(official.image_encoder)  # not the test's 256-px patch
    params = state_dict_to_params(mobile_sam_state_dict(official), config)
    images = np.random.RandomState(3).randn(1, 3, 1024, 1024).astype(np.float32)
    ours, ref = _encode(config, params, images), _official_encode(official, images)
    assert ours.shape == ref.shape == (1, 256, 64, 64)
    assert rel_err(ours, ref) <= TOL


def test_bfloat16_encoder_close_to_float32(pair):
    _, _, params = pair
    images = np.random.RandomState(1).randn(1, 3, 256, 256).astype(np.float32)
    f32 = _encode(CONFIG, params, images)
    bf16 = _encode(CONFIG, params, images, jnp.bfloat16)
    assert rel_err(bf16, f32) <= 0.05
    assert np.corrcoef(bf16.ravel(), f32.ravel())[0, 1] > 0.999


def test_folded_batch_norm_is_exact_with_identity_statistics():
    """scale = sqrt(1 + eps), mean 0, var 1: the Conv2d_BN is its convolution plus `bias`,
    bitwise (how folded ONNX convolutions are stored), for a dense 3x3 convolution (lax's) and a
    depthwise one (`depthwise_conv`, checked against lax's grouped convolution below)."""
    rng = np.random.RandomState(0)
    one = np.sqrt(np.float32(1) + np.float32(BN_EPS), dtype=np.float32)
    x = jnp.asarray(rng.randn(2, 9, 9, 8).astype(np.float32))
    for groups in (1, 8):
        kernel = rng.randn(3, 3, 8 // groups, 8).astype(np.float32)
        bias = rng.randn(8).astype(np.float32)
        bn = dict(
            scale=np.full(8, one, np.float32),
            bias=bias,
            running_mean=np.zeros(8, np.float32),
            running_var=np.ones(8, np.float32),
        )
        params = {"c": {"kernel": kernel}, "bn": bn}
        got = Conv2dBN(8, 3, 2, groups=groups).apply({"params": params}, x)
        if groups == 1:
            conv = jax.lax.conv_general_dilated(
                x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            conv = depthwise_conv(x, kernel, 2)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(conv + bias), err_msg=groups)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_is_the_grouped_convolution(stride):
    """`depthwise_conv` (shifted products) computes lax's grouped convolution (zero padding
    k // 2), even and odd sizes, 3x3 and 5x5 kernels, to float32 rounding."""
    rng = np.random.RandomState(stride)
    for h, w, k in ((9, 9, 3), (16, 11, 3), (8, 13, 5)):
        x = jnp.asarray(rng.randn(2, h, w, 6).astype(np.float32))
        kernel = jnp.asarray(rng.randn(k, k, 1, 6).astype(np.float32))
        got = depthwise_conv(x, kernel, stride)
        want = jax.lax.conv_general_dilated(
            x,
            kernel,
            (stride, stride),
            ((k // 2, k // 2), (k // 2, k // 2)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=6,
            precision="highest",
        )
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_batch_norm_statistics_are_never_trained(pair):
    _, _, params = pair
    labels = flatten_params(trainable_labels(params, "all"))
    stats = [p for p in labels if p[-1] in ("running_mean", "running_var")]
    assert len(stats) == 2 * 27
    assert all(labels[p] == "freeze" for p in stats)
    # The BatchNorm's affine weights and every other encoder param train.
    assert labels[("image_encoder", "layers_1", "blocks_0", "local_conv", "bn", "scale")] == (
        "train"
    )
    assert labels[("image_encoder", "layers_2", "blocks_0", "attn", "attention_biases")] == (
        "train"
    )
    # An optimizer step with these labels leaves the statistics as they were.
    tx = optax.multi_transform(
        {"train": optax.sgd(1.0), "freeze": optax.set_to_zero()}, trainable_labels(params, "all")
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = flatten_params(optax.apply_updates(params, updates))
    old = flatten_params(params)
    for p in stats:
        np.testing.assert_array_equal(new[p], old[p])


def test_pth_round_trip_loads_strictly_into_official(pair, tmp_path):
    official, sd, params = pair
    # Official .pth (with num_batches_tracked and the unused head) -> sam_jax.
    src = tmp_path / "mobile_sam.pt"
    torch.save(official.state_dict(), src)
    config, loaded = load_pth(src, model_type="vit_t")
    assert config == get_config("vit_t")
    for path, v in flatten_params(loaded).items():
        np.testing.assert_array_equal(v, flatten_params(params)[path], err_msg="/".join(path))
    # sam_jax -> .pth: strict load into a fresh official model computes the same embedding.
    dst = tmp_path / "back.pth"
    save_pth(dst, params_to_state_dict(params, CONFIG))
    fresh = build_official_mobile_sam(CONFIG, seed=7)
    fresh.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    fresh.eval()  # rebuilds the attention bias caches from the loaded tables
    images = np.random.RandomState(2).randn(1, 3, 256, 256).astype(np.float32)
    np.testing.assert_array_equal(
        _official_encode(fresh, images), _official_encode(official, images)
    )
    # A state_dict without the unused tensors also loads (torch itself tolerates missing
    # counters); a wrong-shaped counter is named.
    lean = {k: v for k, v in sd.items() if k not in unused_tensors(CONFIG)}
    state_dict_to_params(lean, CONFIG)
    bad = dict(sd)
    bad["image_encoder.layers.0.blocks.0.conv1.bn.num_batches_tracked"] = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        state_dict_to_params(bad, CONFIG)


# ------------------------------------------------------------------------ end to end


def _photos():
    coffee = skimage.data.coffee()
    return {
        "chelsea": skimage.data.chelsea(),  # 300 x 451 landscape
        "coffee_portrait": np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400
    }


PHOTOS = _photos()


@pytest.fixture(scope="module")
def predictors(pair):
    official, _, params = pair
    model = build_sam(CONFIG)
    out = {}
    for name, image in PHOTOS.items():
        op, ours = OfficialPredictor(official), SamPredictor(model, params)
        with torch.no_grad():
            op.set_image(image)
        ours.set_image(image)
        out[name] = (op, ours)
    return out


def _prompts(image, low_res):
    h, w = image.shape[:2]
    pts = np.array([[0.55 * w, 0.45 * h], [0.1 * w, 0.15 * h], [0.8 * w, 0.7 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.75 * w, 0.9 * h])
    return {
        "point": dict(point_coords=pts[:1], point_labels=np.array([1])),
        "points": dict(point_coords=pts, point_labels=np.array([1, 0, 1])),
        "box": dict(box=box),
        "box_point": dict(box=box, point_coords=pts[:1], point_labels=np.array([1])),
        "point_mask": dict(point_coords=pts[:1], point_labels=np.array([1]), mask_input=low_res),
    }


def test_embedding_matches_official_predictor(predictors):
    for name, (op, ours) in predictors.items():
        emb = np.asarray(ours.get_image_embedding())
        official = op.get_image_embedding().permute(0, 2, 3, 1).numpy()
        assert emb.shape == official.shape == (1, 16, 16, 256), name
        assert rel_err(emb, official) <= TOL, name


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_predict_matches_official(predictors, photo):
    op, ours = predictors[photo]
    image = PHOTOS[photo]
    with torch.no_grad():
        low_res = op.predict(np.array([[10.0, 20.0]]), np.array([1]), multimask_output=False)[2]
    for kind, kw in _prompts(image, low_res).items():
        for multimask in (True, False):
            with torch.no_grad():
                masks, iou, low = op.predict(multimask_output=multimask, **kw)
                logits = op.predict(multimask_output=multimask, return_logits=True, **kw)[0]
            got_masks, got_iou, got_low = ours.predict(multimask_output=multimask, **kw)
            what = f"{photo} {kind} multimask={multimask}"
            assert got_masks.shape == masks.shape == (3 if multimask else 1, *image.shape[:2])
            assert rel_err(got_low, low) <= TOL, what
            np.testing.assert_allclose(got_iou, iou, rtol=0, atol=TOL, err_msg=what)
            differ = got_masks != (logits > 0)
            margin = TOL * np.abs(logits).max()
            assert np.all(np.abs(logits[differ]) <= margin), what


# ------------------------------------------------------------------------ registry


@pytest.fixture
def mobile_server(pair, tmp_path, monkeypatch):
    """A MobileSAM .pt (the official model's state_dict) served over HTTP on 127.0.0.1, and a
    registry entry for it verified, as the real mobile_sam.pt is, by its git blob SHA-1."""
    official, _, _ = pair
    served = tmp_path / "served"
    served.mkdir()
    torch.save(official.state_dict(), served / "mobile_sam_test.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    blob = subprocess.run(
        ["git", "hash-object", str(served / "mobile_sam_test.pt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    model = registry.Model(
        "mobile_sam_test",
        "mobile_sam_test.pt",
        None,
        "vit_t",
        url=f"http://127.0.0.1:{httpd.server_port}/mobile_sam_test.pt",
        git_blob_sha1=blob,
    )
    monkeypatch.setitem(registry.MODELS, model.name, model)
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "cache"))
    yield model, served
    httpd.shutdown()
    httpd.server_close()


def test_registry_knows_mobile_sam():
    model = registry.lookup("vit_t")
    assert model is registry.lookup("mobile_sam")
    assert model.url == (
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt"
    )
    assert model.model_type == "vit_t" and model.sha256 is None
    assert model.git_blob_sha1 == "7ef2d090979fd9853adf17b7a99c8b94a1c5a6a7"


def test_registry_downloads_and_converts_mobile_sam(pair, mobile_server, tmp_path):
    """Download (checked by git blob SHA-1, computed here by git itself), conversion to vit_t,
    then a cache hit; a damaged cached file is refused."""
    _, _, params = pair
    model, served = mobile_server
    config, loaded = read_checkpoint(model.name)
    assert config == get_config("vit_t")
    assert os.path.isdir(registry.converted_path(model))  # converted once into the cache
    for path, v in flatten_params(loaded).items():
        np.testing.assert_array_equal(v, flatten_params(params)[path], err_msg="/".join(path))
    cached = tmp_path / "cache" / model.filename
    assert registry.git_blob_sha1(cached) == model.git_blob_sha1
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 1
    cached.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="git blob SHA-1 mismatch"):
        registry.download(model)
    (served / model.filename).write_bytes(bytes(data))  # a corrupt download keeps nothing
    cached.unlink()
    with pytest.raises(CheckpointError, match="is corrupt: git blob SHA-1"):
        registry.download(model, progress=False)
    assert not cached.exists()


def test_convert_command_round_trip(pair, tmp_path):
    """sam-jax-convert: MobileSAM .pt -> converted (orbax) -> .pth, loaded strictly by the
    official model; every param bitwise, the unused tensors written with their fill values."""
    official, sd, _ = pair
    src = tmp_path / "mobile_sam.pt"
    torch.save(official.state_dict(), src)
    assert convert_main(["--checkpoint", str(src), "--output", str(tmp_path / "conv")]) == 0
    back = tmp_path / "back.pth"
    argv = ["--checkpoint", str(tmp_path / "conv"), "--to-pytorch", "--output", str(back)]
    assert convert_main(argv) == 0
    state = torch.load(back, weights_only=True)
    build_official_mobile_sam(CONFIG, seed=8).load_state_dict(state, strict=True)
    unused = unused_tensors(CONFIG)
    for k, v in state.items():
        np.testing.assert_array_equal(v.numpy(), unused[k] if k in unused else sd[k], err_msg=k)


def test_remat_and_drop_path():
    """Rematerialised blocks compute the same embedding (the block call's static deterministic
    flag wired through nn.remat); drop path acts only in training (deterministic=False, with a
    dropout rng)."""
    config = get_config("vit_t", image_size=64, drop_path_rate=0.2)
    plain, remat = build_sam(config), build_sam(config, remat_policy="dots_saveable")
    params = plain.init_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))

    def encode(model, deterministic):
        rngs = {"dropout": jax.random.key(3)}
        fn = functools.partial(model.apply, method="encode", rngs=rngs)
        return jax.jit(lambda p, x: fn({"params": p}, x, deterministic))(params, x)

    ref = encode(plain, True)
    np.testing.assert_allclose(encode(remat, True), ref, rtol=0, atol=1e-6)
    train = encode(plain, False)
    assert float(jnp.abs(train - ref).max()) > 1e-2
    np.testing.assert_allclose(encode(remat, False), train, rtol=0, atol=1e-6)
