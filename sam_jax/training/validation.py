"""Periodic validation during training: single- and multi-point mIoU on a held-out split.

Runs the zero-shot point protocol of `sam_jax.evaluation.evaluate_points` (first click farthest
from the boundary, RITM correction clicks, most confident mask, original resolution) through a
`SamPredictor` on the current parameters, so the numbers match `eval.py` on the same examples.
"""

from __future__ import annotations

from typing import Any

import jax

from sam_jax import SamPredictor, distributed
from sam_jax.data import iterate_examples
from sam_jax.evaluation import evaluate_points
from sam_jax.params import host_params


def load_examples(spec: str, split: str, max_images: int, seed: int = 0) -> list[dict]:
    """The first max_images held-out examples of a dataset spec, kept in memory."""

    return list(iterate_examples(spec, split=split, max_images=max_images, seed=seed))


class Validator:
    """Evaluates point-prompt mIoU of params on fixed held-out examples."""

    def __init__(
        self, eval_model: Any, examples: list[dict], num_points, max_masks, batch_size, feed_mask
    ):
        self.model = eval_model
        self.feed_mask = bool(feed_mask)
        self.examples = examples
        self.num_points = tuple(int(n) for n in num_points)
        self.max_masks = max_masks or None
        self.batch_size = batch_size

    def __call__(self, params: Any) -> dict[str, float]:

        predictor = SamPredictor(self.model, host_params(params))
        # Each process evaluates its share of the images; the result covers all of them.
        result = evaluate_points(
            predictor,
            self.examples[jax.process_index() :: jax.process_count()],
            num_points=self.num_points,
            max_masks=self.max_masks,
            batch_size=self.batch_size,
            feed_mask=self.feed_mask,
            all_gather=distributed.all_gather,
        )
        out = {f"val/miou_{n}": v for n, v in result["miou"].items()}
        out["val/oracle_miou_1"] = result["oracle_miou_1"]
        out["val/num_masks"] = result["num_masks"]
        out["val/seconds"] = result["timing"]["seconds"]
        return out
