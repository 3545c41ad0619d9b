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


def describe(load_avg_at_start: tuple[float, float, float] | None = None, **extra) -> dict:
    """{cpu_model, cores, date, load_avg_at_start, python, numpy, **extra}; pass the load average
    taken before the timed work (default: now)."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_at_start": load_avg_at_start
        if load_avg_at_start is not None
        else os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }
