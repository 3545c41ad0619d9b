"""Train SAM: `python train.py --config configs/demo.py --workdir DIR [--config.FIELD=VALUE ...]`.

The config is a Python file whose get_config() returns an ml_collections.ConfigDict (fields:
sam_jax/training/defaults.py). WORKDIR holds checkpoints/, metrics.jsonl, tensorboard/,
config.json and, at the end, model/ (a converted checkpoint for sam_jax.load / eval.py).
Rerunning the same command resumes from the latest checkpoint; SIGTERM saves and exits 0.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from sam_jax.training.train_loop import NonFiniteLossError, train_and_evaluate

    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (NonFiniteLossError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print("done: " + ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict)))


if __name__ == "__main__":
    app.run(main)
