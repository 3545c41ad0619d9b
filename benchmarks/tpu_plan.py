"""TPU plans without a TPU: the train step of each SA-1B config compiled by libtpu for the pod
slice it targets, and the inference programs for one v5e and one v6e chip.

    python benchmarks/tpu_plan.py                      # every case (hours on a 2-core host)
    python benchmarks/tpu_plan.py --cases vit_b_v5e_4  # some cases
    python benchmarks/tpu_plan.py --list

Each case is compiled in its own process (libtpu's compile of a ViT-H step holds several GiB)
and its plan is merged into benchmarks/results/tpu_plan.json as soon as it is done, with the
libtpu and jax versions, the date and the host that compiled it (`compile_plan.environment`).
"baseline" cases compile the train step of an older commit of sam_jax (default: 64ce641, the
code of issue 29) the same way, for before/after comparisons: counted by the same HLO analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "tpu_plan.json")
BASELINE_COMMIT = "64ce641"

# name: (kind, arguments). train: (config, topology, {override: value}).
CASES = {
    # The measurements: vit_b, 1 image per chip on v5e 2x2, mesh (1, 4).
    "vit_b_v5e_4": (
        "train",
        ("sam_vit_b_sa1b", "v5e:2x2", {"batch_size": 4, "mesh_shape": (1, 4)}),
    ),
    # The recipes on the slices they target, one image per chip.
    "vit_b_v5e_128": ("train", ("sam_vit_b_sa1b", "v5e:8x16", {})),
    "vit_l_v5e_128": ("train", ("sam_vit_l_sa1b", "v5e:8x16", {})),
    "vit_h_v5e_256": ("train", ("sam_vit_h_sa1b", "v5e:16x16", {})),
    "vit_h_v4_256": ("train", ("sam_vit_h_sa1b", "v4:4x8x8", {})),
    "vit_h_v6e_256": ("train", ("sam_vit_h_sa1b", "v6e:16x16", {})),
    # vit_h's per-chip program on 8 chips: the recipe's mesh (-1, 8) at (1, 8), 1 image per chip
    # (what each chip of vit_h_v5e_256 runs, but the gradients' all-reduce over 32 data rows).
    "vit_h_v5e_8": (
        "train",
        ("sam_vit_h_sa1b", "v5e:2x4", {"batch_size": 8, "mesh_shape": (1, 8)}),
    ),
    # Per-chip memory at 4 and 16 chips (the growth measurement: 16 masks, 2 rounds).
    "growth_v5e_4": (
        "train",
        (
            "sam_vit_b_sa1b",
            "v5e:2x2",
            {"batch_size": 4, "mesh_shape": (4, 1), "data.max_masks": 16, "train.num_rounds": 2},
        ),
    ),
    "growth_v5e_16": (
        "train",
        (
            "sam_vit_b_sa1b",
            "v5e:4x4",
            {"batch_size": 16, "mesh_shape": (16, 1), "data.max_masks": 16, "train.num_rounds": 2},
        ),
    ),
}
for _chip in ("v5e", "v6e"):
    for _model in ("vit_b", "vit_h"):
        for _what, _counts in (("encoder", (1, 8)), ("amg", (1,))):
            for _n in _counts:
                CASES[f"{_model}_{_what}{_n if _what == 'encoder' else ''}_{_chip}"] = (
                    "inference",
                    (_model, _what, f"{_chip}:1x1", _n),
                )
    for _n in (1, 64, 1024):
        CASES[f"decoder_p{_n}_{_chip}"] = ("inference", ("vit_h", "decoder", f"{_chip}:1x1", _n))
for _name in ("vit_b_v5e_4", "growth_v5e_4", "growth_v5e_16"):
    CASES[f"baseline_{_name}"] = ("baseline", CASES[_name][1])


def _config(name: str, overrides: dict):
    from sam_jax.cli import config_overrides

    config = config_overrides.load_config(name)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def run_case(name: str) -> dict:
    """Compiles one case in this process and returns its plan as JSON."""
    from sam_jax.training import compile_plan

    kind, args = CASES[name]
    if kind == "train":
        config_name, topology, overrides = args
        plan = compile_plan.train_plan(_config(config_name, overrides), topology)
        extra = {"config": config_name, "overrides": {k: str(v) for k, v in overrides.items()}}
    elif kind == "inference":
        plan = compile_plan.inference_plan(*args)
        extra = {"model": args[0], "program": args[1], "count": args[3]}
    else:
        plan = _baseline(*args)
        extra = {"config": args[0], "commit": BASELINE_COMMIT}
    return {"name": name, "kind": kind, **extra, **plan.to_json()}


_BASELINE_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, {configs!r})
from sam_jax.modeling import build_sam
from sam_jax.training import initialization, sharding
from sam_jax.training.optimizer import make_optimizer
from sam_jax.training.train_state import create_train_state
from sam_jax.training.train_step import make_train_step
from sam_jax.training.train_loop import remat_policy
import importlib
config = importlib.import_module({config!r}).get_config()
config.init.type = "random"
for key, value in {overrides!r}.items():
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value
devices = topologies.get_topology_desc({topology!r}, "tpu").devices
mesh = sharding.make_mesh(config.mesh_shape, devices)
sam_config = initialization.sam_config_from(config)
model = build_sam(sam_config, config.dtype, config.attention_impl, remat_policy(config))
param_shapes = model.param_shapes()
tx = make_optimizer(config, param_shapes, sam_config.encoder_depth, {{}})
abstract = jax.eval_shape(lambda p: create_train_state(p, tx, config.seed, {{}}), param_shapes)
rules = [tuple(r) for r in config.sharding_rules]
shardings = sharding.tree_shardings(mesh, abstract, rules, config.min_fsdp_size)
def spec(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
state = jax.tree.map(spec, abstract, shardings)
b, s, m = config.batch_size, sam_config.image_size, sam_config.low_res_size
n = config.data.max_masks
shapes = {{"image": ((b, s, s, 3), jnp.uint8), "image_hw": ((b, 2), jnp.int32),
          "masks": ((b, n, m, m), jnp.uint8), "mask_valid": ((b, n), bool),
          "index": ((b,), jnp.int32)}}
batch = {{k: jax.ShapeDtypeStruct(sh, dt, sharding=sharding.batch_sharding(mesh, len(sh)))
         for k, (sh, dt) in shapes.items()}}
step = make_train_step(model, tx, config, param_shapes)
jitted = jax.jit(step, out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
out = {{"batch_size": b, "chips": len(devices), "mesh": dict(mesh.shape)}}
try:
    compiled = jitted.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    kinds = ("argument", "output", "alias", "temp")
    out["memory"] = {{k: getattr(ma, k + "_size_in_bytes") for k in kinds}}
    cost = compiled.cost_analysis()
    out["xla_flops"], out["xla_bytes"] = cost["flops"], cost["bytes accessed"]
    open({hlo!r}, "w").write(compiled.as_text())
except Exception as e:
    out["refused"] = " ".join(str(e).split())[:500]
json.dump(out, open({result!r}, "w"))
"""


def _baseline(config_name: str, topology: str, overrides: dict):
    """The train step of BASELINE_COMMIT compiled for the slice (in a child process importing
    that commit's sam_jax), counted by this commit's HLO analysis."""
    from sam_jax.training import compile_plan, hlo_traffic

    chip = compile_plan.parse_topology(topology)[0]
    with tempfile.TemporaryDirectory() as tmp:
        tree = subprocess.run(
            ["git", "-C", REPO, "archive", BASELINE_COMMIT, "sam_jax", "configs"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "x", "-C", tmp], input=tree, check=True)
        hlo, result = os.path.join(tmp, "step.hlo"), os.path.join(tmp, "result.json")
        script = _BASELINE_SCRIPT.format(
            configs=os.path.join(tmp, "configs"),
            config=config_name,
            overrides=overrides,
            topology=compile_plan.parse_topology(topology)[1],
            hlo=hlo,
            result=result,
        )
        env = {**os.environ, "PYTHONPATH": tmp, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp)
        compile_s = time.perf_counter() - t0
        out = json.load(open(result))
        traffic = hlo_traffic.analyze(open(hlo).read()) if os.path.exists(hlo) else None
    memory = {k: float(v) for k, v in out.get("memory", {}).items()} or {
        "argument": 0.0,
        "output": 0.0,
        "alias": 0.0,
        "temp": float("nan"),
    }
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return compile_plan.Plan(
        what=f"train ({BASELINE_COMMIT})",
        topology=topology,
        num_slices=1,
        chips=out["chips"],
        chip=chip,
        mesh=out["mesh"],
        images_per_step=float(out["batch_size"]),
        memory=memory,
        fits="refused" not in out
        and memory["total"] <= (1 - compile_plan.HBM_HEADROOM) * chip.hbm_bytes,
        largest_buffers=[],
        flops=traffic.flops if traffic else float("nan"),
        bytes=traffic.bytes if traffic else float("nan"),
        hbm_bytes=traffic.hbm_bytes if traffic else float("nan"),
        xla_flops=float(out.get("xla_flops", float("nan"))),
        xla_bytes=float(out.get("xla_bytes", float("nan"))),
        collective_bytes=traffic.collective_bytes if traffic else float("nan"),
        model_flops=None,
        compile_s=compile_s,
        top_ops=traffic.top(12) if traffic else [],
        notes=[out["refused"]] if "refused" in out else [],
    )


_DEMO_SCRIPT = """
import importlib.util, json, os
spec = importlib.util.spec_from_file_location("demo", {config!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
c = module.get_config()
c.total_steps, c.log_every_steps, c.checkpoint.every_steps = {steps}, 1, {steps}
c.checkpoint.async_save, c.eval.dataset, c.progress_bar = False, "", False
from sam_jax.training.train_loop import train_and_evaluate
train_and_evaluate(c, {workdir!r})
rows = [json.loads(x) for x in open(os.path.join({workdir!r}, "metrics.jsonl"))]
print("LOSSES " + json.dumps([r["loss"] for r in rows if "loss" in r]))
"""


def demo_losses(steps: int) -> dict:
    """The training losses of BASELINE_COMMIT's configs/demo.py (the tiny SAM from scratch on
    synthetic data, float32 on the CPU) over `steps` steps, run with that commit's code and with
    this checkout's: the CPU path of the train step is unchanged, so they agree to float
    tolerance."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = subprocess.run(
            ["git", "-C", REPO, "archive", BASELINE_COMMIT, "sam_jax", "configs"],
            check=True,
            capture_output=True,
        ).stdout
        old = os.path.join(tmp, "old")
        os.makedirs(old)
        subprocess.run(["tar", "x", "-C", old], input=tree, check=True)
        config = os.path.join(old, "configs", "demo.py")
        for name, path in (("old", old), ("new", REPO)):
            workdir = os.path.join(tmp, f"work_{name}")
            script = _DEMO_SCRIPT.format(config=config, steps=steps, workdir=workdir)
            env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run(
                [sys.executable, "-c", script], env=env, cwd=tmp, capture_output=True, text=True
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("LOSSES ")]
            if proc.returncode or not lines:
                raise RuntimeError(f"demo run ({name}) failed: {proc.stderr[-2000:]}")
            out[name] = json.loads(lines[-1][len("LOSSES ") :])
    diff = max(abs(a - b) for a, b in zip(out["old"], out["new"], strict=True))
    return {"commit": BASELINE_COMMIT, "steps": steps, **out, "max_abs_diff": diff}


def merge(path: str, record: dict) -> None:
    """Adds (or replaces) one case in the results JSON, with the environment."""
    from sam_jax.training import compile_plan

    data = {"environment": compile_plan.environment(), "cases": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["cases"][record["name"]] = {**record, "environment": compile_plan.environment()}
    data["environment"] = compile_plan.environment()
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--out", default=RESULTS, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--demo-losses",
        type=int,
        metavar="STEPS",
        help=f"compare the demo config's losses with those of {BASELINE_COMMIT}'s code and exit",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one case to stdout
    args = parser.parse_args(argv)
    if args.demo_losses:
        result = demo_losses(args.demo_losses)
        merge(args.out, {"name": "demo_losses", "kind": "check", **result})
        print(json.dumps(result))
        return 0 if result["max_abs_diff"] <= 1e-5 else 1
    if args.list:
        for name, (kind, case) in CASES.items():
            print(f"{name:28s} {kind:10s} {case}")
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_case(args.one), default=str), flush=True)
        return 0
    names = [n for n in args.cases.split(",") if n] or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown} (see --list)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1"}
    for name in names:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed ({proc.returncode}): {proc.stderr.strip()[-500:]}", flush=True)
            continue
        record = json.loads(lines[-1][len("RESULT ") :])
        merge(args.out, record)
        print(
            f"{name}: {record['memory']['total'] / 2**30:.2f} GiB/chip fits={record['fits']} "
            f"{record['flops_per_image'] / 1e12:.2f} TFLOP/img "
            f"{record['hbm_bytes_per_image'] / 1e9:.1f} GB HBM/img "
            f"{record['images_per_s_per_chip']:.2f} img/s/chip ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
