"""All instances of a phrase: the automatic mask generator's masks, kept where CLIP says they
show the phrase.

SAM's text prompt gives one mask per phrase (the paper's 7.5); for every instance, the simple
route is the one the alignment of CLIP's spaces allows: segment everything
(`SamAutomaticMaskGenerator`), embed each mask's D.5 crop with CLIP's image tower
(`TextEncoder.embed_regions`: 1.5x square crop, masked attention), and keep the masks whose
cosine similarity with the phrase's text embedding is at least `min_similarity`, or, without
one, within `margin` of the best mask's (so an image always yields its best match). The
similarity is each record's "text_similarity"; records come best first, at most `top_k` of them.
Any SAM serves (the text path is not used: a released SAM with a real CLIP works), the CLIP does
the naming. `sam-jax-amg --text PHRASE` is the command (`with_output_mode` gives its RLEs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_jax.amg.generator import SamAutomaticMaskGenerator
from sam_jax.amg.masks import coco_encode_rle, mask_to_rle
from sam_jax.text import TextEncoder

DEFAULT_MARGIN = 0.05


def find_phrase(
    generator: SamAutomaticMaskGenerator,
    encoder: TextEncoder,
    image: np.ndarray,
    text: str,
    min_similarity: float | None = None,
    margin: float = DEFAULT_MARGIN,
    top_k: int | None = None,
) -> list[dict[str, Any]]:
    """The generator's records for uint8 (H, W, 3) `image` (output_mode "binary_mask": bool
    (H, W) "segmentation") that show `text`, each with "text_similarity" (cosine of its
    region's CLIP image embedding and the phrase's text embedding), best first, at most top_k.
    A generator that returns RLEs is refused (ValueError)."""
    if generator.output_mode != "binary_mask":
        raise ValueError('find_phrase needs a generator with output_mode "binary_mask"')
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    records = generator.generate(image)
    if not records:
        return []
    masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
    regions = encoder.embed_regions(image, masks)
    sims = regions @ encoder.embed_texts([text])[0]
    cut = float(sims.max()) - margin if min_similarity is None else float(min_similarity)
    order = [int(i) for i in np.argsort(-sims, kind="stable") if sims[i] >= cut][:top_k]
    return [{**records[i], "text_similarity": float(sims[i])} for i in order]


def with_output_mode(records: list[dict[str, Any]], output_mode: str) -> list[dict[str, Any]]:
    """`find_phrase`'s records with their bool (H, W) masks as the generator's `output_mode`
    writes them: as they are ("binary_mask"), uncompressed or COCO RLEs."""
    if output_mode == "binary_mask":
        return records
    out = []
    for r in records:
        rle = mask_to_rle(np.asarray(r["segmentation"], bool)[None])[0]
        out.append(
            {**r, "segmentation": coco_encode_rle(rle) if output_mode == "coco_rle" else rle}
        )
    return out
