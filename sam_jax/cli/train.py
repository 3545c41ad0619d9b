"""sam-jax-train: train SAM, or resume a run (also `python train.py`).

    sam-jax-train --config FILE_OR_NAME --workdir DIR [--config.FIELD=VALUE ...]
    sam-jax-train --config FILE_OR_NAME --compile-only --topology v5e:16x16 [--num-slices N]

The config is a Python file whose get_config() returns an ml_collections.ConfigDict (fields:
sam_jax/training/defaults.py) or the name of a shipped one (configs/ in the source tree,
sam_jax.configs when installed). WORKDIR holds checkpoints/, metrics.jsonl, tensorboard/,
config.json and, at the end, model/ (a converted checkpoint for sam_jax.load / sam-jax-eval).
Rerunning the same command resumes from the latest checkpoint; SIGTERM saves and exits 0.
WORKDIR may be a bucket (gs://...). Several processes (TPU pod, SLURM, Open MPI) join by
themselves; an explicit launch passes --coordinator_address/--num_processes/--process_id (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

--compile-only compiles the config's real train step for a TPU slice on this machine, with no TPU
(libtpu's compiler: pip install 'sam_jax[tpu]'), prints the plan (memory per chip against its
HBM, FLOPs and HBM traffic per step, the roofline, images/s per chip) and exits 1 when it does not
fit; it reads no data, writes nothing and needs no --workdir.
"""

from __future__ import annotations

import argparse
import os
import sys

from sam_jax import distributed
from sam_jax.cli import common, config_overrides
from sam_jax.errors import UsageError

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
        usage=f"{prog} --config FILE_OR_NAME (--workdir DIR | --compile-only --topology NAME) "
        "[--config.FIELD=VALUE ...] [options]",
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
    parser.add_argument("--workdir", metavar="DIR", help="folder (or gs:// URL) of the run")
    plan = parser.add_argument_group("compile plan (no TPU needed: libtpu compiles on this host)")
    plan.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the train step for --topology and print the plan instead of training",
    )
    plan.add_argument(
        "--topology",
        metavar="NAME",
        help="TPU slice: v4:AxBxC, v5e:AxB, v5p:AxBxC or v6e:AxB (chips), e.g. v5e:16x16",
    )
    plan.add_argument(
        "--num-slices",
        type=common.positive_int,
        default=1,
        metavar="N",
        help="slices joined by the data-center network (the data axis spans them; default 1)",
    )
    common.add_distributed_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = PROG):
    """(args, config): the flags and the config with the overrides applied (UsageError)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = config_overrides.split_overrides(argv)
    parser = build_parser(prog)
    args = parser.parse_args(rest)
    if args.compile_only and not args.topology:
        raise UsageError("--compile-only needs --topology (e.g. v5e:16x16)")
    if not args.compile_only and (args.topology or args.num_slices != 1):
        raise UsageError("--topology and --num-slices go with --compile-only")
    if not args.compile_only and not args.workdir:
        raise UsageError("the following arguments are required: --workdir")
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


def compile_only(args: argparse.Namespace, config) -> int:
    """Prints the plan of the config's train step on --topology; PlanDoesNotFitError when the
    step does not fit the chips' HBM (exit 1)."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # no accelerator is used, even where one is present
        jax.config.update("jax_platforms", "cpu")
    from sam_jax.training import compile_plan

    plan = compile_plan.train_plan(config, args.topology, args.num_slices)
    print(compile_plan.format_plan(plan), flush=True)
    compile_plan.check_fits(plan)
    return common.EXIT_OK


@common.leaves_no_empty_folders("workdir")
def run(args: argparse.Namespace, config) -> int:
    _quiet_absl()
    if args.compile_only:
        return compile_only(args, config)
    common.join_job(args)
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
