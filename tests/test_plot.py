"""Pareto and scaling plots from records on disk."""
from __future__ import annotations

import pytest

from harness import UserError
from harness.cli import main
from harness.plot import pareto_front, pareto_plot, scaling_plot, tokens_of
from harness.records import load_records

from test_leaderboard import write_results


@pytest.fixture
def records(tmp_path):
    return load_records(write_results(tmp_path / "results"))


def test_pareto_front_respects_directions():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0)]
    assert pareto_front(pts) == [0, 1, 4, 3]  # (3, 4) is beaten by (2, 3); ties both stay
    # higher y is better: (1, 5) has the lowest x and the highest y, so it beats every other point
    assert pareto_front(pts, x_lower=True, y_lower=False) == [0]
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_pareto_plot_png_and_svg(records, tmp_path):
    png = pareto_plot(records, "gflops", "val_loss", tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = pareto_plot(records, "gflops", "val_loss", tmp_path / "p.svg").read_text()
    # the labels name the varying config value; the broken cell (failed) is not drawn
    for text in ("mamba", "window-attention", "Pareto front", "gflops"):
        assert text in svg
    assert "broken-mixer" not in svg


def test_scaling_plot_counts_tokens_per_mixer(records, tmp_path):
    by_cell = {r["cell"]: r for r in records}
    assert tokens_of(by_cell["mixatt16o"], "gflops") == 16 * 16  # (32 / patch 2)^2
    assert tokens_of(by_cell["scaatt32o"], "gflops") == 32 * 32
    svg = scaling_plot(records, "latency", tmp_path / "s.svg").read_text()
    assert "attention" in svg and "tokens" in svg


def test_cli_plot_errors_suggest_metrics(tmp_path, capsys):
    results = write_results(tmp_path / "results")
    assert main(["plot", str(results), "--x", "gflop", "--y", "val_loss"]) == 2
    assert "--x: unknown metric 'gflop' in these records; did you mean 'gflops'?" in capsys.readouterr().err
    assert main(["plot", str(results), "--scaling", "--y", "latncy"]) == 2
    assert "did you mean 'latency'" in capsys.readouterr().err
    assert main(["plot", str(results), "--out", str(tmp_path / "p.jpg")]) == 2
    assert "expected a file ending in .png" in capsys.readouterr().err
    assert main(["plot", str(results)]) == 0  # defaults: gflops vs val_loss under RESULTS_DIR/plots/
    assert (results / "plots" / "pareto-gflops-val_loss.png").is_file()


def test_metric_without_direction_has_no_front(records, tmp_path):
    for r in records:
        if "val_loss" in r["metrics"]:
            r["metrics"]["val_loss"]["direction"] = None
    with pytest.raises(UserError, match="'val_loss' has no direction"):
        pareto_plot(records, "gflops", "val_loss", tmp_path / "p.png")
