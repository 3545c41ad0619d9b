"""A small CLIP trained contrastively on the synthetic shapes and their names (the text demo).

No pre-trained CLIP can be downloaded where this project is tested, so the text path is shown end
to end on the synthetic data: every object there has a name, "<colour> <shape>" (`data.synthetic`,
e.g. "red ring"). This trains both CLIP towers on D.5's crops around the masks (`sam_jax.text`:
the same crops, zeroing and masked attention SAM's training then uses) against the names, and
writes a transformers CLIPModel folder (config.json, model.safetensors and a CLIP tokenizer's
vocab.json / merges.txt) that `sam_jax.text.load_text_encoder` reads like a real CLIP:

    python -m sam_jax.training.clip_train --config configs/clip_synthetic.py --workdir W

Objective: for each crop, the softmax over the embeddings of all names (CLIP's image -> text
cross-entropy with the whole label set, which avoids the false negatives of duplicate names in a
batch), at CLIP's learned temperature. The tokenizer is transformers' CLIPTokenizer over a
byte-pair vocabulary of the synthetic words (`write_bpe_vocab`: CLIP's 512 byte tokens, the
merges that make each word one token, then <|startoftext|> and <|endoftext|>, last as in
OpenAI's vocabulary, so the text tower pools at the largest id).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sam_jax import text as text_prompts
from sam_jax.checkpoints.clip import load_clip_tokenizer, save_hf_clip
from sam_jax.data.synthetic import COLOR_NAMES, SHAPES, SyntheticConfig, synthetic_example
from sam_jax.modeling.clip import Clip, ClipConfig

START, END = "<|startoftext|>", "<|endoftext|>"


def synthetic_names() -> list[str]:
    """Every name a synthetic object can have (colour x shape), in a fixed order."""
    return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins of the 256 byte values, in their vocabulary order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    keep += list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in keep] + [chars[b] for b in range(256) if b not in keep]


def learn_bpe(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (in rank order) after which each word is one token "word</w>": the most
    frequent adjacent pair first (ties by the pair itself), as BPE is learned."""
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        pairs = Counter(p for s in seqs.values() for p in zip(s, s[1:], strict=False))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def write_bpe_vocab(folder: str, words: Sequence[str], context_length: int) -> int:
    """Writes a CLIP tokenizer's files (vocab.json, merges.txt, tokenizer_config.json) for
    `words` into folder; returns the vocabulary size."""
    base = _bytes_to_unicode()
    merges = learn_bpe(words)
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": END,
        "do_lower_case": True,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)
    return len(vocab)


def crop_dataset(num_images: int, max_masks: int, image_size: int, seed: int):
    """Synthetic train images (N, S, S, 3) uint8, masks (N, M, S, S) bool padded with empty
    masks, and name indices (N, M) int32 (-1 for padding)."""
    cfg = SyntheticConfig(image_size=image_size, num_train=num_images, seed=seed)
    index = {n: i for i, n in enumerate(synthetic_names())}
    images = np.zeros((num_images, image_size, image_size, 3), np.uint8)
    masks = np.zeros((num_images, max_masks, image_size, image_size), bool)
    labels = np.full((num_images, max_masks), -1, np.int32)
    for i in range(num_images):
        ex = synthetic_example(i, "train", cfg)
        k = min(len(ex["names"]), max_masks)
        images[i], masks[i, :k] = ex["image"], ex["masks"][:k]
        labels[i, :k] = [index[n] for n in ex["names"][:k]]
    return images, masks, labels


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.clip = ml_collections.ConfigDict(dict(
        embed_dim=64, image_size=32, patch_size=8, vision_width=96, vision_layers=3,
        vision_heads=4, vision_mlp_dim=192, context_length=8, text_width=64, text_layers=2,
        text_heads=4, text_mlp_dim=128, hidden_act="quick_gelu",
    ))  # fmt: skip
    c.num_images = 1500
    c.image_size = 128
    c.max_masks = 8
    c.batch_images = 16
    c.steps = 1500
    c.lr = 2e-3
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.seed = 0
    c.log_every = 100
    return c


def _loss_fn(clip: Clip, params, crops, region, labels, valid, ids):
    img = clip.apply({"params": params}, crops, region, method=clip.encode_image)
    txt = clip.apply({"params": params}, ids, method=clip.encode_text)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))
    logits = scale * img @ txt.T
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    loss = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
    acc = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / jnp.maximum(valid.sum(), 1)
    return loss, acc


def train_clip(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict[str, Any]:
    """Trains the synthetic CLIP; writes WORKDIR/clip (a transformers CLIPModel folder with its
    tokenizer) and WORKDIR/clip_metrics.json; returns the metrics."""
    t_start = time.perf_counter()
    folder = os.path.join(workdir, "clip")
    names = synthetic_names()
    words = sorted({w for n in names for w in n.split()})
    vocab_size = write_bpe_vocab(folder, words, config.clip.context_length)
    clip_config = ClipConfig(vocab_size=vocab_size, **config.clip.to_dict())
    tokenizer = load_clip_tokenizer(folder, clip_config.context_length)
    ids = jnp.asarray(tokenizer(names))
    images, masks, labels = crop_dataset(
        config.num_images, config.max_masks, config.image_size, config.seed
    )
    t_data = time.perf_counter() - t_start
    log(f"{len(images)} images, {(labels >= 0).sum()} crops, {len(names)} names ({t_data:.0f} s)")
    clip = Clip(clip_config)
    params = clip.init_params(jax.random.key(config.seed))
    warmup = min(config.warmup_steps, config.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, config.steps)
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = tx.init(params)
    p = clip_config.patch_size

    @jax.jit
    def step(params, opt_state, images, masks, labels, key):
        crops, crop_masks = text_prompts.region_crops(
            images.astype(jnp.float32), masks, clip_config.image_size, key
        )
        b, m = labels.shape
        s = clip_config.image_size
        crops = text_prompts.normalize_clip(crops).reshape(b * m, s, s, 3)
        region = text_prompts.patch_regions(crop_masks, p).reshape(b * m, -1)
        lab = labels.reshape(-1)
        (loss, acc), grads = jax.value_and_grad(
            lambda q: _loss_fn(clip, q, crops, region, lab, lab >= 0, ids), has_aux=True
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    history, t0 = [], time.perf_counter()
    for i in range(config.steps):
        pick = rng.choice(len(images), config.batch_images, replace=False)
        params, opt_state, loss, acc = step(
            params, opt_state, images[pick], masks[pick], labels[pick], jax.random.fold_in(key, i)
        )
        if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
            history.append({"step": i + 1, "loss": float(loss), "accuracy": float(acc)})
            log(f"step {i + 1}: loss {float(loss):.3f}, crop->name accuracy {float(acc):.3f}")
    train_seconds = time.perf_counter() - t0
    save_hf_clip(folder, clip_config, jax.device_get(params))
    metrics = {
        "history": history,
        "train_seconds": train_seconds,
        "data_seconds": t_data,
        "total_seconds": time.perf_counter() - t_start,
        "num_names": len(names),
        "clip_config": clip_config.to_dict(),
    }
    metrics["test"] = evaluate_clip(folder)
    log(f"synthetic:test naming: {metrics['test']}")
    with open(os.path.join(workdir, "clip_metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    log(f"wrote {folder} ({train_seconds:.0f} s of training)")
    return metrics


def evaluate_clip(folder: str, num_images: int = 64, split: str = "test") -> dict[str, float]:
    """Zero-shot naming of the synthetic `split`'s masks by a CLIP folder: each mask's
    deterministic D.5 crop (1.5x, masked attention) against the text embeddings of all names;
    top-1 accuracy overall, of the colour and of the shape, and the mean cosine similarity of a
    crop with its own name's text (the image-text gap SAM's text path has to bridge)."""
    encoder = text_prompts.load_text_encoder(folder)
    names = synthetic_names()
    txt = encoder.embed_texts(names)
    hits = colour = shape = 0
    sims = []
    total = 0
    for i in range(num_images):
        ex = synthetic_example(i, split)
        img = encoder.embed_regions(ex["image"], ex["masks"])
        pred = np.argmax(img @ txt.T, axis=-1)
        for p, name, e in zip(pred, ex["names"], img, strict=True):
            got = names[p].split()
            want = name.split()
            hits += got == want
            colour += got[0] == want[0]
            shape += got[1] == want[1]
            sims.append(float(e @ txt[names.index(name)]))
            total += 1
    return {
        "num_masks": total,
        "accuracy": hits / total,
        "colour_accuracy": colour / total,
        "shape_accuracy": shape / total,
        "mean_image_text_cosine": float(np.mean(sims)),
    }


def load_config(path: str) -> ml_collections.ConfigDict:
    """get_config() of a Python config file (configs/clip_synthetic.py)."""
    spec = importlib.util.spec_from_file_location("clip_config", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam_jax.training.clip_train")
    parser.add_argument("--config", required=True, help="a file whose get_config() returns one")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override config.steps")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.steps is not None:
        config.steps = args.steps
    os.makedirs(args.workdir, exist_ok=True)
    train_clip(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
