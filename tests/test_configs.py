"""The experiment configs in configs/: each loads, builds a valid SamConfig, and the SA-1B configs
hold the paper's recipe (appendix A; shared/reference/training-and-eval.md)."""

import glob
import importlib.util
import os

import pytest

from sam_jax.training.initialization import sam_config_from

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# Configs of other trainers (not SAM experiments): the synthetic CLIP of the text demo.
OTHER = {"clip_synthetic"}
NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(CONFIGS, "*.py"))
    if not os.path.basename(p).startswith("_") and os.path.basename(p)[:-3] not in OTHER
)


def test_clip_config_loads():
    c = _load("clip_synthetic")
    assert c.steps >= 1 and c.clip.embed_dim == _load("demo_text").model_overrides.text_embed_dim


def test_all_configs_are_present():
    assert {"demo", "finetune_coco", "sam_vit_b_sa1b", "sam_vit_h_sa1b"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_builds_a_model_config(name):
    c = _load(name)
    assert c.total_steps >= 1 and c.batch_size >= 1
    if c.init.type != "sam":  # the fine-tune config reads the architecture from its checkpoint
        sam = sam_config_from(c)
        assert sam.image_size % sam.patch_size == 0


def test_sa1b_configs_follow_the_paper():
    h, b = _load("sam_vit_h_sa1b"), _load("sam_vit_b_sa1b")
    for c in (h, b):
        assert c.init.type == "mae" and c.data.train.startswith("sa1b:")
        assert c.optimizer.lr == 8e-4 and c.optimizer.warmup_steps == 250
        assert c.optimizer.weight_decay == 0.1 and c.optimizer.decay == "step"
        assert c.data.max_masks == 64 and c.train.num_rounds == 11
        assert (c.train.focal_weight, c.train.dice_weight) == (20.0, 1.0)
        assert c.dtype == "bfloat16"
    assert (h.model, h.batch_size, h.total_steps) == ("vit_h", 256, 90_000)
    assert tuple(h.optimizer.decay_steps) == (60_000, 86_666)
    assert h.optimizer.layer_decay == 0.8 and h.model_overrides.drop_path_rate == 0.4
    assert (b.model, b.batch_size, b.total_steps) == ("vit_b", 128, 180_000)
    assert b.optimizer.layer_decay == 0.6 and b.model_overrides.drop_path_rate == 0.6


def test_finetune_config_freezes_the_encoder():
    c = _load("finetune_coco")
    assert c.init.type == "sam" and c.trainable == "prompt_encoder_and_decoder"
    assert c.data.train.startswith("coco:")


def test_lora_config_adapts_the_encoder_and_passes_the_checks():
    from sam_jax.training.config_checks import check_config

    c = _load("finetune_lora")
    c.init.path = "some/checkpoint"
    c.data.train = "coco:ann.json:images"
    check_config(c)
    assert c.lora.rank == 4 and tuple(c.lora.targets) == ("qkv",) and c.trainable == "mask_decoder"
