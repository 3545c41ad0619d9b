"""Experiment configs, shipped in the wheel as `sam_jax.configs` (pyproject.toml package-dir).

Each module's get_config() returns an ml_collections.ConfigDict (fields:
sam_jax/training/defaults.py). `sam-jax-train --config NAME` loads configs/NAME.py by name after
pip install; `--config path/to/file.py` loads any file.
"""
