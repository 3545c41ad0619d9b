"""The SAM paper's zero-shot numbers (Kirillov et al. 2023, SAM ViT-H), printed beside ours where
the task and the dataset kind are the paper's. Fractions, as our metrics; `source` says which
table, split and prompts, so a reader can tell when a run differs (another split, a subset,
other boxes).
"""

from __future__ import annotations

PAPER: dict[tuple[str, str], dict] = {
    ("edges", "bsds"): {
        "source": "SAM paper Table 3: SAM ViT-H, BSDS500 test (200 images)",
        "ODS": 0.768,
        "OIS": 0.786,
        "AP": 0.794,
        "R50": 0.928,
    },
    ("proposals", "lvis"): {
        "source": "SAM paper Table 4: SAM ViT-H, LVIS v1 val, mask AR@1000",
        "AR": 0.593,
        "ARs": 0.455,
        "ARm": 0.816,
        "ARl": 0.869,
        "ARf": 0.591,
        "ARc": 0.639,
        "ARr": 0.658,
    },
    ("instances", "coco"): {
        "source": "SAM paper Table 5: SAM ViT-H with ViTDet-H boxes, COCO val2017",
        "AP": 0.465,
        "APs": 0.308,
        "APm": 0.510,
        "APl": 0.617,
    },
    ("instances", "lvis"): {
        "source": "SAM paper Table 5: SAM ViT-H with ViTDet-H boxes, LVIS v1 val",
        "AP": 0.447,
        "APs": 0.325,
        "APm": 0.576,
        "APl": 0.655,
    },
}


def paper_numbers(task: str, kind: str) -> dict | None:
    """The paper's numbers for a task on a dataset kind, or None."""
    entry = PAPER.get((task, kind))
    return dict(entry) if entry else None
