"""The machine a benchmark ran on, as every script in benchmarks/ records it in its JSON."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """Vendor, family, model and stepping (/proc/cpuinfo): names the microarchitecture where a
    hypervisor shortens the model name (a family 25, model 1 "AMD EPYC" is a Zen 3 Milan)."""
    keys = {"vendor_id": "", "cpu family": "family ", "model": "model ", "stepping": "stepping "}
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = keys[key] + value.strip()
                if not line.strip():
                    break
    except OSError:
        pass
    return ", ".join(found[k] for k in keys if k in found) or platform.machine()


# The CPU features that decide matmul speed (SIMD widths, bf16 / int8 dot products, AMX tiles).
_SIMD = ("sse4_2", "fma", "f16c", "avx", "amx", "neon", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The SIMD / matrix flags of the CPU (/proc/cpuinfo `flags` or `Features`), sorted."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].split()
                    return sorted(x for x in set(flags) if x.startswith(_SIMD))
    except OSError:
        pass
    return []


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe(load_avg_at_start: tuple[float, float, float] | None = None, **extra) -> dict:
    """{cpu_model, cpu_id, cpu_flags, cores, usable_cores, date, load_avg_at_start, python, numpy,
    **extra}; pass the load average taken before the timed work (default: now)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_at_start": load_avg_at_start
        if load_avg_at_start is not None
        else os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }
