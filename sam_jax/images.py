"""Image files in and pictures out: finding the images of a folder, reading an image as the
official scripts do, and drawing masks and prompts over it (the predict command's overlay,
training's prediction panels)."""

from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam_jax import paths

MASK_COLOR = (30, 144, 255)
# What counts as an image file in a folder (every command that reads a folder of images).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str) -> list[str]:
    """[path] for a file; the image files (by extension, not hidden) directly in a folder, local
    or on a bucket, sorted. FileNotFoundError when `path` is neither."""
    if paths.isfile(path):
        return [path]
    if not paths.isdir(path):
        raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    names = sorted(
        n
        for n in paths.listdir(path)
        if not n.startswith(".") and posixpath.splitext(n)[1].lower() in IMAGE_EXTENSIONS
    )
    return [paths.join(path, n) for n in names]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (jpg, png, ...) -> uint8 (H, W, 3) RGB. Raises on broken data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = im.convert("RGB")
    image = np.asarray(rgb, dtype=np.uint8)
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"decoded image has shape {image.shape}")
    return image


def load_image(path: str) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB image (EXIF orientation applied), or None if it cannot be read."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        image = cv2.imread(path)  # BGR; None when unreadable
        return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def tint(image: np.ndarray, mask: np.ndarray, color=MASK_COLOR) -> np.ndarray:
    """uint8 (H, W, 3): `image` with the pixels of bool `mask` (H, W) blended 55% to `color`."""
    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, points, box) -> np.ndarray:
    """The image with `mask` tinted, points drawn (green fg, red bg) and the box outlined."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(tint(image, mask))
    draw = ImageDraw.Draw(pil)
    r = max(2, round(max(image.shape[:2]) / 150))
    for x, y, label in points:
        color = (0, 220, 0) if label == 1 else (230, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(list(box), outline=(0, 220, 0), width=max(1, r // 2))
    return np.asarray(pil)
