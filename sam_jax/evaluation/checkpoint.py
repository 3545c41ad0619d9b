"""Evaluating a checkpoint on datasets: the library behind `sam-jax-eval` (and `eval.py`).

    results = evaluate_checkpoint("ckpt/sam_vit_b", ["coco:ann.json:images/"], EvalSettings())
    write_reports(results, "out/")

`EvalSettings` holds the protocol (which task, points, first click, mask feedback, ...), and
`evaluate_checkpoint` loads the model once and runs the task on every dataset: one results dict
(`results["datasets"][name]` per dataset) in the format `sam_jax.evaluation.report` writes.
Several processes of one job split the images and return the same numbers as one process.

Tasks (`TASK_TABLE`, one `Task` each: the dataset kinds it runs on and its runner):
  points     mIoU after N clicks (paper 7.1, D.1; center or random first point, figure 9d), oracle
             at 1 click, ground-truth boxes; per-group mIoU with confidence intervals (Table 2)
             with group_by; COCO mask AP of detections' boxes on the coco: dataset if given
  boxes      ground-truth boxes only
  instances  mask AP of a detector's boxes with D.4's refinement pass (7.4; COCO or LVIS)
  edges      BSDS500 ODS / OIS / AP / R50 of SAM's edge maps (7.2, D.2)
  proposals  mask AR@1000 of automatic masks (7.3, D.3; COCO or LVIS with frequency groups)
  text       mIoU from each mask's name alone (7.5, D.5; a SAM with a text path): the named
             synthetic shapes, or COCO / LVIS masks named by their category through a template
             ("a photo of a {}."), beside the centre point and name + point on the same masks
A new task (e.g. text prompts) is one runner `(predictor, spec, settings, progress) -> entry`
and one `Task` added to TASK_TABLE; the command's --task choices follow the table.
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
from sam_jax.amg import SamAutomaticMaskGenerator
from sam_jax.checkpoints import load
from sam_jax.data import DatasetSpec, iterate_examples, parse_dataset_spec
from sam_jax.errors import NoMasksError, UsageError, one_line
from sam_jax.evaluation import boundaries, edges, proposals
from sam_jax.evaluation.detections import evaluate_detections
from sam_jax.evaluation.groups import GROUP_KINDS, group_miou, group_values, parse_group_by
from sam_jax.evaluation.paper import paper_numbers
from sam_jax.evaluation.protocol import (
    DEFAULT_NUM_POINTS,
    FIRST_POINT_MODES,
    MULTIMASK_MODES,
    evaluate_points,
)
from sam_jax.evaluation.text_prompts import default_template, evaluate_text, named_examples
from sam_jax.predictor import SamPredictor

DTYPES = ("float32", "bfloat16")
MASK_KINDS = ("synthetic", "nuclei", "sa1b", "coco", "lvis", "tfds")  # datasets with masks


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """The evaluation protocol (SAM paper section 7, appendix D).

    task: a key of TASK_TABLE (see the module docstring). first_point: "center" (farthest from
    the boundary) or "random" (a uniform interior pixel, figure 9d and Table 2). multimask:
    "first", "always" or "never" (3 outputs at the first click only, at every click, or never).
    max_masks: a seeded sample of at most this many masks per dataset; max_images: read at most
    this many images. group_by: an annotation field, "FIELD" or "FIELD:BINS" (points task,
    coco / lvis / sa1b datasets; `evaluation.groups`): mIoU per value, or per bin of a numeric
    field, with bootstrap confidence intervals. detections: a COCO results JSON of boxes (task
    instances; with task points, also mask AP on the coco: dataset). refine: D.4's refinement
    pass for detector boxes. points_per_side / nms_thresh: the grid and NMS threshold of edges
    (default 16, 0.7) and proposals (64, 0.9); max_proposals: proposals per image (1000).
    edge_thresholds / edge_matcher: the BSDS evaluation's thresholds (99) and matcher ("bsds",
    the benchmark's, or "exact"). clip: the CLIP (folder or Hub id) of the text task instead of
    the one the checkpoint's config names (a ready SamPredictor keeps its own). text_template:
    the phrase of a category name in the text task, "{}" where the name goes (default
    `default_template`: the name as is on synthetic data, CLIP's "a photo of a {}." on COCO
    and LVIS).
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
    group_by: str | None = None
    refine: bool = True
    points_per_side: int | None = None
    nms_thresh: float | None = None
    max_proposals: int = proposals.MAX_PROPOSALS
    edge_thresholds: int = boundaries.DEFAULT_THRESHOLDS
    edge_matcher: str = "bsds"
    clip: str | None = None
    text_template: str | None = None

    def __post_init__(self):
        problems = []
        if self.task not in TASK_TABLE:
            problems.append(f"task must be one of {TASKS}, got {self.task!r}")
        for field, allowed in (
            ("first_point", FIRST_POINT_MODES),
            ("multimask", MULTIMASK_MODES),
            ("dtype", DTYPES),
            ("edge_matcher", boundaries.MATCHERS),
        ):
            if getattr(self, field) not in allowed:
                problems.append(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if any(int(n) < 1 for n in self.num_points):
            problems.append(f"num_points must be >= 1, got {list(self.num_points)}")
        if self.task == "instances" and self.detections is None:
            problems.append("task 'instances' needs detections (a COCO results JSON of boxes)")
        if self.detections is not None and self.task not in ("points", "instances"):
            problems.append(f"detections are for the instances task, not {self.task!r}")
        if self.group_by is not None:
            try:
                parse_group_by(self.group_by)
            except ValueError as e:
                problems.append(str(e))
            if self.task != "points":
                problems.append(f"group_by is for the points task, not {self.task!r}")
            elif not self.num_points:
                problems.append("group_by needs numbers of points")
        if self.points_per_side is not None and self.points_per_side < 1:
            problems.append(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.nms_thresh is not None and not 0.0 < self.nms_thresh <= 1.0:
            problems.append(f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        if self.clip is not None and self.task != "text":
            problems.append(f"clip is the CLIP of the text task, not of {self.task!r}")
        if self.text_template is not None:
            if self.task != "text":
                problems.append(f"text_template is for the text task, not {self.task!r}")
            elif self.text_template.count("{}") != 1 or "{" in self.text_template.replace("{}", ""):
                problems.append(
                    f"text_template must hold one {{}} (where the name goes), got "
                    f"{self.text_template!r}"
                )
        if self.max_proposals < 1 or self.edge_thresholds < 1:
            problems.append("max_proposals and edge_thresholds must be >= 1")
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
    """Dataset specs, checked before any work (UsageError for a malformed one or one the task
    cannot run on; detections need exactly one coco: (or, for instances, lvis:) dataset, and
    must exist)."""
    specs = []
    for text in texts:
        if isinstance(text, DatasetSpec):
            specs.append(text)
            continue
        try:
            specs.append(parse_dataset_spec(text))
        except ValueError as e:  # malformed (a missing path is FileNotFoundError: exit 1)
            raise UsageError(f"--dataset: {one_line(e)}") from None
    task = TASK_TABLE[settings.task]
    for spec in specs:
        if spec.kind not in task.kinds:
            raise UsageError(
                f"--task {task.name} runs on {', '.join(k + ':' for k in task.kinds)} datasets, "
                f"not {spec.text!r}"
            )
        if settings.group_by and spec.kind not in GROUP_KINDS:
            raise UsageError(
                f"--group-by reads annotation fields of {', '.join(GROUP_KINDS)} datasets, "
                f"not {spec.text!r}"
            )
    if settings.detections:
        kinds = ("coco", "lvis") if settings.task == "instances" else ("coco",)
        found = [s for s in specs if s.kind in kinds]
        if len(found) != 1 or (settings.task == "instances" and len(specs) != 1):
            names = " or ".join(k + ":" for k in kinds)
            raise UsageError(f"--detections needs exactly one {names} dataset, got {len(found)}")
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


def load_predictor(
    checkpoint: str, dtype: str = "float32", clip: str | None = None
) -> SamPredictor:
    """A `SamPredictor` of any checkpoint `sam_jax.load` reads, in compute `dtype`; its text
    prompts go through `clip` (a CLIP folder or Hub id; default: the one its config names)."""
    model, params = load(checkpoint, dtype=getattr(jnp, dtype))
    return SamPredictor(model, params, text_encoder=clip)


def evaluate_checkpoint(
    checkpoint: str | SamPredictor,
    datasets: Sequence[str | DatasetSpec],
    settings: EvalSettings | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs `settings.task` of a checkpoint (or a ready `SamPredictor`) on every dataset.

    datasets: specs (`synthetic[:SPLIT]`, `sa1b:PATH`, `coco:ANN_JSON:IMAGES_DIR`,
    `lvis:ANN_JSON:IMAGES_DIR`, `bsds:ROOT[:SPLIT]`, `tfds:NAME[:SPLIT]`, see
    sam_jax.data.spec). Returns {"checkpoint", "seed", "split", "protocol", "datasets": {name:
    entry}, "seconds"}; an entry holds the task's metrics ("miou" ... of `evaluate_points` and
    "groups" for points, "mask_ap" for instances, "edges", "proposals"), counts, skipped data
    and timings, plus "task" and "paper" (the paper's numbers for that task and dataset kind, or
    None). `log` receives one line per dataset (on the main process).
    """
    settings = settings if settings is not None else EvalSettings()
    specs = parse_specs(datasets, settings)
    predictor = checkpoint
    if not isinstance(checkpoint, SamPredictor):
        predictor = load_predictor(checkpoint, settings.dtype, settings.clip)
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
            entry = TASK_TABLE[settings.task].run(
                predictor, spec, settings, progress and main_process
            )
        except ValueError as e:
            raise type(e)(f"dataset {name!r}: {one_line(e)}") from None
        entry["task"] = settings.task
        entry["paper"] = paper_numbers(settings.task, spec.kind)
        results["datasets"][name] = entry
        if log is not None and main_process:
            log(_summary(name, entry))
    results["seconds"] = time.perf_counter() - start
    return results


def _summary(name: str, entry: dict[str, Any]) -> str:
    t = entry["timing"]
    if "num_masks" not in entry:  # edges, proposals, instances
        rate = t.get("images_per_s")
        return (
            f"{name}: {entry['num_images']} images, "
            + (f"{rate:.2f} images/s " if rate else "")
            + f"(skipped {entry['skipped_images']} unreadable images)"
        )
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


def _run_points(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    """Tasks points and boxes (and, with detections, COCO mask AP of the coco: dataset)."""
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
            return_per_mask=s.group_by is not None,
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
    if s.group_by is not None:
        field, bins = parse_group_by(s.group_by)
        per_mask = entry.pop("per_mask")
        values = group_values(spec, field, image_ids=per_mask["image_id"])
        entry["groups"] = group_miou(per_mask, values, s.num_points, field, s.seed, bins=bins)
    entry["mask_ap"] = None
    if s.detections and spec.kind == "coco":
        det = _detections(predictor, spec, s, progress)
        entry["mask_ap"] = det["mask_ap"]
        entry["detections"] = {
            k: det[k] for k in ("num_images", "num_detections", "skipped_images", "timing")
        }
    return entry


def _detections(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    return evaluate_detections(
        predictor,
        spec.path,
        spec.images_dir,
        s.detections,
        max_images=s.max_images,
        batch_size=s.batch_size,
        progress=progress,
        refine=s.refine,
        lvis=spec.kind == "lvis",
    )


def _run_instances(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    """Task instances (7.4, D.4): mask AP of the detections' boxes, COCO's or LVIS's."""
    det = _detections(predictor, spec, s, progress)
    det["protocol"] = {"refine": s.refine, "lvis": spec.kind == "lvis"}
    return det


def _image_share(s: EvalSettings, progress: bool) -> dict:
    """The keywords of the per-image evaluations (edges, proposals): this process's share of
    the images (at most s.max_images), the progress bar, and the gather of every share."""
    return {
        "max_images": s.max_images,
        "progress": progress,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "all_gather": distributed.all_gather,
    }


def _run_edges(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    """Task edges (7.2, D.2) on a bsds: dataset."""
    pps = s.points_per_side or edges.EDGE_POINTS_PER_SIDE
    nms = s.nms_thresh if s.nms_thresh is not None else edges.EDGE_NMS_THRESH

    def edge_fn(image):
        return edges.sam_edge_map(predictor, image, pps, nms, s.batch_size)[0]

    entry = edges.evaluate_edges(
        edge_fn,
        spec.path,
        spec.split or s.split,
        num_thresholds=s.edge_thresholds,
        matcher=s.edge_matcher,
        **_image_share(s, progress),
    )
    entry["protocol"].update(points_per_side=pps, nms_thresh=nms)
    return entry


def _run_proposals(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    """Task proposals (7.3, D.3): the automatic generator without crops or score filters."""
    pps = s.points_per_side or proposals.PROPOSAL_POINTS_PER_SIDE
    nms = s.nms_thresh if s.nms_thresh is not None else proposals.PROPOSAL_NMS_THRESH
    generator = SamAutomaticMaskGenerator(
        predictor.model,
        predictor.params,
        points_per_side=pps,
        points_per_batch=s.batch_size,
        pred_iou_thresh=0.0,  # <= 0 turns the filter off
        stability_score_thresh=0.0,
        box_nms_thresh=nms,
        crop_n_layers=0,
        output_mode="coco_rle",
    )
    entry = proposals.evaluate_proposals(
        generator.generate,
        spec.path,
        spec.images_dir,
        lvis=spec.kind == "lvis",
        max_proposals=s.max_proposals,
        **_image_share(s, progress),
    )
    entry["protocol"].update(points_per_side=pps, nms_thresh=nms)
    return entry


def _run_text(predictor, spec: DatasetSpec, s: EvalSettings, progress: bool) -> dict:
    """Task text (7.5, D.5) on a synthetic: dataset (its objects are named) or a coco: / lvis:
    one (its masks named by category). Every process evaluates every image."""
    encoder = predictor.text_encoder  # refuses a SAM without a text path, or a CLIP's width
    template = s.text_template or default_template(spec.kind)
    stats: dict = {}
    examples = named_examples(spec, spec.split or s.split, template, s.max_images, stats)
    entry = evaluate_text(predictor, examples, s.batch_size, progress)
    entry["skipped_images"] = int(stats.get("skipped_images", 0))
    entry["data_stats"] = stats
    entry["protocol"] = {
        "split": spec.split or s.split,
        "clip": encoder.name,
        "template": template,
    }
    return entry


@dataclasses.dataclass(frozen=True)
class Task:
    """One evaluation task: the dataset kinds it runs on and its runner, `run(predictor, spec,
    settings, progress) -> the dataset's results entry` (ValueError for bad data)."""

    name: str
    kinds: tuple[str, ...]
    run: Callable[[Any, DatasetSpec, EvalSettings, bool], dict]


TASK_TABLE: dict[str, Task] = {
    t.name: t
    for t in (
        Task("points", MASK_KINDS, _run_points),
        Task("boxes", MASK_KINDS, _run_points),
        Task("instances", ("coco", "lvis"), _run_instances),
        Task("edges", ("bsds",), _run_edges),
        Task("proposals", ("coco", "lvis"), _run_proposals),
        Task("text", ("synthetic", "coco", "lvis"), _run_text),
    )
}
TASKS = tuple(TASK_TABLE)


def quiet_data_logs(verbose: bool) -> None:
    """The data readers log each skipped image or mask at INFO (always counted in the report)."""
    logging.getLogger("sam_jax.data").setLevel(logging.INFO if verbose else logging.ERROR)
