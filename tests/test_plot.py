"""Pareto and scaling plots from records on disk."""
from __future__ import annotations

import pytest

from harness import UserError
from harness.cli import main
from harness.plot import overlapping, pareto_figure, pareto_front, pareto_plot, scaling_plot, tokens_of
from harness.plot import _pyplot as matplotlib_pyplot
from harness.records import load_records
from harness.table import short_labels

from test_leaderboard import write_default_suite, write_results


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


def _label_overlaps(fig) -> list[tuple[str, str]]:
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    return [(ax.texts[i].get_text(), ax.texts[j].get_text()) for i, j in overlapping(ax.texts, renderer)]


def test_pareto_labels_never_overlap(tmp_path):
    """The default suite's cells: ss2d and the LaMamba mixer sit almost on one point, so labels
    written at their points collide; placed by the plot, no two label boxes intersect."""
    records = load_records(write_default_suite(tmp_path / "results"))
    fig, plotted, front = pareto_figure(records, "gflops", "val_loss")
    texts = fig.axes[0].texts
    assert sorted(t.get_text() for t in texts) == sorted(short_labels(records))
    assert _label_overlaps(fig) == []
    fig.canvas.draw()
    inside = fig.axes[0].get_window_extent()  # and every label stays on the axes
    assert all(inside.contains(*t.get_window_extent().min) and inside.contains(*t.get_window_extent().max)
               for t in texts)
    # the case this is about: the same labels written beside their points, as before, do collide
    plt = matplotlib_pyplot()
    fig2, ax2 = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    points = {lab: (r["metrics"]["gflops"]["value"], r["metrics"]["val_loss"]["value"])
              for lab, r in zip(short_labels(records), records)}
    ax2.plot(*zip(*points.values()), "o")
    naive = [ax2.annotate(lab, xy, textcoords="offset points", xytext=(4, 4), fontsize=7) for lab, xy in points.items()]
    assert overlapping(naive, fig2.canvas.get_renderer())
    plt.close(fig)
    plt.close(fig2)


def test_points_on_top_of_each_other_are_named_in_a_legend(tmp_path):
    """Two cells with the same figures leave no free place for two labels: a legend names them."""
    records = load_records(write_default_suite(tmp_path / "results"))
    for r in records[1:3]:
        r["metrics"]["gflops"]["value"], r["metrics"]["val_loss"]["value"] = 0.02, 0.18
    fig, _, _ = pareto_figure(records, "gflops", "val_loss")
    assert _label_overlaps(fig) == []
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert all(any(t.startswith(lab) for t in legend) for lab in short_labels(records))
    matplotlib_pyplot().close(fig)


def test_published_view_marks_the_papers_figures_beside_ours(tmp_path, capsys):
    """`harness plot --published`: a hollow mark at each published figure (the coordinate the
    paper does not give is ours), joined to our point; without any published figure, one line."""
    from harness import published

    results = write_default_suite(tmp_path / "results")
    records = load_records(results)
    spec = published.PublishedSpec.model_validate({"source": "a paper, Table 1", "val_loss": 0.17, "gflops": 0.03})
    published.annotate(records[-1]["metrics"], spec)  # the LaMamba U-Net: both figures
    published.annotate(records[0]["metrics"], published.PublishedSpec.model_validate(
        {"source": "another", "val_loss": 0.2}))     # attention: the paper gives val_loss only
    from harness.plot import published_points

    assert published_points(records, "gflops", "val_loss") == {
        len(records) - 1: (0.03, 0.17), 0: (records[0]["metrics"]["gflops"]["value"], 0.2)}
    fig, _, _ = pareto_figure(records, "gflops", "val_loss", published=True)
    ax = fig.axes[0]
    marks = [line for line in ax.lines if line.get_marker() == "D"]
    assert sorted((float(m.get_xdata()[0]), float(m.get_ydata()[0])) for m in marks) == sorted(
        published_points(records, "gflops", "val_loss").values())
    assert _label_overlaps(fig) == [] and any("published" in t.get_text() for t in ax.get_legend().get_texts())
    matplotlib_pyplot().close(fig)
    with pytest.raises(UserError, match="--published: no ok record has a published figure for 'params'"):
        pareto_figure(records, "params", "latency", published=True)
    for r in records:  # the CLI reads the annotated records back
        from harness.records import write_record

        write_record(r["_path"], {k: v for k, v in r.items() if k != "_path"})
    assert main(["plot", str(results), "--published"]) == 0
    assert (results / "plots" / "pareto-gflops-val_loss-published.png").is_file()
    assert main(["plot", str(results), "--published", "--scaling"]) == 2
    assert "does not go with --scaling" in capsys.readouterr().err
