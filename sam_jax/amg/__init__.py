"""The automatic mask generator ("segment everything"), after the official
`SamAutomaticMaskGenerator` and `utils/amg.py`.

    generator.py  SamAutomaticMaskGenerator: point grid, crops, filters and NMS on the device
    masks.py      the helpers of utils/amg.py: grids, crop boxes, stability score, NMS, RLE

`python -m sam_jax.amg` runs the `sam-jax-amg` command (sam_jax/cli/amg.py).
"""

from sam_jax.amg.generator import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
