"""SAM checkpoints: the official PyTorch `.pth` files, our converted orbax directories, the
mapping between the two, and training checkpoints.

    pth.py        reading / writing official state_dicts (torch imported lazily)
    mapping.py    the one table between torch keys and flax params (pure numpy)
    load.py       the one door: `read_checkpoint` / `load` read every format below, with the
                  model-type and finite checks inside
    converted.py  orbax directories of (config, params)
    hf.py         transformers SamModel directories and Hugging Face Hub ids
    registry.py   Meta's released checkpoints by name (sam_vit_b, ...), downloaded and cached
    manifest.py   checksums of every file and array, written last, verified at load
    training.py   the train state under an orbax CheckpointManager (resume, preemption)
"""

from sam_jax.checkpoints.converted import load_converted, read_converted_config, save_converted
from sam_jax.checkpoints.hf import is_hf_dir, load_hf, save_hf
from sam_jax.checkpoints.load import (
    check_finite,
    check_model_type,
    checkpoint_format,
    is_checkpoint_name,
    load,
    read_checkpoint,
    read_config,
)
from sam_jax.checkpoints.mapping import (
    infer_config,
    params_to_state_dict,
    state_dict_to_params,
)
from sam_jax.checkpoints.pth import (
    check_sha256,
    config_for_state_dict,
    load_pth,
    read_state_dict,
    save_pth,
)
from sam_jax.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "check_finite",
    "check_model_type",
    "checkpoint_format",
    "check_sha256",
    "config_for_state_dict",
    "infer_config",
    "is_checkpoint_name",
    "is_hf_dir",
    "load",
    "load_converted",
    "load_hf",
    "load_pth",
    "params_to_state_dict",
    "read_checkpoint",
    "read_config",
    "read_converted_config",
    "read_state_dict",
    "save_converted",
    "save_hf",
    "save_pth",
    "state_dict_to_params",
]
