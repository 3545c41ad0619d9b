"""BSDS500 reader (Berkeley Segmentation Data Set and Benchmarks 500), the edge-detection layout:

    ROOT/images/{train,val,test}/<id>.jpg
    ROOT/groundTruth/{train,val,test}/<id>.mat

Each .mat holds `groundTruth`, a 1 x K MATLAB cell array (one cell per human annotator, usually
5) of structs with `Segmentation` (uint16 (H, W) region labels) and `Boundaries` (logical
(H, W), the region boundaries). scipy.io reads it. An image without its .mat (or a .mat without
boundaries) is skipped and counted; images are listed in sorted order, and the image id is the
file stem ("100007").
"""

from __future__ import annotations

import dataclasses
import io
import posixpath

import numpy as np

from sam_jax import paths
from sam_jax.data.records import count, decode_image, skip_image

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class BoundaryRecord:
    """One image and its human boundary maps. image: uint8 (H, W, 3); boundaries: bool (K, H, W),
    one map per annotator."""

    image_id: str
    image: np.ndarray
    boundaries: np.ndarray


def _cell_structs(value) -> list:
    """The structs of a MATLAB cell array as scipy.io.loadmat returns it (any shape)."""
    arr = np.asarray(value, dtype=object)
    return [s for s in arr.reshape(-1)]


def _struct_field(struct, name: str) -> np.ndarray:
    """A field of a loadmat struct (a record array of shape (1, 1), or a dict)."""
    if isinstance(struct, dict):
        return np.asarray(struct[name])
    if getattr(struct, "dtype", None) is not None and struct.dtype.names:
        if name not in struct.dtype.names:
            raise KeyError(name)
        return np.asarray(struct[name].reshape(-1)[0])
    raise KeyError(name)


def read_boundaries(mat_bytes: bytes, hw: tuple[int, int] | None = None) -> np.ndarray:
    """The human boundary maps of a BSDS500 groundTruth .mat: bool (K, H, W).

    Raises ValueError (one line) when the file is not a groundTruth .mat, holds no boundary map,
    or its maps are not of size `hw`.
    """
    from scipy import io as sio

    try:
        data = sio.loadmat(io.BytesIO(mat_bytes))
    except Exception as e:  # noqa: BLE001 - scipy raises several types for a damaged file
        raise ValueError(f"not a MATLAB .mat file ({type(e).__name__}: {e})") from None
    if "groundTruth" not in data:
        raise ValueError("no 'groundTruth' variable (expected a BSDS500 groundTruth .mat)")
    maps = []
    for k, struct in enumerate(_cell_structs(data["groundTruth"])):
        if isinstance(struct, np.ndarray) and struct.dtype == object and struct.size == 1:
            struct = struct.reshape(-1)[0]  # a cell holding the struct
        try:
            b = _struct_field(struct, "Boundaries")
        except (KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"annotation {k} has no 'Boundaries' field") from None
        if b.ndim != 2:
            raise ValueError(f"annotation {k}: Boundaries must be 2-D, got shape {b.shape}")
        if hw is not None and tuple(b.shape) != tuple(hw):
            raise ValueError(f"annotation {k}: Boundaries size {b.shape} != image size {hw}")
        maps.append(b.astype(bool))
    if not maps:
        raise ValueError("groundTruth holds no annotation")
    return np.stack(maps)


class BsdsSource:
    """Random-access BSDS500 images of one split with their human boundary maps."""

    def __init__(self, root: str, split: str):
        if split not in SPLITS:
            raise ValueError(f"bsds: split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = root, split
        images_dir = paths.join(root, "images", split)
        self.gt_dir = paths.join(root, "groundTruth", split)
        if not paths.isdir(images_dir):
            raise FileNotFoundError(f"bsds: images folder {images_dir!r} does not exist")
        if not paths.isdir(self.gt_dir):
            raise FileNotFoundError(f"bsds: groundTruth folder {self.gt_dir!r} does not exist")
        names = sorted(n for n in paths.listdir(images_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise ValueError(f"bsds: no images (.jpg) in {images_dir!r}")
        self.images = [paths.join(images_dir, n) for n in names]

    def __len__(self) -> int:
        return len(self.images)

    def image_id(self, i: int) -> str:
        return posixpath.splitext(posixpath.basename(self.images[i]))[0]

    def load(self, i: int, stats: dict | None = None) -> BoundaryRecord | None:
        """Image i and its boundary maps; None (counted in stats, logged) if unusable."""
        image_id = self.image_id(i)
        try:
            image = decode_image(paths.read_bytes(self.images[i]))
            mat = paths.read_bytes(paths.join(self.gt_dir, image_id + ".mat"))
            boundaries = read_boundaries(mat, image.shape[:2])
        except Exception as e:  # noqa: BLE001 - any read/decode failure skips the image
            skip_image(stats, image_id, e)
            return None
        count(stats, "decoded_images")
        return BoundaryRecord(image_id, image, boundaries)


def iterate_boundaries(
    root: str,
    split: str,
    max_images: int | None = None,
    stats: dict | None = None,
    process_index: int = 0,
    process_count: int = 1,
):
    """Yields this process's share (indices process_index::process_count) of a BSDS500 split:
    BoundaryRecords, skipping (and counting) unreadable images; max_images caps the share."""
    source = BsdsSource(root, split)
    yielded = 0
    for i in range(process_index, len(source), process_count):
        if max_images is not None and yielded >= max_images:
            return
        record = source.load(i, stats)
        if record is not None:
            yielded += 1
            yield record
