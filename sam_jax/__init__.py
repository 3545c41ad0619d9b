"""sam_jax: Segment Anything (SAM) in JAX/Flax.

Public API (imported lazily, so `import sam_jax` stays light):
  load(path) -> (model, params)              a converted directory, an official .pth, a transformers
                                             folder, a Hub id (facebook/sam-vit-base) or a
                                             registry name (sam_vit_b: downloaded once, cached)
  build_sam(config, dtype, attention_impl)   the Flax module; `SamConfig`, `get_config("vit_b")`
  SamPredictor(model, params)                the official predictor API
  SamAutomaticMaskGenerator(model, params)   "segment everything"
  sam_jax.functional                         pure, jit-able encode / decode functions
  sam_jax.prompts                            a prompt's checks, frames, packing and buckets

Coming from segment-anything (the official names; see sam_jax/sam_model.py):
  sam_model_registry["vit_b"](checkpoint)    -> SamModel (module + params): sam(batched_input, ...)
  SamPredictor(sam), SamAutomaticMaskGenerator(sam, ...), ResizeLongestSide, ResizedCoords
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SamConfig": "sam_jax.config",
    "get_config": "sam_jax.config",
    "tiny_config": "sam_jax.config",
    "build_sam": "sam_jax.modeling",
    "pack_prompts": "sam_jax.prompts",
    "PAD_LABEL": "sam_jax.modeling",
    "load": "sam_jax.checkpoints",
    "SamPredictor": "sam_jax.predictor",
    "ResizeLongestSide": "sam_jax.prompts",
    "ResizedCoords": "sam_jax.prompts",
    "SamModel": "sam_jax.sam_model",
    "sam_model_registry": "sam_jax.sam_model",
    "build_sam_vit_h": "sam_jax.sam_model",
    "build_sam_vit_l": "sam_jax.sam_model",
    "build_sam_vit_b": "sam_jax.sam_model",
    "SamAutomaticMaskGenerator": "sam_jax.amg",
}

__all__ = [*_EXPORTS, "functional", "prompts", "transforms"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in ("functional", "transforms", "modeling", "config", "prompts"):
        return import_module(f"sam_jax.{name}")
    raise AttributeError(f"module 'sam_jax' has no attribute {name!r}")
