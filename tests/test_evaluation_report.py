"""Reports: results.json, Markdown / CSV tables with the per-dataset average, the PNG plot."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.report import add_average, csv_table, markdown_table, write_reports


def _results():
    return {
        "checkpoint": "/ckpt",
        "seed": 0,
        "protocol": {"num_points": [1, 3]},
        "datasets": {
            "a": {
                "num_images": 2,
                "num_masks": 10,
                "miou": {"1": 0.5, "3": 0.8},
                "oracle_miou_1": 0.7,
                "box_miou": 0.75,
                "mask_ap": None,
                "per_mask": {"ious": np.zeros((10, 3))},  # not written to JSON
            },
            "b": {
                "num_images": 1,
                "num_masks": 4,
                "miou": {"1": 0.3, "3": 0.6},
                "oracle_miou_1": 0.5,
                "box_miou": None,
                "mask_ap": {"AP": 0.4, "AP50": 0.6},
            },
        },
    }


def test_average_is_mean_of_datasets_not_of_masks():
    r = add_average(_results())["average"]
    assert r["miou"] == {"1": pytest.approx(0.4), "3": pytest.approx(0.7)}  # not mask-weighted
    assert r["oracle_miou_1"] == pytest.approx(0.6)
    assert r["box_miou"] == pytest.approx(0.75)  # only dataset a has it
    assert r["mask_ap"] == pytest.approx(0.4)
    assert r["num_datasets"] == 2


def test_tables():
    results = add_average(_results())
    md = markdown_table(results)
    lines = md.strip().splitlines()
    assert (
        lines[0]
        == "| dataset | images | masks | mIoU 1pt | mIoU 3pt | oracle 1pt | box | mask AP |"
    )
    assert lines[2] == "| a | 2 | 10 | 50.0 | 80.0 | 70.0 | 75.0 | - |"
    assert lines[3] == "| b | 1 | 4 | 30.0 | 60.0 | 50.0 | - | 40.0 |"
    assert lines[4] == "| average (2 datasets) | - | - | 40.0 | 70.0 | 60.0 | 75.0 | 40.0 |"
    rows = list(csv.reader(io.StringIO(csv_table(results))))
    assert rows[0][:4] == ["dataset", "images", "masks", "mIoU 1pt"]
    assert rows[2] == ["b", "1", "4", "30.0", "60.0", "50.0", "", "40.0"]  # missing: empty, not 0
    assert rows[3][0] == "average (2 datasets)" and rows[3][3] == "40.0"


def test_columns_follow_what_was_measured():
    results = {
        "datasets": {
            "a": {
                "num_images": 1,
                "num_masks": 2,
                "miou": {},
                "box_miou": 0.5,
                "oracle_miou_1": None,
            }
        }
    }
    add_average(results)
    header = markdown_table(results).splitlines()[0]
    assert header == "| dataset | images | masks | box |"


def test_write_reports(tmp_path):
    results = _results()
    paths = write_reports(results, str(tmp_path / "out"))
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["datasets"]["a"]["miou"] == {"1": 0.5, "3": 0.8}
    assert "per_mask" not in data["datasets"]["a"]
    assert data["average"]["miou"]["1"] == pytest.approx(0.4)
    assert data["checkpoint"] == "/ckpt"
    assert (tmp_path / "out" / "results.md").read_text() == markdown_table(results)
    assert (tmp_path / "out" / "results.csv").read_text().startswith("dataset,images,masks")
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size == (600, 400)
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # something was drawn


def test_no_plot_without_points(tmp_path):
    results = {"datasets": {"a": {"num_images": 1, "num_masks": 2, "miou": {}, "box_miou": 0.5}}}
    paths = write_reports(results, str(tmp_path))
    assert "plot" not in paths and not (tmp_path / "miou_vs_points.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["average"]["box_miou"] == 0.5
