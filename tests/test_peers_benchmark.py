"""benchmarks/peers.py end to end on the CPU at a tiny size: every peer timed, parity passed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("sam_jax", "official", "transformers", "keras_hub")
CASES = ("encoder_b2", "decoder_p4", "amg")


@pytest.mark.slow
def test_peers_benchmark_tiny(tmp_path):
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--model", "tiny"]
    cmd += ["--original-size", "96x128", "--points-per-side", "4", "--cases", ",".join(CASES)]
    cmd += ["--reps", "1", "--dtypes", "float32", "--isolate", "peer", "--peers", ",".join(PEERS)]
    cmd += ["--output", str(out), "--workdir", str(tmp_path / "work")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    check = doc["check"]
    assert check["passed"] and check["reference"] == "official"
    assert set(check["peers"]) == set(PEERS)
    for peer, entry in check["peers"].items():
        for key in ("embeddings", "low_res", "iou"):
            assert entry[key]["rel"] < 1e-4, (peer, key, entry[key])

    rows = {(r["case"], r["peer"]): r for r in doc["results"]}
    assert set(rows) == {(c, p) for c in CASES for p in PEERS}
    for (case, peer), r in rows.items():
        if (case, peer) == ("amg", "keras_hub"):
            assert r["status"] == "n/a"
            continue
        assert r["status"] == "ok", r
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["peak_rss_mib"] > 0
        assert r["ratio"] >= 1
    for case in CASES:
        assert min(rows[case, p].get("ratio", 9) for p in PEERS) == 1
    assert rows["encoder_b2", "sam_jax"]["batch"] == 2
    assert "peak_rss_per_image_mib" in rows["encoder_b2", "official"]
    assert doc["machine"]["cpu_flags"] is not None and doc["versions"]["keras_hub"]
