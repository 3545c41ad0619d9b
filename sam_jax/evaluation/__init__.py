"""Zero-shot evaluation (paper section 7, appendix D): click rules, metrics, the point / box
protocols, instances from detector boxes (COCO and LVIS AP), edges (BSDS500 ODS / OIS / AP /
R50), object proposals (mask AR@1000), per-group mIoU with confidence intervals, and reports;
`evaluate_checkpoint` runs the task of `EvalSettings` on datasets (what sam-jax-eval calls).

Needs the training extras (scipy, pycocotools, matplotlib, tqdm), and for the BSDS matcher and
edge NMS the edges extra (pyEdgeEval), imported lazily; the inference path never imports this
package.
"""

from sam_jax.evaluation.boundaries import boundary_metrics, image_counts, match_boundaries
from sam_jax.evaluation.checkpoint import TASK_TABLE, TASKS, EvalSettings, Task, evaluate_checkpoint
from sam_jax.evaluation.clicks import distance_transform, first_click, mask_to_box, next_click
from sam_jax.evaluation.detections import evaluate_detections, load_coco_gt, load_detections
from sam_jax.evaluation.edges import evaluate_edges, sam_edge_map
from sam_jax.evaluation.groups import group_labels, group_miou
from sam_jax.evaluation.lvis_metrics import lvis_mask_ap
from sam_jax.evaluation.metrics import coco_mask_ap, dataset_average, mask_iou, mean_iou
from sam_jax.evaluation.proposals import evaluate_proposals, mask_average_recall
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
    "TASKS",
    "TASK_TABLE",
    "EvalSettings",
    "Task",
    "evaluate_checkpoint",
    "add_average",
    "boundary_metrics",
    "evaluate_edges",
    "evaluate_proposals",
    "group_labels",
    "group_miou",
    "image_counts",
    "lvis_mask_ap",
    "mask_average_recall",
    "match_boundaries",
    "sam_edge_map",
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
