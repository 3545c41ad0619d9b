"""Bad input, one table: every case runs a command in a subprocess (as a user would) and checks
the exit status (1: the work failed, 2: usage), that stderr is one line naming the problem, with
no traceback, and that no file in the test folder was changed, created or removed.

The cases run two at a time in a module fixture (each subprocess starts Python and JAX); the
parametrized tests then check one case each. API cases (the same mistakes through the Python
API) are at the end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = str(ROOT / "tests" / "tiny_train_config.py")


def _make_inputs(root: Path) -> dict[str, str]:
    """The files the cases read: a tiny .pth and its converted checkpoint, an image, a folder of
    images, a file that is not an image, an empty folder, an existing output file."""
    import torch

    from sam_jax.checkpoints import load_pth, save_converted
    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official

    config = tiny_config(decoder_num_heads=8)
    pth = root / "in" / "tiny.pth"
    pth.parent.mkdir(parents=True)
    torch.save(build_official(config, seed=3).state_dict(), pth)
    _, params = load_pth(pth)
    save_converted(root / "in" / "ckpt", config, params)
    images = root / "in" / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(images / "a.png")
    (root / "in" / "notes.txt").write_text("not an image")
    (root / "in" / "empty").mkdir()
    # A converted checkpoint with a damaged params file, and a COCO set whose images are missing.
    import shutil

    damaged = root / "in" / "damaged_ckpt"
    shutil.copytree(root / "in" / "ckpt", damaged)
    victim = max((p for p in damaged.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    victim.write_bytes(bytes(data))
    coco = {
        "images": [{"id": 1, "file_name": "gone.jpg", "height": 40, "width": 56}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81,
             "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    import json

    (root / "in" / "coco.json").write_text(json.dumps(coco))
    (root / "out_file").write_text("an existing file, not a folder")
    return {
        "pth": str(pth),
        "ckpt": str(root / "in" / "ckpt"),
        "image": str(images / "a.png"),
        "images": str(images),
        "text": str(root / "in" / "notes.txt"),
        "empty": str(root / "in" / "empty"),
        "file": str(root / "out_file"),
        "damaged": str(damaged),
        "coco": str(root / "in" / "coco.json"),
        "new": str(root / "new_output"),
        "root": str(root),
    }


def _snapshot(root: Path) -> dict[str, str]:
    """{relative path: content hash (files) or 'dir'} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# (id, command module, argv with {placeholders}, exit status, fragments the line must hold)
CASES = [
    # sam-jax-convert
    (
        "convert-output-is-input",
        "convert",
        "--checkpoint {pth} --output {pth} --force",
        2,
        ["is the input --checkpoint"],
    ),
    (
        "convert-output-contains-input",
        "convert",
        "--checkpoint {pth} --output {root}/in --force",
        2,
        ["contains the input"],
    ),
    (
        "convert-output-inside-input",
        "convert",
        "--to-pytorch --checkpoint {ckpt} --output {ckpt}/params/x.pth",
        2,
        ["is inside the input"],
    ),
    (
        "convert-output-exists",
        "convert",
        "--checkpoint {pth} --output {ckpt}",
        1,
        ["exists already", "--force"],
    ),
    (
        "convert-missing-input",
        "convert",
        "--checkpoint {root}/nope.pth --output {new}",
        1,
        ["nope.pth", "does not exist"],
    ),
    (
        "convert-not-a-checkpoint",
        "convert",
        "--checkpoint {text} --output {new}",
        1,
        ["not a PyTorch checkpoint"],
    ),
    (
        "convert-directory-without-to-pytorch",
        "convert",
        "--checkpoint {ckpt} --output {new}",
        2,
        ["--to-pytorch"],
    ),
    ("convert-unknown-flag", "convert", "--checkpoint {pth} --output {new} --fast", 2, ["--fast"]),
    # sam-jax-predict
    (
        "predict-missing-image",
        "predict",
        "--checkpoint {ckpt} --image {root}/x.png --output {new} --point 5,5",
        1,
        ["x.png", "does not exist"],
    ),
    (
        "predict-not-an-image",
        "predict",
        "--checkpoint {ckpt} --image {text} --output {new} --point 5,5",
        1,
        ["could not load"],
    ),
    (
        "predict-output-is-a-file",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {file} --point 5,5",
        1,
        ["is a file, not a folder"],
    ),
    (
        "predict-output-inside-checkpoint",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {ckpt}/pred --point 5,5",
        2,
        ["is inside the input --checkpoint"],
    ),
    (
        "predict-bad-point",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {new} --point 5,x",
        2,
        ["bad point"],
    ),
    (
        "predict-bad-label",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {new} --point 5,5,2",
        2,
        ["label must be 0 or 1"],
    ),
    (
        "predict-inverted-box",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {new} --box 9,9,1,1",
        2,
        ["X0 <= X1"],
    ),
    (
        "predict-no-prompt",
        "predict",
        "--checkpoint {ckpt} --image {image} --output {new}",
        2,
        ["at least one --point, a --box or a --text"],
    ),
    (
        "predict-missing-checkpoint",
        "predict",
        "--checkpoint {root}/none --image {image} --output {new} --point 5,5",
        1,
        ["--checkpoint", "does not exist"],
    ),
    # sam-jax-amg
    (
        "amg-empty-folder",
        "amg",
        "--checkpoint {ckpt} --input {empty} --output {new}",
        1,
        ["holds no image files"],
    ),
    (
        "amg-output-inside-input",
        "amg",
        "--checkpoint {ckpt} --input {images} --output {images}/masks",
        2,
        ["is inside the input --input"],
    ),
    (
        "amg-output-is-a-file",
        "amg",
        "--checkpoint {ckpt} --input {images} --output {file}",
        1,
        ["is a file"],
    ),
    (
        "amg-threshold-not-a-number",
        "amg",
        "--checkpoint {ckpt} --input {images} --output {new} --pred-iou-thresh nan",
        2,
        ["pred_iou_thresh"],
    ),
    (
        "amg-zero-points",
        "amg",
        "--checkpoint {ckpt} --input {images} --output {new} --points-per-side 0",
        2,
        ["points_per_side"],
    ),
    # sam-jax-eval
    (
        "eval-unknown-dataset-kind",
        "eval",
        "--checkpoint {ckpt} --output {new} --dataset imagenet:/x",
        2,
        ["unknown kind 'imagenet'"],
    ),
    (
        "eval-missing-dataset",
        "eval",
        "--checkpoint {ckpt} --output {new} --dataset sa1b:{root}/no_sa1b",
        1,
        ["no_sa1b", "does not exist"],
    ),
    (
        "eval-output-inside-checkpoint",
        "eval",
        "--checkpoint {ckpt} --output {ckpt}/report --dataset synthetic:val?num_images=2",
        2,
        ["is inside the input --checkpoint"],
    ),
    (
        "eval-missing-checkpoint",
        "eval",
        "--checkpoint {root}/none --output {new} --dataset synthetic:val?num_images=2",
        1,
        ["--checkpoint", "does not exist"],
    ),
    (
        "eval-output-is-a-file",
        "eval",
        "--checkpoint {ckpt} --output {file} --dataset synthetic:val?num_images=2",
        1,
        ["is a file"],
    ),
    # sam-jax-train (every case must leave the workdir uncreated)
    (
        "train-negative-lr",
        "train",
        "--config {config} --workdir {new} --config.optimizer.lr=-1",
        2,
        ["optimizer.lr", "must be > 0"],
    ),
    (
        "train-zero-batch",
        "train",
        "--config {config} --workdir {new} --config.batch_size=0",
        2,
        ["batch_size", ">= 1"],
    ),
    (
        "train-unknown-dtype",
        "train",
        "--config {config} --workdir {new} --config.dtype=float8",
        2,
        ["dtype", "must be one of"],
    ),
    (
        "train-probability-above-one",
        "train",
        "--config {config} --workdir {new} --config.train.box_prob=1.5",
        2,
        ["train.box_prob", "[0.0, 1.0]"],
    ),
    (
        "train-lora-rank-larger-than-the-layer",
        "train",
        "--config {config} --workdir {new} --config.trainable=none --config.lora.rank=4096",
        2,
        ["lora.rank 4096 is larger than layer", "image_encoder/blocks_0/attn/qkv"],
    ),
    (
        "train-lora-unknown-target",
        "train",
        "--config {config} --workdir {new} --config.trainable=none --config.lora.rank=2 "
        "--config.lora.targets=qkv --config.lora.targets=neck",
        2,
        ["lora.targets", "unknown target", "neck"],
    ),
    (
        "train-field-typo",
        "train",
        "--config {config} --workdir {new} --config.optimzer.lr=1",
        2,
        ["optimizer"],
    ),
    (
        "train-missing-config-file",
        "train",
        "--config {root}/no_config.py --workdir {new}",
        2,
        ["no_config.py"],
    ),
    (
        "train-sam-init-without-path",
        "train",
        "--config {config} --workdir {new} --config.init.type=sam",
        2,
        ["init.path must be set"],
    ),
    (
        "train-missing-init-checkpoint",
        "train",
        "--config {config} --workdir {new} "
        "--config.init.type=sam --config.init.path={root}/none.pth",
        1,
        ["none.pth", "does not exist"],
    ),
    (
        "train-missing-data",
        "train",
        "--config {config} --workdir {new} --config.data.train=sa1b:{root}/no_data",
        1,
        ["no_data", "does not exist"],
    ),
    (
        "train-malformed-data-spec",
        "train",
        "--config {config} --workdir {new} --config.data.train=imagenet:x",
        2,
        ["data.train", "unknown kind"],
    ),
    (
        "train-workdir-is-a-file",
        "train",
        "--config {config} --workdir {file}",
        1,
        ["is a file, not a folder"],
    ),
    (
        "train-workdir-is-the-init-checkpoint",
        "train",
        "--config {config} --workdir {ckpt} --config.init.type=sam --config.init.path={ckpt}",
        2,
        ["is the input"],
    ),
    # Failures after the output folder was made leave no empty folder behind.
    (
        "train-damaged-init-checkpoint",
        "train",
        "--config {config} --workdir {new} --config.init.type=sam --config.init.path={damaged}",
        1,
        ["damaged_ckpt", "is damaged"],
    ),
    (
        "eval-damaged-checkpoint",
        "eval",
        "--checkpoint {damaged} --dataset synthetic:test --output {new}",
        1,
        ["damaged_ckpt", "is damaged"],
    ),
    (
        "eval-coco-images-all-missing",
        "eval",
        "--checkpoint {ckpt} --dataset coco:{coco}:{empty} --output {new}",
        1,
        ["no mask"],
    ),
    (
        "amg-one-file-that-is-not-an-image",
        "amg",
        "--checkpoint {ckpt} --input {text} --output {new}",
        1,
        ["0 of 1 images"],
    ),
    (
        "annotate-serve-malformed-detections",
        "annotate",
        "serve --checkpoint {ckpt} --images {images} --output {new} --detections {text}",
        1,
        ["notes.txt"],
    ),
    (
        "train-mesh-needs-more-devices",
        "train",
        "--config {config} --workdir {new} --config.mesh_shape=(3,3)",
        1,
        ["needs 9 devices"],
    ),
]

PROGS = {
    "convert": "sam-jax-convert",
    "predict": "sam-jax-predict",
    "amg": "sam-jax-amg",
    "eval": "sam-jax-eval",
    "train": "sam-jax-train",
    "annotate": "sam-jax-annotate",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{case id: (returncode, stderr, files changed)} for every case, run two at a time."""
    root = tmp_path_factory.mktemp("bad_input")
    inputs = _make_inputs(root)
    inputs["config"] = TRAIN_CONFIG
    before = _snapshot(root)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env.pop("JAX_COORDINATOR_ADDRESS", None)

    def run(case):
        name, command, argv, _, _ = case
        args = [a.format(**inputs) for a in argv.split()]
        code = f"import sys; from sam_jax.cli.{command} import main; sys.exit(main())"
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=300,
        )
        return name, (proc.returncode, proc.stderr)

    with ThreadPoolExecutor(2) as pool:
        out = dict(pool.map(run, CASES))
    after = _snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return out, changed


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_command_rejects_bad_input_in_one_line(results, case):
    name, command, _, code, fragments = case
    rc, stderr = results[0][name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{PROGS[command]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert rc == code, (rc, lines[0])


@pytest.mark.slow
def test_no_case_changed_or_left_a_file(results):
    assert results[1] == []


# ------------------------------------------------------------------------- the Python API


def test_config_checks_cover_every_field_of_the_defaults():
    import ml_collections

    from sam_jax.training import config_checks, defaults

    def fields(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, ml_collections.ConfigDict) and k != "model_overrides":
                yield from fields(v, f"{prefix}{k}.")
            elif k != "model_overrides":
                yield prefix + k

    assert set(fields(defaults.base_config())) == set(config_checks.RULES)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("optimizer.lr", 0.0, "must be > 0"),
        ("optimizer.b2", 1.5, "[0.0, 1.0]"),
        ("optimizer.decay_steps", (50, 10), "increasing"),
        ("train.num_rounds", 0, ">= 1"),
        ("data.large_scale_jitter", (2.0, 1.0), "min <= max"),
        ("eval.num_points", (0,), "integers >= 1"),
        ("mesh_shape", (2,), "tuple of 2 integers"),
        ("remat_policy", "everything", "must be one of"),
        ("data.train", "sa1b:", "expected sa1b:PATH"),
        ("model_overrides", {"image_sise": 512}, "image_sise"),
    ],
)
def test_check_config_names_the_field(field, value, fragment):
    import ml_collections

    from sam_jax.errors import ConfigError
    from sam_jax.training import config_checks, defaults

    config = defaults.base_config()
    if field == "model_overrides":
        config.model_overrides = ml_collections.ConfigDict(value)
    else:
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    with pytest.raises(ConfigError) as info:
        config_checks.check_config(config)
    assert field.split(".")[-1] in str(info.value) and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_check_output_refuses_overlaps(tmp_path):
    from sam_jax import paths
    from sam_jax.errors import OutputOverlapsInputError, UsageError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.pth").write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "in")
    pth, folder = str(tmp_path / "in" / "a.pth"), str(tmp_path / "in")
    for output, source, replaces in [
        (pth, pth, False),  # the output is the input
        (tmp_path / "in" / "sub", folder, False),  # inside an input folder
        (link / "sub", folder, False),  # inside it through a symlink
        (tmp_path, pth, True),  # replacing a folder that holds the input
    ]:
        with pytest.raises(OutputOverlapsInputError) as info:
            paths.check_output(str(output), {"--in": source}, "--out", replaces)
        assert isinstance(info.value, UsageError)
    paths.check_output(str(tmp_path / "out"), {"--in": str(tmp_path / "in")})
    paths.check_output(str(tmp_path), {"--in": str(tmp_path / "in")})  # writes beside, not over


def test_interrupted_write_leaves_the_previous_output(tmp_path):
    from sam_jax import outputs

    mask = {
        "segmentation": np.ones((4, 4), bool),
        "area": 16,
        "bbox": [0, 0, 4, 4],
        "point_coords": [[1.0, 1.0]],
        "predicted_iou": 0.9,
        "stability_score": 0.9,
        "crop_box": [0, 0, 4, 4],
    }
    first = outputs.write_masks([mask], str(tmp_path), "img", "binary_mask")
    before = _snapshot(tmp_path)

    class Boom(BaseException):
        pass

    real = outputs.write_masks_to_folder

    def interrupted(masks, path):
        real(masks[:1], path)
        raise Boom

    outputs.write_masks_to_folder = interrupted
    try:
        with pytest.raises(Boom):
            outputs.write_masks([mask, mask], str(tmp_path), "img", "binary_mask")
    finally:
        outputs.write_masks_to_folder = real
    assert _snapshot(tmp_path) == before and Path(first).is_dir()


@pytest.fixture(scope="module")
def predictor():
    import jax

    from sam_jax.config import tiny_config
    from sam_jax.modeling import build_sam
    from sam_jax.predictor import SamPredictor

    model = build_sam(tiny_config())
    p = SamPredictor(model, model.init_params(jax.random.key(0)))
    p.set_image(np.zeros((40, 50, 3), np.uint8))
    return p


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(multimask_output="False"), TypeError, "multimask_output must be True or False"),
        (dict(multimask_output=1), TypeError, "multimask_output"),
        (dict(return_logits="yes"), TypeError, "return_logits"),
        (dict(point_coords=np.zeros((2, 3))), ValueError, "point_coords"),
        (dict(point_coords=np.zeros((1, 2)), point_labels=np.array([7])), ValueError, "label"),
        (dict(point_labels=np.array([1])), ValueError, "point_labels given without"),
        (dict(box=np.array([1.0, 2.0, np.nan, 4.0])), ValueError, "box"),
    ],
)
def test_predictor_rejects_bad_arguments(predictor, kwargs, error, fragment):
    args = {"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array([1]), **kwargs}
    if "point_labels" in kwargs and "point_coords" not in kwargs:
        args.pop("point_coords")
    with pytest.raises(error) as info:
        predictor.predict(**args)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_predictor_accepts_what_the_official_one_accepts(predictor):
    """A point outside the image and a call without prompts work, as officially."""
    masks, scores, _ = predictor.predict(np.array([[500.0, -3.0]]), np.array([1]))
    assert masks.shape == (3, 40, 50) and np.isfinite(scores).all()
    assert predictor.predict()[0].shape == (3, 40, 50)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(pred_iou_thresh=float("nan")), "pred_iou_thresh must be a finite number"),
        (dict(stability_score_thresh=float("inf")), "stability_score_thresh"),
        (dict(pred_iou_thresh="0.5"), "must be a number"),
        (dict(points_per_side=True), "points_per_side must be an integer"),
        (dict(box_nms_thresh=2.0), "box_nms_thresh"),
        (dict(output_mode="png"), "output_mode"),
    ],
)
def test_generator_rejects_bad_settings(kwargs, fragment):
    from sam_jax.amg import SamAutomaticMaskGenerator

    with pytest.raises(ValueError, match=None) as info:
        SamAutomaticMaskGenerator(None, None, **kwargs)
    assert fragment in str(info.value)
