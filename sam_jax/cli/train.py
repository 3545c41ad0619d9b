"""sam-jax-train: train SAM, or resume a run (also `python train.py`).

    sam-jax-train --config FILE_OR_NAME --workdir DIR [--config.FIELD=VALUE ...]

The config is a Python file whose get_config() returns an ml_collections.ConfigDict (fields:
sam_jax/training/defaults.py) or the name of a shipped one (configs/ in the source tree,
sam_jax.configs when installed). WORKDIR holds checkpoints/, metrics.jsonl, tensorboard/,
config.json and, at the end, model/ (a converted checkpoint for sam_jax.load / sam-jax-eval).
Rerunning the same command resumes from the latest checkpoint; SIGTERM saves and exits 0.
WORKDIR may be a bucket (gs://...). Several processes (TPU pod, SLURM, Open MPI) join by
themselves; an explicit launch passes --coordinator_address/--num_processes/--process_id (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import argparse
import sys

from sam_jax.cli import common, config_overrides

PROG = "sam-jax-train"

OVERRIDES_HELP = """\
config overrides:
  --config.FIELD=VALUE  set any field of the config, nested ones too, typed by the field:
                        --config.total_steps=2000 --config.optimizer.lr=1e-4
                        --config.mesh_shape=(4,2) --config.eval.num_points=1,5
                        --config.data.train=sa1b:/data/sa1b --config.progress_bar=false
                        (--config.FIELD VALUE, --config.FLAG and --noconfig.FLAG work too)

shipped configs: {shipped}

"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    shipped = ", ".join(config_overrides.shipped_configs()) or "none found"
    parser = common.ArgumentParser(
        prog=prog,
        usage=f"{prog} --config FILE_OR_NAME --workdir DIR [--config.FIELD=VALUE ...] [options]",
        description=__doc__.split("\n\n", 2)[2].strip(),
        epilog=OVERRIDES_HELP.format(shipped=shipped) + common.EXIT_CODES_HELP,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="FILE_OR_NAME",
        help="experiment config: a .py file (FILE:ARG passes ARG to get_config) or the name of "
        "a shipped config",
    )
    parser.add_argument(
        "--workdir", required=True, metavar="DIR", help="folder (or gs:// URL) of the run"
    )
    common.add_distributed_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = PROG):
    """(args, config): the flags and the config with the overrides applied (UsageError)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_overrides.split_overrides(argv)
    parser = build_parser(prog)
    args = parser.parse_args(rest)
    config = config_overrides.load_config(args.config)
    config_overrides.apply_overrides(config, overrides)
    return args, config


def _quiet_absl() -> None:
    """orbax logs every save through absl at INFO; without absl's app.run its flags are also
    unparsed, which some libraries read: mark them parsed, with their defaults."""
    try:
        from absl import flags, logging
    except ImportError:
        return
    logging.set_verbosity(logging.WARNING)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@common.leaves_no_empty_folders("workdir")
def run(args: argparse.Namespace, config) -> int:
    _quiet_absl()
    common.join_job(args)
    from sam_jax import distributed
    from sam_jax.training.train_loop import train_and_evaluate

    result = train_and_evaluate(config, args.workdir)
    if distributed.is_main_process():
        done = ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict))
        print("done: " + done, flush=True)
    return common.EXIT_OK


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The sam-jax-train command; returns the exit status (0 / 1 run failed / 2 usage)."""
    return common.run_command(prog, lambda: run(*parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
