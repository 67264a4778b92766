"""The core knows no plugin: stages and commands come in through hooks, the core imports no
``harness_*`` package, and what it needs to know about a component it asks the component."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, Field
from torch import nn

import harness
from harness.cli import main
from harness.commands import Command
from harness.errors import PluginError, UserError
from harness.plugins import registry
from harness.records import load_records
from harness.stages import Stage, order

REPO = Path(__file__).resolve().parents[1]


# -- the boundary ---------------------------------------------------------------------------------
def _imports(path: Path):
    """(line, module) of every import in a file, relative imports resolved to their package."""
    package = path.parent.name
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, package if not node.module else f"{package}.{node.module}"
            else:
                yield node.lineno, node.module


def test_core_imports_no_plugin():
    found = [f"{p.relative_to(REPO)}:{line}: {module}"
             for p in sorted((REPO / "harness").rglob("*.py")) for line, module in _imports(p)
             if module.split(".")[0].startswith("harness_")]
    assert not found, "harness/ imports plugin packages:\n" + "\n".join(found)


def test_plugins_use_each_other_only_through_their_package():
    roots = [REPO / "plugins", *(p for p in (REPO / "examples").iterdir() if p.is_dir())]
    found = []
    for root in roots:
        for path in sorted(root.rglob("harness_*/**/*.py")):
            own = path.relative_to(root).parts[0]
            for line, module in _imports(path):
                top, _, rest = module.partition(".")
                if top.startswith("harness_") and top != own and rest:
                    found.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not found, "private imports of another plugin's modules:\n" + "\n".join(found)


# what is not plugin source: build folders pip leaves behind, installed copies
_BUILD = {"build", "dist", ".venv", "__pycache__"}


def _outside_code() -> list[Path]:
    """Every Python file written the way an outside author writes one: the built-in plugins,
    scripts/ and examples/ (build folders left out)."""
    files = []
    for root in ("plugins", "scripts", "examples"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).parts
            if not _BUILD & set(parts) and not any(p.endswith(".egg-info") for p in parts):
                files.append(path)
    return files


def _core_uses(path: Path):
    """(line, what) of every use of the core that is not a name of ``harness.__all__``:
    ``from harness.x import``, ``import harness.x``, ``from harness import <private>``,
    ``harness.<private>`` on the imported module, and a lazy reference into a core module
    (``"harness.x:attr"``, imported on use all the same; ``"harness:name"`` is public)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    public = set(harness.__all__)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("harness."):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.startswith("harness."):
                yield node.lineno, f"from {node.module} import ..."
            elif node.module == "harness":
                for alias in node.names:
                    if alias.name not in public:
                        yield node.lineno, f"from harness import {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "harness":
            if node.attr not in public and not node.attr.startswith("__"):
                yield node.lineno, f"harness.{node.attr}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            module, colon, attr = node.value.partition(":")
            if colon and (module.startswith("harness.") or (module == "harness" and attr not in public)):
                yield node.lineno, f"reference {node.value!r}"


def test_plugins_scripts_and_examples_use_only_the_public_api():
    files = _outside_code()
    assert any("harness-example" in str(p) for p in files) and any(p.parent.name == "scripts" for p in files)
    found = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files for line, what in _core_uses(p)]
    assert not found, "uses of the core outside harness.__all__:\n" + "\n".join(found)


def test_the_public_api_test_sees_a_private_use(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import harness\nfrom harness.training import train_model\nfrom harness import Unit, _LAZY\n"
                   "import harness.flops\nx = harness.plugins.registry()\ny = harness.create\n"
                   "z = {'a': 'harness.flops:sdpa_flop', 'b': 'harness:sdpa_flop', 'c': 'harness:_LAZY'}\n")
    assert sorted(_core_uses(bad)) == [(2, "from harness.training import ..."), (3, "from harness import _LAZY"),
                                     (4, "import harness.flops"), (5, "harness.plugins"),
                                     (7, "reference 'harness.flops:sdpa_flop'"), (7, "reference 'harness:_LAZY'")]


def test_the_boundary_test_sees_an_import(tmp_path):
    (tmp_path / "harness_x").mkdir()
    bad = tmp_path / "harness_x" / "m.py"
    bad.write_text("import os\nfrom harness_dit.models import DiT\nfrom . import y\n")
    assert list(_imports(bad)) == [(1, "os"), (2, "harness_dit.models"), (3, "harness_x")]


# -- stages ---------------------------------------------------------------------------------------
class ScaleSpec(BaseModel):
    model_config = {"extra": "forbid"}
    factor: float = Field(gt=0)


class MarkSpec(BaseModel):
    model_config = {"extra": "forbid"}
    note: str = ""


class StagePlugin:
    """A method plugin: ``scale:`` multiplies the backbone's weights, ``mark:`` runs after it."""

    def __init__(self):
        self.ran: list[str] = []

    def scale(self, ctx, spec):
        self.ran.append("scale")
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.mul_(spec.factor)
        ctx.extra["scale"] = {"factor": spec.factor}

    def mark(self, ctx, spec):
        self.ran.append("mark")
        ctx.extra["mark"] = {"note": spec.note, "after": list(self.ran)}

    @harness.hookimpl
    def harness_stages(self):
        return {"scale": Stage(schema=ScaleSpec, run=self.scale, description="multiply every weight"),
                "mark": Stage(schema=MarkSpec, run=self.mark, after=("scale",))}


SUITE = """\
suite: staged
seed: 0
base:
  backbone: {name: dit, depth: 1, hidden_size: 32, num_heads: 2, patch: 4, input_size: 8}
  metrics: [params]
  device: cpu
include:
  - mark: {note: hello}
    scale: {factor: 2.0}
"""


@pytest.fixture
def stage_plugin():
    plugin = StagePlugin()
    reg = registry()
    reg.register(plugin, name="stage-test")
    yield plugin
    reg.unregister(plugin)


def write(tmp_path, text):
    path = tmp_path / "staged.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_plugin_stage_owns_its_block_runs_in_order_and_keeps_its_record(tmp_path, stage_plugin, capsys):
    results = tmp_path / "results"
    assert main(["run", str(write(tmp_path, SUITE)), "--results", str(results)]) == 0
    plain, staged = load_records(results / "staged")
    assert "scale" not in plain and "mark" not in plain
    assert staged["scale"] == {"factor": 2.0}
    assert staged["mark"] == {"note": "hello", "after": ["scale", "mark"]}  # `after` beats the suite's order
    assert stage_plugin.ran == ["scale", "mark"]
    assert staged["config"]["scale"] == {"factor": 2.0}  # the block stays in the record's config
    assert main(["ls", "stage"]) == 0
    out = capsys.readouterr().out
    assert "scale" in out and "multiply every weight" in out and "prune" in out and "train" in out


def test_a_stage_block_is_validated_with_file_and_line(tmp_path, stage_plugin, capsys):
    bad = SUITE.replace("factor: 2.0", "factor: -1")
    assert main(["validate", str(write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "staged.yaml:9" in err and "scale.factor" in err and "greater than 0" in err
    typo = SUITE.replace("scale: {factor", "scael: {factor")
    assert main(["validate", str(write(tmp_path, typo))]) == 2
    err = capsys.readouterr().err
    assert "scael" in err and "did you mean 'scale'" in err


def test_stage_blocks_are_unknown_keys_without_their_plugin(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, SUITE))]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_order_follows_after_and_replaces_and_refuses_a_cycle():
    class S(BaseModel):
        pass

    def stage(after=(), replaces=(), active=None):
        return Stage(schema=S, run=lambda ctx, spec: None, after=after, replaces=replaces, active=active)

    stages = {"train": stage(active=lambda spec: spec), "prune": stage(after=("train",), replaces=("train",)),
              "distill": stage(after=("train", "prune"), replaces=("train",)), "quantize": stage(after=("train", "prune", "distill"))}
    assert order(stages, {"quantize": 1, "train": True}) == ["train", "quantize"]
    assert order(stages, {"quantize": 1, "distill": 1, "prune": 1, "train": True}) == ["prune", "distill", "quantize"]
    assert order(stages, {"train": False, "quantize": 1}) == ["quantize"]  # a block that asks for no work
    cycle = {"a": stage(after=("b",)), "b": stage(after=("a",))}
    with pytest.raises(PluginError, match="name each other"):
        order(cycle, {"a": 1, "b": 1})


def test_built_in_methods_are_stages_registered_by_their_plugins():
    stages = registry().stages()
    assert {"train", "prune", "distill"} <= set(stages)
    assert registry().stage_plugin("train") == "train"
    assert registry().stage_plugin("prune") == registry().stage_plugin("distill") == "compress"


# -- commands -------------------------------------------------------------------------------------
def test_a_plugin_command_is_listed_and_run(capsys):
    said = []

    class Hello:
        @harness.hookimpl
        def harness_commands(self):
            return {"hello": Command(help="say hello", arguments=lambda p: p.add_argument("--who", default="you"),
                                     run=lambda args: said.append(args.who) or 0)}

    plugin = Hello()
    registry().register(plugin, name="hello-test")
    try:
        assert main(["hello", "--who", "reader"]) == 0 and said == ["reader"]
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        assert "hello" in out and "say hello [hello-test]" in out
        assert "prune" in out and "fid" in out  # the built-in plugins' commands, same path
    finally:
        registry().unregister(plugin)
    with pytest.raises(SystemExit) as gone:  # argparse's own "invalid choice", listing the known ones
        main(["hello"])
    assert gone.value.code == 2


def test_a_command_that_shadows_the_core_is_refused(capsys):
    """Refused in one line, and only that command: the others still answer (issue 23)."""
    class Shadow:
        @harness.hookimpl
        def harness_commands(self):
            return {"run": Command(help="x", arguments=lambda p: None, run=lambda a: 0)}

    plugin = Shadow()
    registry().register(plugin, name="shadow")
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["fid", "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr()
        assert "usage: harness fid" in out.out
        assert out.err == ("harness: warning: plugin 'shadow' declares command 'run', which the harness already has; "
                           "it is not added\n")
    finally:
        registry().unregister(plugin)


# -- what the core asks the component -------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, input_size, in_channels, num_classes, null_class):
        super().__init__()
        self.inputs = (input_size, in_channels, num_classes)
        self.null_class = null_class
        self.conv = nn.Conv2d(in_channels, in_channels, 1)
        self.emb = nn.Embedding(num_classes + 1, in_channels)

    def forward(self, x, t, y=None):
        h = self.conv(x)
        return h if y is None else h + self.emb(y)[:, :, None, None]


class StrictBackbones:
    """Factories written to the published contract: the inputs have no defaults."""

    def __init__(self):
        self.calls: list[dict] = []

    def strict(self, *, input_size, in_channels, num_classes, context_dim=0, null_class=None):
        self.calls.append(dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                               context_dim=context_dim))
        return Tiny(input_size, in_channels, num_classes, null_class)

    @harness.hookimpl
    def harness_backbones(self):
        return {"strict": self.strict}


@pytest.fixture
def strict():
    plugin = StrictBackbones()
    registry().register(plugin, name="strict-test")
    yield plugin
    registry().unregister(plugin)


def test_a_factory_without_defaults_gets_the_documented_inputs_without_a_data_block(tmp_path, strict):
    text = """\
    suite: strict
    base: {backbone: {name: strict}, metrics: [params], device: cpu}
    """
    assert main(["run", str(write(tmp_path, text)), "--results", str(tmp_path / "r")]) == 0
    (rec,) = load_records(tmp_path / "r" / "strict")
    assert rec["status"] == "ok", rec["error"]
    assert strict.calls[-1] == {"input_size": 32, "in_channels": 4, "num_classes": 1000, "context_dim": 0}


TRAIN = """\
suite: strict
base:
  backbone: {name: strict, null_class: NULL}
  data: {name: shapes, resolution: 8, size: 16}
  train: {steps: 2, batch_size: 4, label_dropout: 0.5}
  metrics: [params]
  device: cpu
"""


def test_label_dropout_feeds_the_backbones_own_null_class(tmp_path, strict, monkeypatch):
    seen = []
    forward = Tiny.forward

    def spy(self, x, t, y=None):
        seen.append(y.clone())
        return forward(self, x, t, y)

    monkeypatch.setattr(Tiny, "forward", spy)
    assert main(["run", str(write(tmp_path, TRAIN.replace("NULL", "7"))), "--results", str(tmp_path / "r")]) == 0
    (rec,) = load_records(tmp_path / "r" / "strict")
    assert rec["status"] == "ok", rec["error"]
    labels = torch.cat(seen)
    num_classes = strict.calls[-1]["num_classes"]
    assert (labels == 7).any() and (labels < num_classes).all()  # row 7, not num_classes


def test_label_dropout_without_a_null_class_is_a_clear_error(tmp_path, strict):
    assert main(["run", str(write(tmp_path, TRAIN.replace("NULL", "null"))), "--results", str(tmp_path / "r")]) == 1
    (rec,) = load_records(tmp_path / "r" / "strict")
    assert rec["status"] == "failed" and "declares no null class" in rec["error"]


def test_metric_roles_come_from_the_metric():
    from harness.runner import metric_role

    assert metric_role(harness.create("metric", "params")) == "cost"
    assert metric_role(harness.create("metric", "gflops")) == "cost"
    assert metric_role(harness.create("metric", "val_loss")) == "quality"

    class Odd:
        name, role = "odd", "speed"

    with pytest.raises(TypeError, match="expected 'cost' or 'quality'"):
        metric_role(Odd())


def test_a_null_block_is_no_stage_so_a_matrix_compares_with_and_without(tmp_path, stage_plugin):
    text = SUITE.split("include:")[0] + "matrix:\n  scale: [null, {factor: 3.0}]\n"
    assert main(["run", str(write(tmp_path, text)), "--results", str(tmp_path / "r")]) == 0
    without, with_ = load_records(tmp_path / "r" / "staged")
    assert "scale" not in without and with_["scale"] == {"factor": 3.0}
    assert stage_plugin.ran == ["scale"]


# -- the flops command applies any stage that can apply its result, by the stage's name ------------
def test_flops_applies_a_stage_named_on_the_command_line(tmp_path, capsys):
    import json

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"skip": ["blocks.1"], "drop": []}))
    dit = ["flops", "dit", "--size", "tiny", "--input-size", "8", "--depth", "2", "--json"]
    assert main(dit) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(dit + ["--prune", str(plan)]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["prune"]["plan"] == str(plan) and pruned["options"] == full["options"]
    assert pruned["params"] < full["params"] and pruned["gflops"] < full["gflops"]
    assert pruned["prune"]["removed_ratio"] == pytest.approx(1 - pruned["params"] / full["params"])
    assert main(dit + ["--prune"]) == 2
    assert "--prune needs a value" in capsys.readouterr().err


class CountSteps(harness.Metric):
    """A metric that samples (``samples = True``); ``params`` beside it does not."""

    direction, samples = None, True

    def __call__(self, ctx):
        return 1.0


class SamplingPlugin:
    """``reuse:`` changes how a step is computed, not the weights (a DeepCache-like stage)."""

    def reuse(self, ctx, spec):
        ctx.change_sampling("reuse", f"deep features reused: {spec.note}")

    @harness.hookimpl
    def harness_stages(self):
        return {"reuse": Stage(schema=MarkSpec, run=self.reuse)}

    @harness.hookimpl
    def harness_metrics(self):
        return {"count_steps": CountSteps}


def test_a_stage_that_changes_sampling_is_named_in_every_entry_that_samples(tmp_path):
    plugin = SamplingPlugin()
    registry().register(plugin, name="sampling-test")
    try:
        suite = SUITE.replace("metrics: [params]", "metrics: [params, count_steps]")
        suite = suite.replace("  - mark: {note: hello}\n    scale: {factor: 2.0}\n", "  - reuse: {note: 2 of 3}\n")
        results = tmp_path / "results"
        assert main(["run", str(write(tmp_path, suite)), "--results", str(results)]) == 0
        plain, reused = load_records(results / "staged")
    finally:
        registry().unregister(plugin)
    assert reused["metrics"]["count_steps"]["sampling_changed_by"] == {"reuse": "deep features reused: 2 of 3"}
    assert "sampling_changed_by" not in reused["metrics"]["params"]  # a weight count is not a sampled figure
    assert "sampling_changed_by" not in plain["metrics"]["count_steps"]
