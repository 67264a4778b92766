"""``harness new-plugin NAME [--dir DIR]``: a new plugin package, ready to install.

It writes ``harness-NAME/``: a distribution whose entry point (group ``harness``) registers
one working component of each kind a plugin usually adds (backbone, mixer, metric, pruning
criterion, distillation loss, stage, command), each a few lines against the public API
(``from harness import ...``), a suite that uses them all and a pytest file. Then::

    pip install -e harness-NAME
    harness ls                                  # its components, beside the built-in ones
    harness run harness-NAME/suite.yaml
    python -m pytest harness-NAME

Its ``__init__.py`` holds the hooks alone and declares every component by reference
(``"harness_NAME.components:attr"``), so ``harness --help`` and ``harness ls`` list them
without importing torch or ``components.py``.

The templates are plain text with ``{name}`` (the plugin's name), ``{module}`` (its Python
package) and ``{dist}`` (its distribution) filled in.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

DESCRIPTION = ("Write harness-NAME, an installable plugin package: one working component of each kind (backbone, "
               "mixer, metric, criterion, loss, stage, command), a suite that uses them and a pytest file.")
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "diffusion-harness plugin {name}"
requires-python = ">=3.10"
# diffusion-harness itself is not on PyPI: install it first (it brings torch).
dependencies = []

# What makes it a plugin: entry-point group `harness`, plugin name -> module with the hooks.
[project.entry-points.harness]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

README = '''\
# {dist}

A diffusion-harness plugin, as `harness new-plugin {name}` wrote it.
Each component is a few lines in `{module}/components.py`; `{module}/__init__.py` declares
them by reference (`"{module}.components:net"`), imported when first used. The contract of
each kind is in the harness's `docs/plugins/` and `harness/hookspecs.py`.

    pip install -e .            # with diffusion-harness installed
    harness ls                  # {name}-net, {name}-mixer, {name}-metric, ... appear
    harness run suite.yaml
    python -m pytest tests
'''

PLUGIN = '''\
"""The {name} plugin's hooks. Each component is declared by reference, "module:attr", and
imported when first used: `harness --help` and `harness ls` import neither torch nor
components.py."""
from __future__ import annotations

import harness

@harness.hookimpl
def harness_backbones():
    return {{"{name}-net": "{module}.components:net"}}


@harness.hookimpl
def harness_mixers():
    return {{"{name}-mixer": "{module}.components:mixer"}}


@harness.hookimpl
def harness_metrics():
    return {{"{name}-metric": "{module}.components:WeightNorm"}}


@harness.hookimpl
def harness_pruning_criteria():
    return {{"{name}-criterion": "{module}.components:MeanActivation"}}


@harness.hookimpl
def harness_distill_losses():
    return {{"{name}-loss": "{module}.components:L1KD"}}


@harness.hookimpl
def harness_stages():  # a stage is an object, not a def: its description is given here
    return {{"{name}-scale": harness.Lazy("{module}.components:SCALE",
                                         "multiply every weight by a factor")}}


@harness.hookimpl
def harness_commands():
    return {{"{name}-info": harness.Lazy("{module}.components:INFO",
                                        "the {name} plugin's components of one kind")}}
'''

COMPONENTS = '''\
"""The {name} plugin: one component of each kind, each written against the public API."""
from __future__ import annotations

import pydantic
import torch
from torch import nn

import harness
from harness import Command, Stage


# -- backbone: forward(x, t, y=None) -> noise prediction of x's shape -------------------------
class TinyNet(nn.Module):
    def __init__(self, input_size: int, in_channels: int, num_classes: int, width: int, mixer):
        super().__init__()
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.inp = nn.Conv2d(in_channels, width, 3, padding=1)
        self.time = nn.Embedding(1000, width)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None  # + the null class
        self.mixer = harness.build_mixer(mixer, dim=width)
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.time(t.long().clamp(0, 999))[:, :, None, None]
        if self.label is not None and y is not None:
            h = h + self.label(y)[:, :, None, None]
        b, c, height, width = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        h = h + self.mixer(tokens, (height, width)).transpose(1, 2).reshape(b, c, height, width)
        return self.out(h)


def net(*, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, width: int = 32,
        mixer="{name}-mixer"):
    """A one-block conv net with a token mixer (the {name} plugin's backbone)."""
    return TinyNet(input_size, in_channels, num_classes, width, mixer)


# -- mixer: forward(x (B, L, dim), hw) -> (B, L, dim) ---------------------------------------------
class MeanMixer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, hw):
        return self.proj(x.mean(1, keepdim=True)).expand_as(x)


def mixer(dim: int):
    """Every token gets a projection of the mean token (linear in tokens)."""
    return MeanMixer(dim)


# -- metric: metric(ctx) -> float or {{"value": ...}}; declares its direction ----------------------
class WeightNorm(harness.Metric):
    """L2 norm of all the weights of the cell's model."""

    direction, unit = None, ""

    def __call__(self, ctx):
        return float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in ctx.model.parameters())))


# -- pruning criterion: score(model, units, ctx) -> {{unit.name: importance}} ----------------------
class MeanActivation(harness.Criterion):
    """Mean absolute output of each unit's modules on the calibration set."""

    def score(self, model, units, ctx):
        totals = {{u.name: 0.0 for u in units}}

        def hook(name):
            def keep(module, args, output):
                out = getattr(output, "sample", output)
                totals[name] += (out[0] if isinstance(out, (tuple, list)) else out).abs().mean().item()
            return keep

        handles = [m.register_forward_hook(hook(u.name)) for u in units for m in u.submodules(model)]
        try:
            with torch.no_grad():
                for batch in self.calibration(ctx, model):
                    model(**batch["inputs"])
        finally:
            for h in handles:
                h.remove()
        return totals


# -- distillation loss: loss(student_out, teacher_out, noise, student_feats, teacher_feats) -------
class L1KD(harness.Loss):
    """Output distillation: mean |student - teacher|."""

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        return (student_out - teacher_out).abs().mean()


# -- stage: owns the `{name}-scale:` block of a cell ---------------------------------------------
class ScaleSpec(pydantic.BaseModel):
    model_config = {{"extra": "forbid"}}
    factor: float = pydantic.Field(1.0, gt=0)


def scale(ctx, spec: ScaleSpec) -> None:
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.mul_(spec.factor)
    ctx.extra["{name}-scale"] = {{"factor": spec.factor}}


# -- command: `harness {name}-info` -----------------------------------------------------------------
def _arguments(parser) -> None:
    parser.add_argument("--kind", default="backbone", help="which kind of component to list")


def _info(args) -> int:
    print("\\n".join(n for n in harness.components(args.kind, "{name}-*")))
    return 0


# -- what the hooks in __init__.py declare by reference ------------------------------------------
SCALE = Stage(schema=ScaleSpec, run=scale, after=("train",), description="multiply every weight by a factor")
INFO = Command(help="the {name} plugin's components of one kind", arguments=_arguments, run=_info)
'''

SUITE = '''\
# The {name} plugin's components in a suite:
#   harness run suite.yaml --results results
# Cell 1: its backbone and mixer, its stage, its metric. Cell 2: a DiT pruned with its
# criterion, then distilled with its loss.
suite: {name}-demo
seed: 0
base:
  backbone: {{name: {name}-net, width: 16, mixer: {name}-mixer}}
  data: {{name: shapes, resolution: 8, size: 32}}
  {name}-scale: {{factor: 0.5}}
  metrics: [params, {name}-metric]
  device: cpu
include:
  - backbone: {{name: dit, size: tiny, input_size: 8, depth: 2}}
    {name}-scale: null
    prune: {{criterion: {name}-criterion, ratio: 0.3, calibration_batch: 2, calibration_timesteps: 2}}
    distill: {{losses: [task, {name}-loss], steps: 2, batch_size: 4}}
'''

TEST = '''\
"""The {name} plugin's components, through the harness as a suite uses them."""
from pathlib import Path

import torch

import harness

SUITE = Path(__file__).resolve().parents[1] / "suite.yaml"


def test_components_are_registered():
    assert harness.components("backbone", "{name}-*") == ["{name}-net"]
    for kind, name in [("mixer", "{name}-mixer"), ("metric", "{name}-metric"),
                       ("criterion", "{name}-criterion"), ("loss", "{name}-loss")]:
        assert name in harness.components(kind)
    assert "{name}-scale" in harness.registry().stages()


def test_backbone_and_mixer():
    model = harness.create("backbone", "{name}-net", input_size=8, in_channels=3, num_classes=2, width=8)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([1, 999]), torch.tensor([0, 1])).shape == x.shape


def test_loss():
    loss = harness.create("loss", "{name}-loss")
    a, b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert loss(a, b, None, {{}}, {{}}).item() == 1.0


def test_suite_runs(tmp_path):
    from harness.cli import main

    assert main(["run", str(SUITE), "--results", str(tmp_path)]) == 0
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    "{module}/__init__.py": PLUGIN,
    "{module}/components.py": COMPONENTS,
    "suite.yaml": SUITE,
    "tests/test_{module}.py": TEST,
}


def write_plugin(name: str, folder: str | Path = ".") -> Path:
    """Write the package ``harness-NAME`` into ``folder`` and return its path. ``name`` is
    lowercase letters and digits, words joined by hyphens; nothing is overwritten."""
    if not _NAME.match(name or ""):
        raise UserError(f"plugin name {name!r}: expected lowercase letters and digits, words joined by hyphens "
                        "(e.g. my-method)")
    dist = f"harness-{name}"
    module = "harness_" + name.replace("-", "_")
    root = Path(folder) / dist
    if root.exists():
        raise UserError(f"{root} already exists; choose another name or --dir")
    for rel, template in FILES.items():
        path = root / rel.format(module=module)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name, module=module, dist=dist))
    return root


def arguments(parser) -> None:
    parser.add_argument("name", help="the plugin's name: the package is harness-NAME")
    parser.add_argument("--dir", default=".", help="where to write it (default: here)")


def run(args) -> int:
    root = write_plugin(args.name, args.dir)
    print(f"wrote {root}: pip install -e {root}, then harness ls and harness run {root / 'suite.yaml'}")
    return 0
