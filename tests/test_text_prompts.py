"""Text prompts (issue 31 items 1-3): CLIP's tokenizer (transformers) against open_clip's, CLIP by
Hub id, the prompt encoder's text token (absent: nothing changes), D.5's crops and masked
attention, text prompts in the train step, the predictor / command / evaluation paths and the
refusal of a model without a text path. Small random models throughout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import text as text_path
from sam_jax.checkpoints import clip as clip_ckpt
from sam_jax.checkpoints import mapping
from sam_jax.config import tiny_config
from sam_jax.data.synthetic import COLOR_NAMES, SHAPES, color_name, synthetic_example
from sam_jax.errors import NoTextPathError
from sam_jax.modeling import build_sam
from sam_jax.modeling.clip import Clip, ClipConfig
from sam_jax.predictor import SamPredictor
from sam_jax.training import clip_train, prompt_sampling

E = 16
CLIP_CONFIG = dict(
    embed_dim=E, image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2,
    vision_mlp_dim=64, context_length=8, text_width=32, text_layers=1, text_heads=2,
    text_mlp_dim=64,
)  # fmt: skip
SAM_CONFIG = tiny_config(text_embed_dim=E)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random CLIP written as a transformers folder with the synthetic names' tokenizer."""
    folder = tmp_path_factory.mktemp("clip") / "clip"
    words = sorted({w for n in clip_train.synthetic_names() for w in n.split()})
    vocab = clip_train.write_bpe_vocab(str(folder), words, CLIP_CONFIG["context_length"])
    config = ClipConfig(vocab_size=vocab, **CLIP_CONFIG)
    params = Clip(config).init_params(jax.random.key(0))
    clip_ckpt.save_hf_clip(folder, config, jax.device_get(params))
    return folder


@pytest.fixture(scope="module")
def encoder(clip_dir) -> text_path.TextEncoder:
    return text_path.load_text_encoder(clip_dir)


@pytest.fixture(scope="module")
def sam():
    model = build_sam(SAM_CONFIG)
    return model, model.init_params(jax.random.key(1))


# ------------------------------------------------------------------ tokenizer and Hub ids


def test_tokenizer_matches_open_clip(tmp_path):
    """transformers' CLIPTokenizer over OpenAI's BPE (open_clip's copy, written as vocab.json and
    merges.txt) gives open_clip.tokenize's ids up to the end-of-text token."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}  # OpenAI's special names
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "model_max_length": 77,
    }))  # fmt: skip
    tok = clip_ckpt.load_clip_tokenizer(tmp_path, 77)
    texts = ["a red triangle", "Two DOGS, playing!", "the cat's hat (blue)", "x" * 3 + " 42"]
    ours = tok(texts)
    want = open_clip.tokenize(texts).numpy()
    eot = vocab["<|endoftext|>"]
    assert ours.shape == want.shape == (4, 77) and ours.dtype == np.int32
    for o, w in zip(ours, want, strict=True):
        end = int(np.argmax(w == eot))
        np.testing.assert_array_equal(o[: end + 1], w[: end + 1])
        assert int(np.argmax(o)) == int(np.argmax(w)) == end  # the pooled position
    long = tok(["word " * 100])[0]
    assert long[-1] == eot and long[0] == vocab["<|startoftext|>"]


def _fill_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """huggingface_hub's cache layout: blobs named by SHA-256, a snapshot of links, refs/main."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))


def test_clip_and_tokenizer_load_by_hub_id(clip_dir, encoder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    _fill_hub_cache(tmp_path, "acme/tiny-clip", clip_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = text_path.load_text_encoder("acme/tiny-clip")
    assert hub.clip.config == encoder.clip.config
    names = ["red ring", "a blue rectangle"]
    np.testing.assert_array_equal(hub.tokenizer(names), encoder.tokenizer(names))
    np.testing.assert_array_equal(hub.embed_texts(names), encoder.embed_texts(names))
    with pytest.raises(clip_ckpt.CheckpointError, match="not in the Hugging Face cache"):
        text_path.load_text_encoder("acme/missing-clip")


def test_synthetic_names_tokenize_to_one_token_per_word(encoder):
    ids = encoder.tokenizer(clip_train.synthetic_names())
    vocab = encoder.clip.config.vocab_size
    assert (ids[:, 0] == vocab - 2).all() and (ids[:, 3] == vocab - 1).all()  # start, 2 words, end
    assert len({tuple(r[1:3]) for r in ids}) == len(COLOR_NAMES) * len(SHAPES)


# ------------------------------------------------------------------ the model's text token


def test_no_text_changes_nothing_and_text_does(sam):
    """The text path absent (or masked out) leaves the decoder's outputs as they were; the
    projection has our torch key and round-trips through a state_dict."""
    model, params = sam
    plain = build_sam(SAM_CONFIG.replace(text_embed_dim=0))
    plain_params = {**params, "prompt_encoder": dict(params["prompt_encoder"])}
    del plain_params["prompt_encoder"]["text_projection"]
    emb = jax.random.normal(jax.random.key(2), (1, 8, 8, 32))
    pts = jnp.asarray([[[[40.0, 50.0], [0.0, 0.0]], [[90.0, 20.0], [0.0, 0.0]]]])
    labels = jnp.asarray([[[1, -1], [1, -1]]])
    want = plain.apply({"params": plain_params}, emb, pts, labels, method=plain.decode)
    got = model.apply({"params": params}, emb, pts, labels, method=model.decode)
    np.testing.assert_array_equal(got[0], want[0])
    text = jax.random.normal(jax.random.key(3), (1, 2, E))
    off = model.apply(
        {"params": params}, emb, pts, labels, text=text, has_text=jnp.zeros((1, 2), bool),
        method=model.decode,
    )  # fmt: skip
    np.testing.assert_allclose(off[0], want[0], atol=1e-4)
    on = model.apply({"params": params}, emb, pts, labels, text=text, method=model.decode)
    assert float(jnp.abs(on[0] - want[0]).max()) > 1e-2
    # Only the direction of the CLIP embedding counts (D.5 normalises it).
    scaled = model.apply({"params": params}, emb, pts, labels, text=3 * text, method=model.decode)
    np.testing.assert_allclose(scaled[0], on[0], atol=1e-4)
    sd = mapping.params_to_state_dict(params, SAM_CONFIG)
    assert sd["prompt_encoder.text_projection.weight"].shape == (32, E)
    assert mapping.infer_config(sd).text_embed_dim == E
    back = mapping.state_dict_to_params(sd, SAM_CONFIG)
    np.testing.assert_array_equal(
        back["prompt_encoder"]["text_projection"]["kernel"],
        params["prompt_encoder"]["text_projection"]["kernel"],
    )


# ------------------------------------------------------------------ D.5's crops and attention


def test_region_crops_follow_d5():
    """A 20 x 10 rectangle: the deterministic crop is the square of 1.5 x its long side around
    its centre; random crops expand 1-2x and zero the outside in about half of the masks."""
    images = jnp.full((1, 64, 64, 3), 200.0)
    masks = jnp.zeros((1, 1, 64, 64), bool).at[0, 0, 20:30, 10:30].set(True)
    crops, cm = text_path.region_crops(images, masks, size=30)
    # side 30 px at scale 1 around the centre (20, 25): the mask's 20 x 10 px in a 30 px crop
    assert int(cm.sum()) == pytest.approx(200, abs=40)
    ys, xs = np.nonzero(np.asarray(cm[0, 0]))
    assert abs(xs.mean() - 14.5) < 1 and abs(ys.mean() - 14.5) < 1
    assert float(crops.min()) > 150  # nothing zeroed without a key
    masks8 = jnp.broadcast_to(masks, (1, 200, 64, 64))
    crops, cm = text_path.region_crops(images, masks8, 30, key=jax.random.key(0))
    frac = np.asarray(cm.mean(axis=(-2, -1)))[0]
    assert frac.min() >= 200 / 40**2 - 0.02 and frac.max() <= 200 / 20**2 + 0.02
    zeroed = np.asarray((crops[..., 0] == 0).any(axis=(-2, -1)))[0]
    assert 0.35 < zeroed.mean() < 0.65


def test_masked_attention_reads_only_the_region():
    """In a one-layer CLIP the output token attends to the region's patches only, so pixels of
    other patches cannot change the image embedding; without a region they do."""
    config = ClipConfig(**{**CLIP_CONFIG, "vision_layers": 1, "vocab_size": 20})
    clip = Clip(config)
    params = clip.init_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
    y = x.at[:, 8:, :, :].set(0.0)  # the bottom half's patches changed
    region = jnp.zeros((1, 16), bool).at[0, :8].set(True)  # the top two patch rows

    def enc(img, reg):
        return clip.apply({"params": params}, img, reg, method=clip.encode_image)

    np.testing.assert_allclose(enc(x, region), enc(y, region), atol=1e-6)
    assert float(jnp.abs(enc(x, None) - enc(y, None)).max()) > 1e-3
    full = jnp.ones((1, 16), bool)
    np.testing.assert_allclose(enc(x, full), enc(x, None), atol=1e-6)


# ------------------------------------------------------------------ data and training


def test_synthetic_objects_are_named():
    ex = synthetic_example(3, "test")
    assert len(ex["names"]) == len(ex["masks"])
    for name in ex["names"]:
        colour, shape = name.split()
        assert colour in COLOR_NAMES and shape in SHAPES
    assert color_name(0.0) == color_name(0.99) == "red" and color_name(2 / 3) == "blue"


def test_text_first_prompt_layout():
    labels = jnp.asarray([[[1, -10, -1, -10, -10], [-10, -10, -10, 2, 3]]])
    prompts = {
        "points": jnp.zeros((1, 2, 5, 2)), "labels": labels,
        "num_clicks": jnp.asarray([[1, 0]]), "is_box": jnp.asarray([[False, True]]),
    }  # fmt: skip
    out = prompt_sampling.text_first(prompts, jnp.asarray([[True, True]]))
    np.testing.assert_array_equal(out["labels"][0], [[-10, -10, -1, -10, -10]] * 2)
    assert out["num_clicks"].tolist() == [[0, 0]] and not out["is_box"].any()
    same = prompt_sampling.text_first(prompts, jnp.asarray([[False, False]]))
    np.testing.assert_array_equal(same["labels"], labels)


def test_train_step_uses_text_prompts(sam, encoder):
    """Text prompts only for masks above text_min_area, at text_prob; the loss is finite and its
    gradient reaches the text projection only when text prompts are used."""
    import ml_collections

    from sam_jax.training import train_step
    from sam_jax.training.defaults import base_config

    model, params = sam
    tc = base_config().train
    tc.num_rounds = 2
    tc.text_prob = 1.0
    tc.text_min_area = 20 * 20  # input pixels (128 px input, 32 px low-res masks: 4 x 4 each)
    masks = np.zeros((1, 2, 32, 32), np.uint8)
    masks[0, 0, 4:14, 4:14] = 1  # 40 x 40 input pixels
    masks[0, 1, 20:23, 20:23] = 1  # 12 x 12: too small
    image = np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), np.uint8)
    batch = {
        "image": image, "image_hw": np.array([[128, 128]], np.int32), "masks": masks,
        "mask_valid": np.ones((1, 2), bool),
    }  # fmt: skip
    batch["text_embedding"] = np.asarray(
        text_path.region_embeddings(encoder.clip, encoder.params, image * 1.0, masks > 0)
    )
    emb = model.apply({"params": params}, jnp.zeros((1, 128, 128, 3)), method=model.encode)

    def loss(p, tc):
        batch_j = jax.tree.map(jnp.asarray, batch)
        return train_step.simulate_and_loss(model, p, emb, batch_j, jax.random.key(0), tc)

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, tc)
    assert np.isfinite(float(value))
    assert float(metrics["text_prompt_fraction"]) == pytest.approx(0.5)
    g = grads["prompt_encoder"]["text_projection"]["kernel"]
    assert float(jnp.abs(g).max()) > 0
    tc_off = ml_collections.ConfigDict(tc.to_dict())
    tc_off.text_prob = 0.0
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, tc_off)
    assert float(metrics["text_prompt_fraction"]) == 0.0
    assert float(jnp.abs(grads["prompt_encoder"]["text_projection"]["kernel"]).max()) == 0.0


# ------------------------------------------------------------------ inference


def test_predictor_text_prompts(sam, encoder):
    """predict(text=) is the decoder given the phrase's CLIP embedding (and the padding point);
    predict_batch(texts=) agrees row by row; a SAM without a text path refuses in one line."""
    from sam_jax import functional as F

    model, params = sam
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)
    predictor = SamPredictor(model, params, text_encoder=encoder)
    predictor.set_image(image)
    masks, iou, low = predictor.predict(text="red ring")
    assert masks.shape == (3, 96, 128) and iou.shape == (3,)
    text = encoder.embed_texts(["red ring"])[None]
    pts, labels = jnp.zeros((1, 1, 1, 2)), jnp.full((1, 1, 1), -1)
    want_low, want_iou = F.decode_prompts(
        model, params, predictor.features, pts, labels, text_embeddings=text
    )
    np.testing.assert_allclose(low, want_low[0, 0], atol=1e-4)
    np.testing.assert_allclose(iou, want_iou[0, 0], atol=1e-5)
    bm, biou, blow = predictor.predict_batch(texts=["blue ellipse", "red ring"])
    np.testing.assert_allclose(blow[1], low, atol=1e-4)
    # With a point: the text token and the point together (one output by default rule).
    m1, _, _ = predictor.predict(np.array([[30.0, 40.0]]), np.array([1]), text="red ring")
    m0, _, _ = predictor.predict(np.array([[30.0, 40.0]]), np.array([1]))
    assert (m1 != m0).any()
    plain = build_sam(tiny_config())
    p2 = SamPredictor(plain, plain.init_params(jax.random.key(0)), text_encoder=encoder)
    p2.set_image(image)
    with pytest.raises(NoTextPathError, match="no text path") as e:
        p2.predict(text="red ring")
    assert "\n" not in str(e.value)
    with pytest.raises(NoTextPathError, match="no text path"):
        F.decode_prompts(plain, p2.params, p2.features, pts, labels, text_embeddings=text)


def test_predict_command_text(sam, clip_dir, tmp_path, capsys):
    """sam-jax-predict --text with a converted checkpoint whose config names its CLIP; a
    checkpoint without a text path is a one-line usage error (exit 2)."""
    from PIL import Image

    from sam_jax.checkpoints.converted import save_converted
    from sam_jax.cli.predict import main

    model, params = sam
    ckpt = tmp_path / "ckpt"
    save_converted(ckpt, SAM_CONFIG.replace(text_encoder=str(clip_dir)), jax.device_get(params))
    image = tmp_path / "image.png"
    Image.fromarray(synthetic_example(0, "test")["image"]).save(image)
    out = tmp_path / "out"
    rc = main(["--checkpoint", str(ckpt), "--image", str(image), "--output", str(out),
               "--text", "red ring"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["text"] == "red ring" and len(summary["masks"]) == 3
    plain = tmp_path / "plain"
    save_converted(plain, tiny_config(), jax.device_get(build_sam(tiny_config()).init_params(
        jax.random.key(0))))  # fmt: skip
    capsys.readouterr()
    rc = main(["--checkpoint", str(plain), "--image", str(image), "--output",
               str(tmp_path / "out2"), "--text", "red ring"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no text path" in err and len(err.splitlines()) == 1


def test_text_evaluation_task(sam, encoder):
    """The text task on two synthetic test images: uniquely named masks, the three prompts, and
    the text mIoU equal to an independent computation through predict()."""
    from sam_jax.evaluation.checkpoint import EvalSettings, evaluate_checkpoint
    from sam_jax.evaluation.metrics import mask_iou

    model, params = sam
    predictor = SamPredictor(model, params, text_encoder=encoder)
    spec = "synthetic:test?num_images=2&image_size=96"
    results = evaluate_checkpoint(predictor, [spec], EvalSettings(task="text", max_images=2))
    entry = results["datasets"][spec]
    assert entry["task"] == "text" and entry["num_images"] == 2
    assert set(entry["text_miou"]) == {"text", "text_oracle", "point", "text+point", "region"}
    assert entry["text_miou"]["text_oracle"] >= entry["text_miou"]["text"]
    ious = []
    from sam_jax.data.synthetic import SyntheticConfig

    for i in range(2):
        ex = synthetic_example(i, "test", SyntheticConfig(image_size=96, num_test=2))
        predictor.set_image(ex["image"])
        for name, gt in zip(ex["names"], ex["masks"], strict=True):
            if ex["names"].count(name) > 1:
                continue
            masks, iou, _ = predictor.predict(text=name)
            ious.append(float(mask_iou(masks[np.argmax(iou)], gt)))
    assert entry["num_masks"] == len(ious)
    assert entry["text_miou"]["text"] == pytest.approx(np.mean(ious), abs=1e-9)


def test_find_phrase_keeps_masks_by_clip_similarity(encoder):
    """All instances of a phrase: the generator's masks ranked by their regions' CLIP similarity
    with the phrase (checked against embed_regions directly), the kept ones within the margin."""
    from sam_jax.amg import SamAutomaticMaskGenerator
    from sam_jax.amg.phrase import find_phrase

    model = build_sam(tiny_config())
    params = model.init_params(jax.random.key(0))
    generator = SamAutomaticMaskGenerator(
        model, params, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    image = synthetic_example(0, "test")["image"]
    every = find_phrase(generator, encoder, image, "red ring", min_similarity=-2.0)
    assert every, "the generator found no mask"
    masks = np.stack([r["segmentation"] for r in every])
    want = encoder.embed_regions(image, masks) @ encoder.embed_texts(["red ring"])[0]
    got = np.array([r["text_similarity"] for r in every])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (np.diff(got) <= 0).all()
    kept = find_phrase(generator, encoder, image, "red ring", margin=0.01)
    assert [r["text_similarity"] for r in kept] == [s for s in got if s >= got[0] - 0.01]


def test_sam_checkpoint_gains_a_text_path(sam):
    """init.type "sam" with model_overrides.text_embed_dim: the checkpoint's params as they are,
    plus a fresh projection of the model's shapes (a text checkpoint keeps its own)."""
    from sam_jax.training.initialization import with_text_projection

    model, params = sam
    plain = {**params, "prompt_encoder": dict(params["prompt_encoder"])}
    del plain["prompt_encoder"]["text_projection"]
    out = with_text_projection(jax.device_get(plain), SAM_CONFIG, seed=0)
    want = jax.eval_shape(model.init_params, jax.random.key(0))
    assert jax.tree.map(np.shape, out) == jax.tree.map(lambda x: x.shape, want)
    np.testing.assert_array_equal(out["mask_decoder"]["iou_token"]["embedding"],
                                  params["mask_decoder"]["iou_token"]["embedding"])  # fmt: skip
    assert float(np.abs(out["prompt_encoder"]["text_projection"]["kernel"]).max()) > 0
    assert with_text_projection(params, SAM_CONFIG, seed=0) is params
    assert with_text_projection(plain, SAM_CONFIG.replace(text_embed_dim=0), seed=0) is plain
