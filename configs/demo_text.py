"""SAM's text path on the synthetic shapes (docs/text_prompts.md, with the measured numbers):
configs/demo_synthetic.py's tiny SAM, trained from scratch, whose masks' first prompt is, half of
the time, the CLIP image embedding of the mask's region (SAM paper D.5) from the small CLIP of
configs/clip_synthetic.py:

    python -m sam_jax.training.clip_train --config configs/clip_synthetic.py \
        --workdir workdir/text_demo
    python train.py --config configs/demo_text.py --workdir workdir/text_demo/sam
    python train.py --config configs/demo_text.py --workdir workdir/text_demo/sam_ft \
        --config.init.type=sam --config.init.path=workdir/text_demo/sam/model \
        --config.total_steps=2000 --config.optimizer.lr=2e-3 --config.train.text_prob=0.7
    sam-jax-eval --task text --checkpoint workdir/text_demo/sam_ft/model \
        --dataset synthetic:test --output workdir/text_demo/eval_ft

Another CLIP: --config.model_overrides.text_encoder=FOLDER_OR_HUB_ID with
--config.model_overrides.text_embed_dim=ITS_WIDTH (the paper's,
openai/clip-vit-large-patch14-336: 768).
"""

import importlib.util
import os


def _synthetic_config():
    """configs/demo_synthetic.py's config (loaded beside this file, installed or not)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_synthetic.py")
    spec = importlib.util.spec_from_file_location("demo_synthetic_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _synthetic_config()
    c.model_overrides.text_embed_dim = 64  # configs/clip_synthetic.py's embed_dim
    c.model_overrides.text_encoder = "workdir/text_demo/clip"
    c.train.text_prob = 0.5
    # D.5's 100 x 100 pixels at 1024 px, at this 128-px input: 12.5 x 12.5 pixels.
    c.train.text_min_area = (100.0 * 128 / 1024) ** 2
    return c
