"""scripts/laptop_sensitivity.py on the compression suite's DiT cell at toy budgets."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("laptop_sensitivity", REPO / "scripts" / "laptop_sensitivity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_per_seed_teacher_and_calibration(tmp_path, capsys):
    code = _script().main([str(REPO / "suites" / "compression.yaml"), "--backbone", "dit", "--seeds", "0", "1",
                           "--teacher-steps", "5", "--calibration", "2x2", "4x1", "--eval", "8x2",
                           "--criteria", "laptop", "magnitude",
                           "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "sensitivity.json").read_text())
    assert len(rows) == 2 * 2 * 2
    assert {(r["seed"], r["calibration"]) for r in rows} == {(s, c) for s in (0, 1) for c in ("2x2", "4x1")}
    assert all(r["output_loss"] >= 0 and 0.5 <= r["removed_params"] < 1 for r in rows)
    table = capsys.readouterr().out
    assert "held-out output_loss (8 images x 2 timesteps), dit at 50%" in table and "| 2x2" in table
    # one teacher per (seed, steps): seeds give different teachers, so different losses
    laptop = {r["seed"]: r["output_loss"] for r in rows if r["criterion"] == "laptop" and r["calibration"] == "2x2"}
    assert laptop[0] != laptop[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0-steps5", "seed1-steps5", "sensitivity.json"]


def test_bad_cell_is_a_one_line_error(tmp_path, capsys):
    code = _script().main([str(REPO / "suites" / "compression.yaml"), "--backbone", "dit", "--ratio", "0.4",
                           "--out", str(tmp_path)])
    assert code == 2 and "no prune cell with backbone 'dit' and ratio 0.4" in capsys.readouterr().err
