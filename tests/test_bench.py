"""Benchmarks stay runnable: their quick modes write their JSON and markdown (figures are not checked here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scan_bench_quick(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/scan.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "scan.json").read_text())
    assert (tmp_path / "scan.md").read_text().strip()


def test_train_step_bench_runs_every_variant(tmp_path) -> None:
    if not (ROOT.parent / "shared" / "data" / "nwpu_vhr10").is_dir():
        pytest.skip("../shared/data/nwpu_vhr10 is absent")
    r = subprocess.run([sys.executable, str(ROOT / "bench/train_step.py"), "--steps", "2", "--chip-size", "128",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert set(rows) == {"default", "torchvision-roialign", "chunked-scan", "before"}
    assert all(len(v["times_s"]) == 2 and v["min_s"] > 0 for v in rows.values())


def test_outline_latency_bench_quick(tmp_path) -> None:
    if not (ROOT.parent / "shared" / "data" / "nwpu_vhr10").is_dir():
        pytest.skip("../shared/data/nwpu_vhr10 is absent")
    r = subprocess.run([sys.executable, str(ROOT / "bench/outline_latency.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "outline_latency.json").read_text())
    assert record["prompts"] == 8 and all(len(v) == 2 for v in record["seconds"].values())


def test_backbone_bench_quick(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/backbones.py"), "--quick", "--names", "ssm_tiny,heat_tiny",
                        "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "backbones.json").read_text())["rows"]
    assert [(r["backbone"], r["size"]) for r in rows] == [(n, s) for n in ("ssm_tiny", "heat_tiny") for s in (256, 512)]
    assert all(r["status"] == "ok" and r["params_m"] > 0 and r["gflops"] > 0 and r["s_per_mpx"] > 0 for r in rows)
    assert (tmp_path / "backbones.png").stat().st_size > 10_000
    assert "| ssm_tiny |" in (tmp_path / "backbones.md").read_text()


def test_backbone_bench_reports_memory_cap(tmp_path) -> None:
    """A model over the address-space cap is reported as out of memory, and larger tiles are not tried."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/backbones.py"), "--names", "vit_b_global", "--sizes",
                        "2048,4096", "--mem-cap-gb", "6", "--threads", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "backbones.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"].startswith("out of memory"), rows


@pytest.mark.skipif(not (ROOT.parent / "shared/data/nwpu_vhr10").is_dir(), reason="../shared/data not present")
def test_end_to_end_bench_quick(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/end_to_end.py"), "--quick", "--threads", "1", "--out",
                        str(tmp_path), "--data", str(tmp_path / "data"), "--baseline", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "end_to_end.json").read_text())
    openvino = [("default model", "openvino")] if importlib.util.find_spec("openvino") else []
    assert [(e["role"], e["runtime"]) for e in rec["e2e"]] == [
        ("default model", "torch"), ("default model", "onnx"), *openvino, ("peer (untrained weights)", "torch"),
        ("baseline (untrained, no detections: its least time)", "torch")]
    assert rec["e2e"][-1]["objects"] == 0  # zeroed box classifier: a lower bound of a trained baseline's time
    assert rec["e2e"][0]["objects"] == rec["e2e"][1]["objects"]  # the two runtimes find the same
    assert all(e["rc"] == 0 and e["mpx_per_s"] > 0 and e["peak_rss_mb"] > 100 for e in rec["e2e"] + rec["stream"])
    assert [s["side"] for s in rec["stream"]] == [256, 512]
    assert rec["machine"]["matmul_gflops"] > 0 and rec["machine"]["read"]["warm_mbps"] > 0


@pytest.mark.skipif(not (ROOT.parent / "shared/data/nwpu_vhr10").is_dir(), reason="../shared/data not present")
def test_cluster_bench_quick(tmp_path) -> None:
    pytest.importorskip("distributed")
    r = subprocess.run([sys.executable, str(ROOT / "bench/cluster.py"), "--quick", "--out", str(tmp_path), "--data",
                        str(tmp_path / "data")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "cluster.json").read_text())
    assert [run["run"] for run in rec["runs"]] == ["one process, 2 threads", "local:2"]
    assert all(run["rc"] == 0 and run["mpx_per_s"] > 0 and run["peak_rss_mb"] > 100 for run in rec["runs"])
    assert rec["same_objects"] and len(rec["runs"][1]["worker_peak_rss_mb"]) == 2


def test_end_to_end_repeats_report_the_median_run() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.end_to_end import median_run

    runs = [{"mpx": 4.0, "seconds": s, "rc": 0, "peak_rss_mb": m, "loadavg_1min": 1.0, "mpx_per_s": 4.0 / s}
            for s, m in ((20.0, 900), (10.0, 1000), (16.0, 950))]
    rec = median_run(runs)
    assert rec["seconds"] == 16.0 and rec["mpx_per_s"] == 0.25
    assert rec["runs_s"] == [10.0, 16.0, 20.0] and rec["peak_rss_mb"] == 1000
    failed = {**runs[0], "rc": 1, "error": "boom"}
    assert median_run([runs[0], failed])["error"] == "boom"  # a failed repeat is not hidden by the others


def test_measured_peak_rss_is_the_commands_own() -> None:
    """A command forked from a process holding 400 MB is measured at its own peak, not the benchmark's (Linux
    carries the high-water mark across exec); a timeout kills it; a missing program is rc 127 with its reason."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bench.common import run_measured

    held = np.ones(400 * 2**20 // 8)  # the benchmark's own memory, resident
    small = run_measured([sys.executable, "-c", "print('ok')"], 60)
    assert small["rc"] == 0 and small["stdout"].strip() == "ok" and small["peak_rss_mb"] < 100, small
    big = run_measured([sys.executable, "-c", "import numpy as np; a = np.ones(300 * 2**20 // 8)"], 60)
    assert big["rc"] == 0 and 300 < big["peak_rss_mb"] < 400, big["peak_rss_mb"]
    slow = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert slow["timed_out"] and slow["rc"] != 0 and slow["seconds"] < 10
    missing = run_measured(["/nonexistent/program"], 10)
    assert missing["rc"] == 127 and "No such file" in missing["stderr"]
    assert held.sum() > 0


def test_flops_breakdown_counts_the_hybrids_scans() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/flops.py"), "--model", "ssdd-ship", "--tile-size", "128"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["scans_in_body"] > 0 and rec["body"] > rec["scans_in_body"] and rec["fpn"] > 0
    assert rec["rpn_and_heads"] > 0.1 * rec["fpn"]  # the whole-model count sees the RPN and heads too
