"""Evaluating a checkpoint on datasets: the library behind `sam-jax-eval` (and `eval.py`).

    results = evaluate_checkpoint("ckpt/sam_vit_b", ["coco:ann.json:images/"], EvalSettings())
    write_reports(results, "out/")

`EvalSettings` holds the protocol (which task, points, first click, mask feedback, ...), and
`evaluate_checkpoint` loads the model once and runs the task on every dataset: one results dict
(`results["datasets"][name]` per dataset) in the format `sam_jax.evaluation.report` writes.
Several processes of one job split the images and return the same numbers as one process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sam_jax import distributed, paths
from sam_jax.checkpoints import load
from sam_jax.data import DatasetSpec, iterate_examples, parse_dataset_spec
from sam_jax.errors import NoMasksError, UsageError, one_line
from sam_jax.evaluation.detections import evaluate_detections
from sam_jax.evaluation.protocol import DEFAULT_NUM_POINTS, evaluate_points
from sam_jax.predictor import SamPredictor

TASKS = ("points", "boxes", "instances")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The evaluation protocol (SAM paper 7.1, 7.4, D.1, D.4).

    task: "points" (mIoU after `num_points` clicks, oracle at 1 click, and ground-truth boxes
    unless gt_boxes is False), "boxes" (ground-truth boxes only), "instances" (COCO mask AP of
    the masks of `detections`' boxes, the one coco: dataset). first_point: "center" (farthest
    from the boundary) or "random" (a uniform interior pixel). multimask: "first", "always" or
    "never" (3 outputs at the first click only, at every click, or never). max_masks: a seeded
    sample of at most this many masks per dataset; max_images: read at most this many images.
    """

    task: str = "points"
    split: str = "val"
    num_points: tuple[int, ...] = DEFAULT_NUM_POINTS
    first_point: str = "center"
    feed_mask: bool = False
    multimask: str = "first"
    gt_boxes: bool = True
    max_masks: int | None = None
    max_images: int | None = None
    seed: int = 0
    batch_size: int = 32
    dtype: str = "float32"
    detections: str | None = None

    def __post_init__(self):
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        if self.first_point not in ("center", "random"):
            problems.append(f"first_point must be 'center' or 'random', got {self.first_point!r}")
        if self.multimask not in ("first", "always", "never"):
            problems.append(f"multimask must be first, always or never, got {self.multimask!r}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if any(int(n) < 1 for n in self.num_points):
            problems.append(f"num_points must be >= 1, got {list(self.num_points)}")
        if self.task == "instances" and self.detections is None:
            problems.append("task 'instances' needs detections (a COCO results JSON of boxes)")
        if problems:
            raise UsageError("; ".join(problems))
        object.__setattr__(self, "num_points", tuple(sorted({int(n) for n in self.num_points})))

    def protocol(self) -> dict[str, Any]:
        """The settings as the report's "protocol" entry."""
        d = dataclasses.asdict(self)
        d["num_points"] = list(self.num_points)
        if self.detections:
            d["detections"] = paths.resolve(self.detections)
        return d


def parse_specs(texts: Sequence[str | DatasetSpec], settings: EvalSettings) -> list[DatasetSpec]:
    """Dataset specs, checked before any work (UsageError for a malformed one; detections need
    exactly one coco: dataset, and must exist)."""
    specs = []
    for text in texts:
        if isinstance(text, DatasetSpec):
            specs.append(text)
            continue
        try:
            specs.append(parse_dataset_spec(text))
        except ValueError as e:  # malformed (a missing path is FileNotFoundError: exit 1)
            raise UsageError(f"--dataset: {one_line(e)}") from None
    if settings.detections:
        coco = [s for s in specs if s.kind == "coco"]
        if len(coco) != 1:
            raise UsageError(f"--detections needs exactly one coco: dataset, got {len(coco)}")
        if not paths.isfile(settings.detections):
            raise FileNotFoundError(f"detections file {settings.detections!r} does not exist")
    return specs


def dataset_names(specs: Sequence[DatasetSpec]) -> list[str]:
    """A unique report name per dataset (its spec, numbered when repeated)."""
    names = []
    for spec in specs:
        name, k = spec.text, 2
        while name in names:
            name, k = f"{spec.text} #{k}", k + 1
        names.append(name)
    return names


def load_predictor(checkpoint: str, dtype: str = "float32") -> SamPredictor:
    """A `SamPredictor` of any checkpoint `sam_jax.load` reads, in compute `dtype`."""
    model, params = load(checkpoint, dtype=getattr(jnp, dtype))
    return SamPredictor(model, params)


def evaluate_checkpoint(
    checkpoint: str | SamPredictor,
    datasets: Sequence[str | DatasetSpec],
    settings: EvalSettings = EvalSettings(),
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs `settings.task` of a checkpoint (or a ready `SamPredictor`) on every dataset.

    datasets: specs (`synthetic[:SPLIT]`, `sa1b:PATH`, `coco:ANN_JSON:IMAGES_DIR`,
    `tfds:NAME[:SPLIT]`, see sam_jax.data.spec). Returns {"checkpoint", "seed", "split",
    "protocol", "datasets": {name: entry}, "seconds"}; an entry holds the task's metrics (see
    `evaluate_points`; `mask_ap` for instances), counts, skipped data and timings. `log`
    receives one line per dataset (on the main process).
    """
    specs = parse_specs(datasets, settings)
    predictor = checkpoint
    if not isinstance(checkpoint, SamPredictor):
        predictor = load_predictor(checkpoint, settings.dtype)
    results = {
        "checkpoint": paths.resolve(checkpoint) if isinstance(checkpoint, str) else None,
        "seed": settings.seed,
        "split": settings.split,
        "protocol": settings.protocol(),
        "datasets": {},
    }
    main_process = distributed.is_main_process()
    start = time.perf_counter()
    for name, spec in zip(dataset_names(specs), specs, strict=True):
        try:
            entry = _evaluate_dataset(predictor, spec, settings, progress and main_process)
        except ValueError as e:
            raise type(e)(f"dataset {name!r}: {one_line(e)}") from None
        results["datasets"][name] = entry
        if log is not None and main_process:
            log(_summary(name, entry))
    results["seconds"] = time.perf_counter() - start
    return results


def _summary(name: str, entry: dict[str, Any]) -> str:
    t = entry["timing"]
    return (
        f"{name}: {entry['num_images']} images, {entry['num_masks']} masks, "
        f"{t['images_per_s']:.2f} images/s, {t['masks_per_s']:.1f} masks/s "
        f"(first image incl. compilation {t['first_image_seconds']:.1f} s; skipped "
        f"{entry['skipped_images']} unreadable images, {entry['skipped_masks']} masks)"
    )


def _sum_counts(counts: list[dict]) -> dict:
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _evaluate_dataset(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    stats: dict = {}

    def examples():  # a fresh pass over this process's share; stats of the last pass are kept
        stats.clear()
        return iterate_examples(
            spec,
            split=s.split,
            max_images=s.max_images,
            seed=s.seed,
            stats=stats,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    points = () if s.task == "boxes" else s.num_points
    try:
        entry = evaluate_points(
            predictor,
            examples,
            num_points=points,
            first_point=s.first_point,
            feed_mask=s.feed_mask,
            multimask=s.multimask,
            gt_boxes=s.gt_boxes or s.task == "boxes",
            seed=s.seed,
            max_masks=s.max_masks,
            batch_size=s.batch_size,
            progress=progress,
            all_gather=distributed.all_gather,
        )
    except NoMasksError as e:
        raise NoMasksError(
            f"{e}; the reader skipped {stats.get('skipped_images', 0)} unreadable images, "
            f"{stats.get('images_without_masks', 0)} images without masks, "
            f"{stats.get('empty_masks', 0)} zero-area masks"
        ) from None
    stats = _sum_counts(distributed.all_gather(dict(stats)))
    entry["data_stats"] = stats
    entry["skipped_images"] = int(stats.get("skipped_images", 0))
    # Zero-area masks are dropped by the data layer ("empty_masks"), undecodable ones too
    # ("skipped_masks"); evaluate_points drops any left (in-memory sources).
    entry["skipped_masks"] = (
        entry["skipped_empty_masks"]
        + int(stats.get("empty_masks", 0))
        + int(stats.get("skipped_masks", 0))
    )
    entry["mask_ap"] = None
    if s.detections and spec.kind == "coco":
        det = evaluate_detections(
            predictor,
            spec.path,
            spec.images_dir,
            s.detections,
            max_images=s.max_images,
            batch_size=s.batch_size,
            progress=progress,
        )
        entry["mask_ap"] = det["mask_ap"]
        entry["detections"] = {
            k: det[k] for k in ("num_images", "num_detections", "skipped_images", "timing")
        }
    return entry


def quiet_data_logs(verbose: bool) -> None:
    """The data readers log each skipped image or mask at INFO (always counted in the report)."""
    logging.getLogger("sam_jax.data").setLevel(logging.INFO if verbose else logging.ERROR)
