"""examples/harness-int8, a *method* from an outside package: installed as a real distribution,
its stage owns a suite block and runs between the backbone and the metrics."""
from __future__ import annotations

import pytest

from harness.cli import main
from harness.records import load_records

from conftest import REPO, pip_install_target

EXAMPLE = REPO / "examples" / "harness-int8"


@pytest.fixture(scope="module")
def int8_site(tmp_path_factory):
    return pip_install_target(EXAMPLE, tmp_path_factory.mktemp("site-int8"))


@pytest.fixture
def registry(int8_site, with_site):
    return with_site(int8_site)


def test_stage_and_metric_come_from_the_entry_point(registry):
    assert registry.stage_plugin("quantize") == "int8"
    assert registry.get("metric", "weight_bytes").plugin == "int8"
    info = {p.name: p for p in registry.plugins()}["int8"]
    assert (info.distribution, info.version) == ("harness-int8", "0.1.0")
    assert set(info.hooks) == {"harness_stages", "harness_metrics"}


def test_quantised_model_is_measured_next_to_the_unmodified_one(registry, tmp_path):
    results = tmp_path / "results"
    assert main(["run", str(EXAMPLE / "suite.yaml"), "--results", str(results)]) == 0
    records = {("quantize" in r["config"]): r for r in load_records(results / "example-int8")}
    plain, quant = records[False], records[True]
    assert {plain["status"], quant["status"]} == {"ok"}
    q = quant["quantize"]
    assert q["dtype"] == "qint8" and q["linear_layers"] > 0
    # int8 weights take about a quarter of float32's bytes; the convolutions and embeddings stay float
    assert q["bytes_after"] < 0.4 * q["bytes_before"]
    assert quant["metrics"]["weight_bytes"]["bytes"] == q["bytes_after"]
    assert plain["metrics"]["weight_bytes"]["bytes"] == q["bytes_before"]  # same seed, same model before the stage
    assert quant["metrics"]["weight_bytes"]["role"] == "cost"
    # the unquantised model is the teacher: a small, non-zero error; none without the stage
    err = quant["metrics"]["output_loss"]["value"]
    assert 0 < err < 1e-2
    assert plain["metrics"]["output_loss"]["status"] == "unavailable"


def test_block_is_validated_by_the_plugins_schema(registry, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLE / "suite.yaml").read_text().replace("{dtype: qint8}", "{dtype: int4}"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:" in err and "quantize.dtype" in err and "'qint8'" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text((EXAMPLE / "suite.yaml").read_text().replace("{quantize:", "{quantise:"))
    assert main(["validate", str(typo)]) == 2
    assert "quantise: unknown key; did you mean 'quantize'?" in capsys.readouterr().err
