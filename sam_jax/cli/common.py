"""What every command shares: one argparse convention, the exit codes, one-line errors, the
multi-process flags and progress bars.

Exit status of every command (`EXIT_*`):
  0    success
  1    the work failed: a missing or unreadable checkpoint, image, dataset or file, bad data,
       a conversion or training error, processes that cannot join
  2    usage: unknown, missing or conflicting flags, a malformed flag value (a number, a point,
       a dataset spec, a `--config.` override, an unknown config field); nothing was run
  130  interrupted (Ctrl-C)
Every error is one line on stderr, `<command>: error: <message>`, never a traceback (an
unexpected exception, a bug, still shows its traceback).
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import jax

from sam_jax import distributed, paths
from sam_jax.checkpoints import is_checkpoint_name
from sam_jax.cli import interrupts
from sam_jax.errors import UsageError, one_line
from sam_jax.sam_model import resolve_device

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# What a failed piece of work raises (DistributedError and NonFiniteLossError are RuntimeErrors,
# paths.PathError an OSError); anything else is a bug and keeps its traceback.
FAILURES: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, ImportError)
EXIT_CODES_HELP = """\
exit status: 0 success, 1 the work failed (a missing or unreadable input, bad data, a failed
run), 2 usage error (bad flags or flag values), 130 interrupted; errors are one line on stderr
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands: a usage error raises UsageError instead of printing the usage
    block and exiting, so that `run_command` reports it in one line with status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def print_error(prog: str, message: object) -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def _missing_module(e: ImportError, extras: str) -> str:
    name = getattr(e, "name", None) or one_line(e)
    return f"{one_line(e)} (the module {name!r} comes with pip install 'sam_jax[{extras}]')"


# jax's GPU plugins: where one is installed, the platform choice is left to jax.
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def skip_absent_tpu() -> bool:
    """Runs jax on the CPU when libtpu is installed (`sam_jax[tpu]`, for compile plans) on a
    machine without TPU chips and without a GPU plugin: jax would otherwise try the TPU at its
    first use, print libtpu's initialisation errors and look for a metadata server. JAX_PLATFORMS,
    when set, decides instead. True when it switched to the CPU."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # a TPU VM's chips
        return False
    if any(importlib.util.find_spec(name) for name in GPU_PLUGINS):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def run_command(
    prog: str,
    body: Callable[[], int | None],
    failures: tuple[type[BaseException], ...] = FAILURES,
    extras: str = "train",
) -> int:
    """Runs `body` (parse, then work) and returns the exit status of the convention above.

    `failures`: the exception types that mean "the work failed" (status 1, one line); `extras`:
    the pip extras that provide the command's optional modules, named when one is missing.
    SIGTERM is handled as Ctrl-C (status 130), so the clean-up of half-written output runs
    (training replaces this handler with its own: save a checkpoint and exit 0).
    """
    skip_absent_tpu()
    restore = interrupts.sigterm_as_interrupt()
    try:
        code = body()
    except UsageError as e:
        print_error(prog, f"{one_line(e)} (see --help)")
        return EXIT_USAGE
    except SystemExit as e:  # --help, or a library calling sys.exit
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        print_error(prog, e.code)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:
        print_error(prog, _missing_module(e, extras))
        return EXIT_FAILED
    except failures as e:
        print_error(prog, e)
        return EXIT_FAILED
    finally:
        if restore is not None:
            restore()
    return EXIT_OK if code is None else int(code)


def leaves_no_empty_folders(*attrs: str):
    """Decorator of a command's `run(args, ...)`: when it fails, the folders it created at or
    under the paths `args.<attr>` that hold no file are removed (`paths.no_empty_leftovers`)."""

    def wrap(run):
        @functools.wraps(run)
        def wrapped(args, *rest, **kwargs):
            with paths.no_empty_leftovers(*(getattr(args, a, None) for a in attrs)):
                return run(args, *rest, **kwargs)

        return wrapped

    return wrap


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# Multi-process launch: the same flags for every command that can run as several processes.
_LAUNCH = (  # (dest, environment variable, flag)
    ("coordinator_address", "JAX_COORDINATOR_ADDRESS", "--coordinator-address"),
    ("num_processes", "JAX_NUM_PROCESSES", "--num-processes"),
    ("process_id", "JAX_PROCESS_ID", "--process-id"),
)


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """--coordinator-address/--num-processes/--process-id/--initialization-timeout (each also
    spelled with underscores: --coordinator_address, ...)."""
    group = parser.add_argument_group(
        "multi-process launch",
        "A TPU pod, SLURM or Open MPI job joins by itself; an explicit launch gives all\n"
        "three of the address, the count and the id (or the environment variables\n"
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).",
    )
    group.add_argument(
        "--coordinator-address",
        "--coordinator_address",
        dest="coordinator_address",
        metavar="HOST:PORT",
        help="address of process 0",
    )
    group.add_argument(
        "--num-processes",
        "--num_processes",
        dest="num_processes",
        type=positive_int,
        metavar="N",
        help="processes in the job",
    )
    group.add_argument(
        "--process-id",
        "--process_id",
        dest="process_id",
        type=int,
        metavar="I",
        help="this process's index in the job, in [0, N)",
    )
    group.add_argument(
        "--initialization-timeout",
        "--initialization_timeout",
        dest="initialization_timeout",
        type=positive_int,
        default=300,
        metavar="SECONDS",
        help="how long to wait for the coordinator and the other processes (default: 300)",
    )


def check_launch(args: argparse.Namespace) -> None:
    """Raises UsageError for an explicit launch that is incomplete or inconsistent (flags and the
    JAX_* variables together), before anything tries to join."""
    values = {}
    for dest, env, _ in _LAUNCH:
        value = getattr(args, dest, None)
        if value is None and os.environ.get(env, "") != "":
            value = os.environ[env]
            if dest != "coordinator_address":
                if not re.fullmatch(r"\s*-?\d+\s*", value):
                    raise UsageError(f"{env} must be an integer, got {value!r}")
                value = int(value)
        values[dest] = value
    given = [d for d, v in values.items() if v is not None]
    if given and len(given) < len(_LAUNCH):
        missing = ", ".join(f"{env} (or {flag})" for d, env, flag in _LAUNCH if d not in given)
        raise UsageError(
            "an explicit multi-process launch needs the coordinator address, the number of "
            f"processes and this process's id; missing: {missing}"
        )
    if given:
        count, pid = values["num_processes"], values["process_id"]
        if count < 1 or not 0 <= pid < count:
            raise UsageError(f"process id {pid} is not in [0, {count}) processes")


def join_job(args: argparse.Namespace) -> int:
    """Checks the launch flags (UsageError) and joins the job's processes (DistributedError, a
    RuntimeError, when they cannot join); returns the number of processes."""
    check_launch(args)

    return distributed.initialize(
        args.coordinator_address, args.num_processes, args.process_id, args.initialization_timeout
    )


def progress(items: Iterable, desc: str, unit: str, total: int | None = None, disable=False):
    """(iterator, write): a tqdm bar over `items` (on a terminal only: not in logs and pipes)
    and a print that does not break it; without tqdm (an optional dependency), the items
    themselves and print."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items, print
    bar = tqdm(
        items, desc=desc, unit=unit, total=total, disable=True if disable else None,
        dynamic_ncols=True,
    )  # fmt: skip
    return bar, tqdm.write


def device_context(device: str | None):
    """A `jax.default_device` context for a platform name (cuda is an alias of gpu)."""
    if device is None:
        return nullcontext()
    import jax

    return jax.default_device(resolve_device(device))


# The flags that take a checkpoint (sam_jax.load fetches registry names and Hub ids itself).
CHECKPOINT_FLAGS = ("--checkpoint", "--baseline")


def _fetched(flag: str, path: str) -> bool:
    """A checkpoint flag that names a registry model or a Hub id, not a path."""
    return flag in CHECKPOINT_FLAGS and is_checkpoint_name(path)


def check_paths(inputs: dict[str, str], output: str | None = None, replaces: bool = False):
    """Before any work: every input ({flag: path}) exists (FileNotFoundError), and `output` is
    not an existing file (PathError) and neither is, holds nor sits inside an input (exit 2)."""

    for flag, path in inputs.items():
        if path and not paths.exists(path) and not _fetched(flag, path):
            raise FileNotFoundError(f"{flag} {path} does not exist")
    if output is None:
        return
    paths.check_output(output, inputs, replaces=replaces)
    if not replaces and paths.exists(output) and not paths.isdir(output):
        raise paths.PathError(f"--output {output} is a file, not a folder")
