"""The load-time cost of checkpoint verification (sam_jax.checkpoints.manifest) for vit_h.

Builds a vit_h-sized params tree of random float32 arrays (the shapes of
sam_jax.checkpoints.mapping.expected_leaves), saves it as a converted checkpoint in a temporary
folder, and times `load_converted` with verification (the defaults: file checksums, array
checksums) and without (verify=False): best of --repeats runs
each, alternating, after one warm-up load; and the time spent in each check during the verified
loads (robust where the load time itself varies with the machine's other work). Prints a table
and writes JSON.

  python benchmarks/checkpoint_verify.py                     # vit_h, 3 runs each
  python benchmarks/checkpoint_verify.py --model vit_b --repeats 5 --dir /mnt/disk

The checkpoint was just written, so its files are in the page cache for every run (warm): the
checksum pass then costs its CRC computation, not disk reads. From a cold disk both loads read
the files once from the disk (the checksum pass leaves them cached for orbax's read).
Memory: the checkpoint is written by a child process (orbax's save peaks at about 3x the
params: 7.5 GB for vit_h); the timing process then peaks at about 2.5x the params.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from host_info import describe  # this folder, on sys.path when run as a script

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def random_params(model: str, seed: int = 0):
    from flax import traverse_util

    from sam_jax.checkpoints.mapping import expected_leaves
    from sam_jax.config import get_config

    config = get_config(model)
    rng = np.random.default_rng(seed)
    flat = {
        leaf.flax_path: rng.standard_normal(leaf.flax_shape, dtype=np.float32)
        for leaf in expected_leaves(config).values()
    }
    return config, traverse_util.unflatten_dict(flat)


def _best(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times), times


def _save(model: str, path: str) -> None:
    """Writes the random checkpoint and, beside it, save.json (its size and save time)."""
    from flax import traverse_util

    from sam_jax.checkpoints import save_converted

    timer = _PhaseTimer({"file_entries": "file_checksums", "array_entries": "array_checksums"})
    config, params = random_params(model)
    nbytes = sum(x.nbytes for x in traverse_util.flatten_dict(params).values())
    t = time.perf_counter()
    save_converted(path, config, params)
    save_s = time.perf_counter() - t
    with open(os.path.join(os.path.dirname(path), "save.json"), "w") as f:
        json.dump({"params_bytes": nbytes, "save_s": save_s, "manifest_s": timer.take()}, f)


# The manifest functions that load_converted calls to verify, and the names of their phases.
LOAD_PHASES = {
    "read": "manifest",
    "verify_files": "file_checksums",
    "differing_arrays": "array_checksums",
    "nonfinite_arrays": "finiteness",
}


class _PhaseTimer:
    """Accumulates the seconds spent in functions of sam_jax.checkpoints.manifest ({function
    name: phase name}), wrapped for the rest of the process."""

    def __init__(self, phases: dict[str, str]):
        from sam_jax.checkpoints import manifest

        self.seconds = dict.fromkeys(phases.values(), 0.0)
        for name, phase in phases.items():
            setattr(manifest, name, self._wrap(getattr(manifest, name), phase))

    def _wrap(self, fn, phase):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t

        return timed

    def take(self) -> dict:
        out, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_h")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (a temp dir)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "checkpoint_verify_cpu.json"))
    ap.add_argument("--save-only", default=None, help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args()
    if args.save_only:
        _save(args.model, args.save_only)
        return

    from sam_jax.checkpoints import load_converted, manifest

    result: dict = {"machine": describe(), "args": vars(args)}
    root = tempfile.mkdtemp(prefix="sam_jax_verify_", dir=args.dir)
    try:
        path = os.path.join(root, "ckpt")
        argv = [sys.executable, os.path.abspath(__file__), "--model", args.model]
        subprocess.run([*argv, "--save-only", path], check=True)
        with open(os.path.join(root, "save.json")) as f:
            saved = json.load(f)
        nbytes, save_s = saved["params_bytes"], saved["save_s"]
        save_manifest_s = sum(saved["manifest_s"].values())
        doc = manifest.read(path)
        files_bytes = sum(e["size"] for e in doc["files"].values())
        result["checkpoint"] = {
            "model": args.model,
            "params_gb": nbytes / 1e9,
            "files": len(doc["files"]),
            "files_gb": files_bytes / 1e9,
            "largest_file_gb": max(e["size"] for e in doc["files"].values()) / 1e9,
            "arrays": len(doc["arrays"]),
            "checksum": manifest.DEFAULT_ALGORITHM,
            "save_s": save_s,
            "save_manifest_s": save_manifest_s,
        }

        # One load to warm up (imports, orbax's first use), then the two loads alternately so
        # that both see the same machine state.
        _best(lambda: load_converted(path, verify=False), 1)
        timer = _PhaseTimer(LOAD_PHASES)
        plain, verified, phases = [], [], []
        for _ in range(args.repeats):
            plain.append(_best(lambda: load_converted(path, verify=False), 1)[0])
            timer.take()
            verified.append(_best(lambda: load_converted(path), 1)[0])
            phases.append(timer.take())
        best = min(range(args.repeats), key=lambda i: sum(phases[i].values()))
        result["checks_s"] = {**phases[best], "total": sum(phases[best].values())}
        result["checks_s_runs"] = phases
        result["load_s"] = {
            "without_verification": min(plain),
            "with_verification": min(verified),
            "runs_without": plain,
            "runs_with": verified,
        }
        extra = min(verified) - min(plain)
        checks = result["checks_s"]["total"]
        result["overhead"] = {
            "end_to_end_s": extra,
            "end_to_end_fraction": extra / min(plain),
            "checks_s": checks,
            "checks_fraction": checks / min(plain),
        }
        result["machine"]["load_avg_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    c, m, ld, ch = result["checkpoint"], result["machine"], result["load_s"], result["checks_s"]
    print(f"{m['cpu_model']}, {m['cores']} cores, load average at start {m['load_avg_at_start']}")
    print(
        f"{c['model']}: {c['params_gb']:.2f} GB of params in {c['files']} files "
        f"({c['files_gb']:.2f} GB, largest {c['largest_file_gb']:.2f} GB), {c['arrays']} arrays; "
        f"checksum {c['checksum']}; saved in {c['save_s']:.1f} s, of which "
        f"{c['save_manifest_s']:.2f} s for the manifest's checksums"
    )
    print(f"{f'load_converted (best of {args.repeats})':40s} {'seconds':>8s}")
    print(f"{'  verify=False':40s} {ld['without_verification']:8.2f}")
    print(f"{'  default (verified)':40s} {ld['with_verification']:8.2f}")
    o = result["overhead"]
    print(f"{'  difference':40s} {extra:8.2f}  ({100 * o['end_to_end_fraction']:.0f}%)")
    print("time in the checks during the verified loads (the run with the least)")
    for name, seconds in ch.items():
        print(f"{'  ' + name:40s} {seconds:8.2f}")
    print(f"{'  = of the unverified load':40s} {100 * o['checks_fraction']:7.0f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
