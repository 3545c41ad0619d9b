"""The wheel: build it, install it into a fresh virtualenv and run every console command from a
folder outside the source tree.

Nothing is downloaded: the wheel is built without build isolation, and the new virtualenv sees
this virtualenv's installed dependencies through a .pth file that lists its site-packages (plain
paths: the source checkout's editable-install finder there is not run, so `sam_jax` comes from
the wheel). The commands run a tiny model: a random official .pth made by segment_anything,
converted, then prompted, auto-masked, evaluated on synthetic data, and trained for 2 steps from
the shipped `demo` config (loaded by name) with overrides.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    "sam-jax-train",
    "sam-jax-eval",
    "sam-jax-convert",
    "sam-jax-amg",
    "sam-jax-predict",
    "sam-jax-annotate",
    "sam-jax-export",
)
SYNTHETIC = "synthetic:val?image_size=64&num_images=2"
TINY_DEMO = [  # configs/demo.py shrunk to the tiny test model, 2 steps, no validation
    "--config.total_steps=2",
    "--config.batch_size=2",
    "--config.data.max_masks=2",
    "--config.data.train=synthetic:train?image_size=64&num_images=8",
    "--config.model_overrides.image_size=64",
    "--config.model_overrides.patch_size=16",
    "--config.model_overrides.encoder_embed_dim=32",
    "--config.model_overrides.encoder_depth=2",
    "--config.model_overrides.encoder_num_heads=2",
    "--config.model_overrides.encoder_global_attn_indexes=(1,)",
    "--config.model_overrides.window_size=2",
    "--config.model_overrides.prompt_embed_dim=32",
    "--config.model_overrides.decoder_mlp_dim=32",
    "--config.model_overrides.iou_head_hidden_dim=32",
    "--config.train.num_rounds=2",
    "--config.train.unroll_rounds=1",
    "--config.optimizer.warmup_steps=1",
    "--config.mesh_shape=(1,1)",
    "--config.checkpoint.every_steps=2",
    "--config.log_every_steps=1",
    "--config.eval.dataset=",
    "--noconfig.progress_bar",
]


def _packages_on_disk() -> set[str]:
    found = {"sam_jax.configs"}  # configs/, mapped by package-dir
    for top in ("sam_jax", "convert_weights"):
        for init in (REPO / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join(init.parent.relative_to(REPO).parts))
    return found


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages (package-dir maps configs/): a new package folder
    must be added there, or the wheel silently misses it."""
    import tomllib  # Python 3.11+, which the test extra's environment is
    with open(REPO / "pyproject.toml", "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    assert set(tool["packages"]) == _packages_on_disk()
    assert tool["package-dir"] == {"sam_jax.configs": "configs"}
    assert (REPO / "configs" / "__init__.py").is_file()


def _run(argv, **kw):
    kw.setdefault("timeout", 600)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh virtualenv with the wheel installed, its environment, a work
    folder outside the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("sam_jax", "convert_weights", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _ok(_run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", src]))
    (wheel,) = (root / "dist").glob("sam_jax-*.whl")

    venv = root / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv]))
    python = venv / "bin" / "python"
    purelib = _ok(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(purelib, "_sam_jax_test_deps.pth").write_text("\n".join(deps) + "\n")
    _ok(_run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel]))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("XLA_FLAGS", None)
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    work = root / "work"
    work.mkdir()
    return venv / "bin", env, work


def _command(installed, name, *argv, timeout=600):
    bindir, env, work = installed
    return _run([bindir / name, *map(str, argv)], cwd=work, env=env, timeout=timeout)


def _one_line_error(res, code, prog, *fragments):
    assert res.returncode == code, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), res.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.mark.slow
def test_commands_from_the_installed_wheel(installed):
    bindir, env, work = installed
    # The package comes from the wheel, configs included; the source tree is not on the path.
    where = _ok(
        _run(
            [
                bindir / "python",
                "-c",
                "import sam_jax, sam_jax.cli, sam_jax.configs.demo, convert_weights; "
                "print(sam_jax.__file__); print(sam_jax.configs.__file__)",
            ],
            cwd=work,
            env=env,
        )
    ).stdout.split()
    assert all(str(bindir.parent) in p and str(REPO) not in p for p in where), where

    for name in COMMANDS:
        res = _ok(_command(installed, name, "--help", timeout=120))
        assert res.stdout.startswith(f"usage: {name}") and "exit status" in res.stdout, name
    assert "demo" in _command(installed, "sam-jax-train", "--help").stdout

    # sam-jax-convert: a tiny official .pth (random weights) -> a converted checkpoint.
    import torch
    from PIL import Image

    from sam_jax.config import tiny_config
    from tests.torch_reference import build_official

    torch.save(build_official(tiny_config(), seed=0).state_dict(), work / "tiny.pth")
    _ok(_command(installed, "sam-jax-convert", "--checkpoint", "tiny.pth", "--output", "ckpt"))
    assert (work / "ckpt" / "config").is_dir()

    rng = np.random.default_rng(0)
    image = np.full((72, 96, 3), 50, np.uint8)
    image[10:36, 15:48] = [210, 40, 40]
    image = (image + rng.integers(0, 30, image.shape)).astype(np.uint8)
    Image.fromarray(image).save(work / "photo.png")

    # sam-jax-predict and sam-jax-amg on the converted checkpoint.
    res = _ok(
        _command(
            installed,
            "sam-jax-predict",
            "--checkpoint",
            "ckpt",
            "--image",
            "photo.png",
            "--output",
            "pred",
            "--point",
            "30,20",
        )  # fmt: skip
    )
    assert "Best mask" in res.stdout
    scores = json.loads((work / "pred" / "scores.json").read_text())
    assert len(scores["masks"]) == 3 and (work / "pred" / "overlay.png").is_file()
    _ok(
        _command(
            installed,
            "sam-jax-amg",
            "--checkpoint",
            "ckpt",
            "--input",
            "photo.png",
            "--output",
            "amg",
            "--points-per-side",
            "4",
            "--points-per-batch",
            "8",
            "--pred-iou-thresh",
            "0",
            "--stability-score-thresh",
            "0",
            "--no-progress",
        )  # fmt: skip
    )
    assert (work / "amg" / "photo" / "metadata.csv").is_file()
    (work / "photos").mkdir()
    (work / "photos" / "photo.png").write_bytes((work / "photo.png").read_bytes())
    _ok(
        _command(
            installed,
            "sam-jax-annotate",
            "auto",
            "--checkpoint",
            "ckpt",
            "--input",
            "photos",
            "--output",
            "sa1b",
            "--points-per-side",
            "4",
            "--crop-n-layers",
            "0",
            "--no-progress",
        )  # fmt: skip
    )
    record = json.loads((work / "sa1b" / "photo.json").read_text())
    assert record["image"]["file_name"] == "photo.jpg" and (work / "sa1b" / "photo.jpg").is_file()

    # sam-jax-eval on synthetic data.
    res = _ok(
        _command(
            installed,
            "sam-jax-eval",
            "--checkpoint",
            "ckpt",
            "--dataset",
            SYNTHETIC,
            "--output",
            "eval",
            "--num-points",
            "1,2",
            "--max-masks",
            "3",
            "--no-progress",
        )  # fmt: skip
    )
    results = json.loads((work / "eval" / "results.json").read_text())
    assert results["datasets"][SYNTHETIC]["num_masks"] == 3 and "| average" in res.stdout

    # sam-jax-train from the shipped demo config, by name, shrunk by overrides.
    res = _ok(
        _command(installed, "sam-jax-train", "--config", "demo", "--workdir", "run", *TINY_DEMO)
    )
    assert "done: step=2" in res.stdout
    saved = json.loads((work / "run" / "config.json").read_text())
    assert saved["total_steps"] == 2 and saved["model_overrides"]["encoder_embed_dim"] == 32
    assert (work / "run" / "model" / "config").is_dir()

    # A bad flag value: 2, one line, nothing written. A missing checkpoint: 1, one line.
    bad = _command(
        installed, "sam-jax-eval", "--checkpoint", "ckpt", "--dataset", "synthetic",
        "--output", "e2", "--num-points", "1,x",
    )  # fmt: skip
    _one_line_error(bad, 2, "sam-jax-eval", "--num-points")
    bad = _command(
        installed, "sam-jax-train", "--config", "demo", "--workdir", "w2",
        "--config.optimizer.lr=fast",
    )  # fmt: skip
    _one_line_error(bad, 2, "sam-jax-train", "--config.optimizer.lr")
    bad = _command(installed, "sam-jax-train", "--config", "demo", "--workdir", "w2", "--nope")
    _one_line_error(bad, 2, "sam-jax-train", "--nope")
    missing = _command(
        installed, "sam-jax-predict", "--checkpoint", "nope", "--image", "photo.png",
        "--output", "p2", "--point", "3,4",
    )  # fmt: skip
    _one_line_error(missing, 1, "sam-jax-predict", "nope", "does not exist")
    missing = _command(
        installed, "sam-jax-eval", "--checkpoint", "nope", "--dataset", "synthetic",
        "--output", "e3",
    )  # fmt: skip
    _one_line_error(missing, 1, "sam-jax-eval", "nope", "does not exist")
    missing = _command(installed, "sam-jax-convert", "--checkpoint", "nope.pth", "--output", "c")
    _one_line_error(missing, 1, "sam-jax-convert", "does not exist")
    assert not any((work / d).exists() for d in ("e2", "w2", "p2", "c"))
