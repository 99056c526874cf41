"""Benchmarks stay runnable: their quick modes write their JSON and markdown (figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scan_bench_quick(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/scan.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "scan.json").read_text())
    assert (tmp_path / "scan.md").read_text().strip()


def test_backbone_bench_quick(tmp_path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench/backbones.py"), "--quick", "--names", "ssm_tiny,rs4d_s",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "backbones.json").read_text())
    assert [r["backbone"] for r in rows] == ["ssm_tiny", "rs4d_s"]
    assert all(r["params_m"] > 0 and r["gflops_512"] > r["scan_gflops_512"] > 0 for r in rows)
