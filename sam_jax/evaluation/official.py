"""The official PyTorch SAM behind the evaluation predictor interface (reference / cross-checks).

Imports torch and segment_anything lazily; nothing in the inference path imports this module.
Used to run the evaluation protocol on the reference implementation, e.g.
`evaluate_points(OfficialPredictor(sam_model_registry["vit_b"](ckpt)), examples)`.
"""

from __future__ import annotations

import numpy as np


class OfficialPredictor:
    """`segment_anything.SamPredictor` with the set_image / predict_batch interface of
    `sam_jax.SamPredictor` (numpy in, numpy out, prompts in original image coordinates)."""

    def __init__(self, sam_model):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam_model)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        import torch

        with torch.no_grad():
            self.predictor.set_image(np.asarray(image), image_format)

    @property
    def original_size(self):
        return self.predictor.original_size

    def predict_batch(
        self,
        point_coords=None,
        point_labels=None,
        boxes=None,
        mask_input=None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ):
        """Prompts (B, N, 2) / (B, N) / (B, 4) / (B, 1, 256, 256) in the original frame ->
        masks (B, C, H, W), iou (B, C), low_res (B, C, 256, 256) as numpy."""
        import torch

        p = self.predictor
        size = p.original_size

        def tensor(x, dtype=torch.float32):
            return None if x is None else torch.as_tensor(np.asarray(x), dtype=dtype)

        coords = (
            None
            if point_coords is None
            else p.transform.apply_coords(np.asarray(point_coords, dtype=np.float64), size)
        )
        box = (
            None
            if boxes is None
            else p.transform.apply_boxes(np.asarray(boxes, dtype=np.float64), size)
        )
        with torch.no_grad():
            masks, iou, low_res = p.predict_torch(
                tensor(coords),
                tensor(point_labels, torch.int64),
                boxes=tensor(box),
                mask_input=tensor(mask_input),
                multimask_output=multimask_output,
                return_logits=return_logits,
            )
        return masks.numpy(), iou.numpy(), low_res.numpy()
