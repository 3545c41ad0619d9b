"""Shared helpers for the training tests: a tiny train config and a fake batch iterator."""

from __future__ import annotations

import numpy as np

from sam_jax.training.defaults import base_config


def tiny_train_config():
    """A very small model and recipe (compiles in seconds on a 2-core CPU)."""
    c = base_config()
    c.model = "tiny"
    c.model_overrides.image_size = 64
    c.model_overrides.patch_size = 16
    c.model_overrides.encoder_embed_dim = 32
    c.model_overrides.encoder_depth = 2
    c.model_overrides.encoder_num_heads = 2
    c.model_overrides.window_size = 2
    c.model_overrides.prompt_embed_dim = 32
    c.model_overrides.decoder_depth = 1
    c.model_overrides.decoder_mlp_dim = 32
    c.model_overrides.drop_path_rate = 0.1
    c.dtype = "float32"
    c.remat_policy = "none"
    c.batch_size = 2
    c.data.max_masks = 3
    c.total_steps = 4
    c.train.num_rounds = 4
    c.train.box_noise_max = 2.0
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 2
    c.optimizer.decay = "cosine"
    c.optimizer.layer_decay = 0.8
    c.mesh_shape = (1, 1)
    c.checkpoint.every_steps = 2
    c.checkpoint.max_to_keep = 5
    c.log_every_steps = 1
    c.progress_bar = False
    return c


def fake_batch(index: int, batch_size: int, image_size: int, mask_size: int, max_masks: int):
    """Batch `index` of a deterministic fake dataset: random rectangles on noise images."""
    rng = np.random.default_rng(index)
    s, m = image_size, mask_size
    image = rng.integers(0, 60, (batch_size, s, s, 3), dtype=np.uint8)
    masks = np.zeros((batch_size, max_masks, m, m), np.uint8)
    valid = np.zeros((batch_size, max_masks), bool)
    for b in range(batch_size):
        for k in range(int(rng.integers(1, max_masks + 1))):
            y0, x0 = rng.integers(0, m - 3, 2)
            h, w = rng.integers(2, m // 2, 2)
            masks[b, k, y0 : y0 + h, x0 : x0 + w] = 1
            image[b, y0 * s // m : (y0 + h) * s // m, x0 * s // m : (x0 + w) * s // m, k % 3] = 250
            valid[b, k] = True
    hw = np.full((batch_size, 2), s, np.int32)
    return {"image": image, "image_hw": hw, "masks": masks, "mask_valid": valid}


def fake_iterator(config, sam_config, start_batch, rows=None, index_dir=None):
    """make_iterator for train_and_evaluate: the rows `rows` of the global fake batches
    start_batch, start_batch + 1, ... (each global batch depends on its index only)."""
    del index_dir
    rows = list(range(config.batch_size)) if rows is None else list(rows)
    i = start_batch
    while True:
        batch = fake_batch(
            i,
            config.batch_size,
            sam_config.image_size,
            sam_config.low_res_size,
            config.data.max_masks,
        )
        yield {k: v[rows] for k, v in batch.items()}
        i += 1
