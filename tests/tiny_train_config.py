"""A tiny experiment config file for the command-line training tests (train.py --config=...).

The model and recipe of `training_fakes.tiny_train_config`, on the built-in synthetic data.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_fakes import tiny_train_config  # noqa: E402


def get_config():
    c = tiny_train_config()
    c.data.train = "synthetic:train?image_size=64&num_images=24"
    c.batch_size = 8
    c.total_steps = 6
    c.mesh_shape = (2, 2)
    c.min_fsdp_size = 256
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = True
    c.eval.dataset = "synthetic:val?image_size=64&num_images=4"  # validation at the end
    c.eval.max_images = 4
    c.eval.max_masks = 8
    c.eval.num_points = (1, 2)
    c.eval.batch_size = 8
    return c
