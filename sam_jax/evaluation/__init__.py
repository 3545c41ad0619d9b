"""Zero-shot evaluation: click rules, metrics, point/box protocols and reports (paper 7.1, D.1);
`evaluate_checkpoint` runs a protocol of `EvalSettings` on datasets (what sam-jax-eval calls).

Needs the training extras (scipy, pycocotools, matplotlib, tqdm), imported lazily; the inference
path never imports this package.
"""

from sam_jax.evaluation.checkpoint import EvalSettings, evaluate_checkpoint
from sam_jax.evaluation.clicks import distance_transform, first_click, mask_to_box, next_click
from sam_jax.evaluation.detections import evaluate_detections, load_coco_gt, load_detections
from sam_jax.evaluation.metrics import coco_mask_ap, dataset_average, mask_iou, mean_iou
from sam_jax.evaluation.protocol import (
    DEFAULT_NUM_POINTS,
    evaluate_boxes,
    evaluate_points,
    run_box_prompts,
    run_point_rounds,
    select_masks,
)
from sam_jax.evaluation.report import add_average, markdown_table, write_reports

__all__ = [
    "DEFAULT_NUM_POINTS",
    "EvalSettings",
    "evaluate_checkpoint",
    "add_average",
    "coco_mask_ap",
    "dataset_average",
    "distance_transform",
    "evaluate_boxes",
    "evaluate_detections",
    "evaluate_points",
    "first_click",
    "load_coco_gt",
    "load_detections",
    "mask_iou",
    "mask_to_box",
    "markdown_table",
    "mean_iou",
    "next_click",
    "run_box_prompts",
    "run_point_rounds",
    "select_masks",
    "write_reports",
]
