"""Joining a multi-process job (TPU pod, SLURM, Open MPI, an explicit launch), for every command.

`initialize()` must run before any other jax call. It calls `jax.distributed.initialize()` when
the job has several processes:
  - explicit: coordinator address, number of processes and process id given as arguments (the
    commands' --coordinator_address/--num_processes/--process_id flags) or as the environment
    variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
  - detected: JAX's own cluster detection (Cloud TPU VM pods through the metadata server, GKE TPU,
    SLURM, Open MPI) reporting more than one process.
A job that sees several processes but cannot join them raises DistributedError (one line), or,
where JAX would abort the process (the others not joining in time), exits with status 1 and one
line on stderr: it never trains on a private subset of the data.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

import jax

from sam_jax.errors import DistributedError, one_line

logger = logging.getLogger(__name__)

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster JAX detects (tpu, slurm, ompi, ...), or None.

    Uses JAX's cluster detection (what `jax.distributed.initialize()` without arguments uses);
    falls back to the schedulers' environment variables if that API moved.
    """
    try:
        from jax._src.clusters import ClusterEnv

        for env in ClusterEnv._cluster_types:
            if not env.opt_in_only_method and env.is_env_present():
                return env.name or env.__name__, int(env.get_process_count())
        return None
    except (ImportError, AttributeError, NotImplementedError):
        pass
    for name, var in (("slurm", "SLURM_NTASKS"), ("ompi", "OMPI_COMM_WORLD_SIZE")):
        if var in os.environ:
            return name, int(os.environ[var])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
    return ("tpu", len(hosts.split(","))) if hosts else None


def _watchdog(timeout_s: float, message: str) -> threading.Event:
    """Exits the process with `message` (one line, status 1) unless the event is set in time."""
    done = threading.Event()

    def watch():
        if not done.wait(timeout_s):
            sys.stderr.write(f"error: {message}\n")
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=watch, name="sam_jax-join-watchdog", daemon=True).start()
    return done


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be an integer, got {value!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> int:
    """Joins the job's processes if there are several; returns the number of processes.

    Arguments left None are read from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, then from the detected cluster. timeout_s bounds the wait for the
    coordinator and the other processes.
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    count = _int(
        num_processes if num_processes is not None else os.environ.get(ENV_COUNT), ENV_COUNT
    )
    pid = _int(process_id if process_id is not None else os.environ.get(ENV_ID), ENV_ID)
    explicit = address is not None or count is not None or pid is not None
    if explicit:
        missing = [
            n for n, v in ((ENV_ADDRESS, address), (ENV_COUNT, count), (ENV_ID, pid)) if v is None
        ]
        if missing:
            raise DistributedError(
                "an explicit multi-process launch needs the coordinator address, the number of "
                f"processes and this process's id; missing: {', '.join(missing)}"
            )
        if count < 1 or not 0 <= pid < count:
            raise DistributedError(f"process id {pid} is not in [0, {count}) processes")
        if count == 1:
            return 1
        how = f"coordinator {address}"
    else:
        cluster = detect_cluster()
        if cluster is None or cluster[1] <= 1:
            return 1
        how = f"the {cluster[0]} cluster environment"
        count = cluster[1]
    # JAX aborts the whole process (a C++ check failure, no exception) when the processes cannot
    # meet in time; this watchdog fires first, prints one line and exits with status 1.
    if explicit and pid != 0:
        waiting = f"cannot reach the coordinator {address} within {timeout_s} s"
    else:
        waiting = f"the {count} processes did not all join through {how} within {timeout_s} s"
    joined = _watchdog(timeout_s, f"{waiting} (is every process started, with the same address?)")
    kwargs = dict(initialization_timeout=int(timeout_s) + 60)
    if explicit:
        kwargs.update(coordinator_address=address, num_processes=count, process_id=pid)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to join is one error for the user
        raise DistributedError(
            f"this job has {count} processes but joining them through {how} failed: "
            f"{one_line(e, 300)}"
        ) from None
    finally:
        joined.set()
    if jax.process_count() != count:
        raise DistributedError(
            f"expected {count} processes, jax.distributed sees {jax.process_count()}"
        )
    logger.info("joined %d processes through %s", count, how)
    return count


def check_same_on_all_processes(value: str, what: str) -> None:
    """Raises DistributedError on every process when the processes disagree on `value`."""
    if jax.process_count() == 1:
        return
    import hashlib

    digests = all_gather(hashlib.sha256(value.encode()).hexdigest())
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(
            f"the processes disagree on the {what}: process(es) {differ} differ from process 0 "
            "(launch every process with the same command)"
        )


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches `name` (no-op with one process).

    Uses the coordination service's barrier (no device collective), so processes that arrive
    far apart (one still compiling or reading data) do not trip a collective's connect timeout.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _distributed

    client = _distributed.global_state.client
    if client is None:  # joined by the TPU runtime alone: a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    _barrier_counts[name] = count = _barrier_counts.get(name, 0) + 1
    client.wait_at_barrier(f"sam_jax:{name}:{count}", timeout_in_ms=int(timeout_s * 1000))


_barrier_counts: dict[str, int] = {}


def is_main_process() -> bool:
    return jax.process_index() == 0


def all_gather(obj):
    """[obj of process 0, obj of process 1, ...]: any picklable object, from every process."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    import numpy as np
    from jax.experimental import multihost_utils

    barrier("all_gather")  # arrive together: a device collective has a short connect timeout
    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [
        pickle.loads(row[: int(n)].tobytes())
        for row, n in zip(rows, sizes.reshape(-1), strict=True)
    ]
