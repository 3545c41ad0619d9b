"""The small CLIP of the text-prompt demo (docs/text_prompts.md), trained on the synthetic shapes'
crops and names:

    python -m sam_jax.training.clip_train --config configs/clip_synthetic.py --workdir W

writes W/clip, a transformers CLIPModel folder with its tokenizer; configs/demo_text.py trains
SAM's text path with it. Fields: sam_jax.training.clip_train.default_config.
"""

from sam_jax.training.clip_train import default_config


def get_config():
    return default_config()
