"""scripts/gpu_check.sh end to end on the CPU at toy sizes (no GPU here): it must write its JSON
with every figure present, and say when no CUDA device is visible."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def test_tiny_cpu_run_writes_every_figure(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([str(SCRIPT), str(out), "--device", "cpu", "--tiny", "--runs", "1", "--batch-sizes", "1", "2"],
                          capture_output=True, text=True, timeout=300)
    data = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:], data.get("errors"))
    assert not data["errors"]
    (scan,) = data["scan"].values()
    # the CPU's fast path (compiled loop or parallel scan) against the float64 reference loop
    assert scan["reference"].startswith("selective_scan_ref")
    assert scan["finite"] and scan["max_abs_err"] > 0 and scan["max_rel_err"] < 1e-5
    keys = set(data["latency"])
    assert keys == {f"{m}@128-bs{b}" for m in ("dit-tiny/2", "lamamba-tiny") for b in (1, 2)}
    assert all(v["ms_median"] > 0 and v["dtype"] == "bfloat16" for v in data["latency"].values())


def test_says_so_without_cuda(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    proc = subprocess.run([str(SCRIPT), str(tmp_path / "g.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
