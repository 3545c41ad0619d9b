"""Text prompts in training (SAM paper D.5): each batch gets the CLIP image embedding of every
mask's region, `text_embedding` (B, M, E), which the train step gives some masks as their first
prompt (train.text_prob, train.text_min_area; `train_step`).

The CLIP is the SAM config's `text_encoder` (a transformers CLIPModel folder or Hub id; the
paper's is ViT-L/14 at 336 px), frozen. Its embeddings are computed on the host's batch before
sharding, from the image and the low-res masks (`sam_jax.text.region_embeddings`: D.5's random
1-2x square crop, pixels outside the mask zeroed half of the time, the last layer's attention
restricted to the mask), with a key that is a function of the seed and the batch number only, so
a resumed run sees the same prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import text as text_path
from sam_jax.errors import ConfigError


class TextPromptBatches:
    """The pipeline's batches (which carry `image` and `masks`) with `text_embedding` added."""

    def __init__(
        self, batches: Iterator[dict], encoder: text_path.TextEncoder, seed: int, start: int
    ):
        self.batches, self.encoder = batches, encoder
        self.key = jax.random.fold_in(jax.random.key(seed), 0x7E47)
        self.count = start
        clip = encoder.clip

        @jax.jit
        def embed(params, image, masks, key):
            return text_path.region_embeddings(
                clip, params, image.astype(jnp.float32), masks > 0, key
            )

        self._embed = embed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        emb = self._embed(self.encoder.params, batch["image"], batch["masks"], key)
        batch["text_embedding"] = np.asarray(emb, np.float32)
        return batch

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


def wrap(config: Any, sam_config: Any, batches: Iterator[dict], start_batch: int, say) -> Any:
    """`batches` with text prompts' embeddings when config.train.text_prob > 0 (ConfigError,
    one line, when the model has no text path or its CLIP does not fit it), else as they are."""
    if config.train.text_prob <= 0:
        return batches
    if not sam_config.text_embed_dim or not sam_config.text_encoder:
        raise ConfigError(
            "config field train.text_prob > 0 needs a text path: set "
            "model_overrides.text_embed_dim (the CLIP's width) and model_overrides.text_encoder "
            "(a CLIP folder or Hub id)"
        )
    encoder = text_path.load_text_encoder(sam_config.text_encoder)
    if encoder.embed_dim != sam_config.text_embed_dim:
        raise ConfigError(
            f"config field model_overrides.text_embed_dim is {sam_config.text_embed_dim} but the "
            f"CLIP {sam_config.text_encoder} gives {encoder.embed_dim}-wide embeddings"
        )
    c = encoder.clip.config
    say(f"text prompts: CLIP {sam_config.text_encoder} ({c.image_size} px crops, E {c.embed_dim})")
    return TextPromptBatches(batches, encoder, config.seed, start_batch)
