"""The public API (``harness.__all__``) and the component contracts checked at load: a
plugin's mistake is one line naming the plugin, the component and what is missing, before
any cell trains."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import BaseModel

import harness
from harness.cli import main
from harness.plugins import registry


def test_every_public_name_resolves():
    for name in harness.__all__:
        assert getattr(harness, name) is not None, name
    assert set(harness.__all__) <= set(dir(harness))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        harness.nope  # noqa: B018


def test_import_harness_imports_no_torch():
    code = "import sys, harness; harness.UserError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


class Spec(BaseModel):
    model_config = {"extra": "forbid"}


class GoodMetric(harness.Metric):
    direction = "higher"

    def __call__(self, ctx):
        return 1.0


class NoDirection:
    def __call__(self, ctx):
        return 1.0


class FeaturesUnsaid(harness.Loss):
    def terms(self, student_feats, teacher_feats):
        return {}

    def __call__(self, *args):
        return torch.zeros(())


class NoScore:
    pass


def no_direction_function():
    """A metric built by a function: checked when built."""
    return NoDirection()


BROKEN = {
    "harness_metrics": {"broken-metric": NoDirection, "late-metric": no_direction_function},
    "harness_distill_losses": {"broken-loss": FeaturesUnsaid},
    "harness_pruning_criteria": {"broken-criterion": NoScore},
}


class Broken:
    @harness.hookimpl
    def harness_metrics(self):
        return BROKEN["harness_metrics"]

    @harness.hookimpl
    def harness_distill_losses(self):
        return BROKEN["harness_distill_losses"]

    @harness.hookimpl
    def harness_pruning_criteria(self):
        return BROKEN["harness_pruning_criteria"]


@pytest.fixture
def broken():
    plugin = Broken()
    registry().register(plugin, name="broken")
    yield plugin
    registry().unregister(plugin)


@pytest.mark.parametrize("kind, name, missing", [
    ("metric", "broken-metric", "declares no direction"),
    ("loss", "broken-loss", "does not set needs_features = True"),
    ("criterion", "broken-criterion", "has no score(model, units, ctx) method"),
])
def test_a_component_that_breaks_its_contract_is_refused_in_one_line(broken, kind, name, missing):
    with pytest.raises(harness.PluginError) as info:
        harness.create(kind, name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"plugin 'broken': {kind} {name!r}") and missing in message


def test_what_only_the_built_object_shows_is_checked_when_built(broken):
    with pytest.raises(harness.PluginError, match="plugin 'broken': metric 'late-metric': the object its factory "
                                                  "built .* declares no direction"):
        harness.create("metric", "late-metric")


SUITE = """\
suite: contract
seed: 0
base:
  backbone: {name: dit, size: tiny, input_size: 8, depth: 2}
  data: {name: shapes, resolution: 8, size: 16}
  train: {steps: 2, batch_size: 4}
  metrics: [params]
  device: cpu
"""


@pytest.mark.parametrize("edit, missing", [
    ("  metrics: [params, broken-metric]\n", "metric 'broken-metric' (NoDirection) declares no direction"),
    ("  distill: [broken-loss]\n", "loss 'broken-loss' (FeaturesUnsaid) defines terms()"),
    ("  prune: {criterion: broken-criterion, ratio: 0.3}\n", "criterion 'broken-criterion' (NoScore) has no score"),
])
def test_a_suite_using_a_broken_component_is_refused_before_training(broken, tmp_path, capsys, edit, missing):
    path = tmp_path / "s.yaml"
    path.write_text(SUITE.replace("  metrics: [params]\n", "  metrics: [params]\n" + edit)
                    if "metrics" not in edit else SUITE.replace("  metrics: [params]\n", edit))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "plugin 'broken'" in err and missing in err
    assert not list(results.rglob("*.json")) and not list(results.rglob("*.safetensors"))  # nothing ran


def test_a_stage_with_a_schema_that_is_not_a_model_is_refused():
    class BadStage:
        @harness.hookimpl
        def harness_stages(self):
            return {"bad": harness.Stage(schema=dict, run=lambda ctx, spec: None)}

    plugin = BadStage()
    registry().register(plugin, name="bad-stage")
    try:
        with pytest.raises(harness.PluginError, match="plugin 'bad-stage': stage 'bad': schema must be a pydantic"):
            registry().stages()
    finally:
        registry().unregister(plugin)


def test_the_built_in_components_keep_their_contracts():
    reg = registry()
    for kind in harness.KINDS:
        for name in reg.components(kind):
            reg.get(kind, name)  # raises PluginError for a broken contract
    reg.stages()
    reg.commands()


def test_the_registered_name_is_never_asked_of_the_component(tmp_path):
    """A loss and a metric with no ``name`` attribute: the record keys them by their registered names."""
    class Plain(harness.Loss):
        def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
            return (student_out - teacher_out).pow(2).mean()

    class Nameless:
        @harness.hookimpl
        def harness_distill_losses(self):
            return {"plain-kd": Plain}

        @harness.hookimpl
        def harness_metrics(self):
            return {"always-one": GoodMetric}

    plugin = Nameless()
    registry().register(plugin, name="nameless")
    try:
        path = tmp_path / "s.yaml"
        path.write_text(textwrap.dedent(SUITE).replace("  metrics: [params]\n", "  metrics: [always-one]\n"
                                                       "  distill: {losses: [plain-kd], steps: 1, batch_size: 2}\n"))
        assert main(["run", str(path), "--results", str(tmp_path / "r")]) == 0
        from harness.records import load_records

        (record,) = load_records(tmp_path / "r" / "contract")
        assert record["status"] == "ok", record.get("error")
        assert record["metrics"]["always-one"]["value"] == 1.0
        assert set(record["distill"]["shares"]["losses"]) == {"plain-kd"}
    finally:
        registry().unregister(plugin)
