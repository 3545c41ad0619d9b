"""The mIoU ceiling of masks that follow a coarse grid: how fine must predicted masks be?

    python benchmarks/mask_grid_ceiling.py                          # synthetic:test, cells 2, 4, 8
    python benchmarks/mask_grid_ceiling.py --dataset "synthetic:test?min_visible=0.04" --cells 8

Each ground-truth mask is replaced by its best approximation on a grid of `cell` x `cell` pixel
blocks (a block is in when at least half of its pixels are), and the mean IoU of these
approximations against the masks is printed. A model whose masks follow its patch grid (cell =
image side / embedding grid side, e.g. 8 for the 128 px, patch 8 demo model) cannot score more;
cell = patch / 4 is the resolution of the decoder's low-res logits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from sam_jax.data import iterate_examples  # noqa: E402
from sam_jax.evaluation.metrics import mask_iou  # noqa: E402


def grid_approximation(mask: np.ndarray, cell: int) -> np.ndarray:
    """bool (H, W) -> bool (H, W): each cell x cell block set to its majority (edges padded)."""
    h, w = mask.shape
    hp, wp = -(-h // cell) * cell, -(-w // cell) * cell
    padded = np.zeros((hp, wp), np.float32)
    padded[:h, :w] = mask
    inside = np.zeros((hp, wp), np.float32)
    inside[:h, :w] = 1
    counts = padded.reshape(hp // cell, cell, wp // cell, cell).sum((1, 3))
    areas = inside.reshape(hp // cell, cell, wp // cell, cell).sum((1, 3))
    blocks = counts >= 0.5 * areas
    return np.repeat(np.repeat(blocks, cell, 0), cell, 1)[:h, :w]


def ceiling(examples, cells) -> dict[int, float]:
    ious = {c: [] for c in cells}
    for ex in examples:
        for m in np.asarray(ex["masks"], bool):
            if m.any():
                for c in cells:
                    ious[c].append(float(mask_iou(grid_approximation(m, c), m)))
    return {c: float(np.mean(v)) for c, v in ious.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="synthetic:test", help="a dataset spec (see eval.py)")
    p.add_argument("--split", default="test")
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--cells", default="2,4,8", help="comma list of block sizes in pixels")
    args = p.parse_args(argv)
    cells = [int(c) for c in args.cells.split(",")]
    examples = iterate_examples(args.dataset, split=args.split, max_images=args.max_images)
    for c, v in ceiling(examples, cells).items():
        print(f"cell {c:3d} px: mIoU ceiling {100 * v:.1f}")


if __name__ == "__main__":
    main()
