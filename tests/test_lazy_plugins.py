"""Plugins declared by reference (``"module:attr"``, :class:`harness.Lazy`): a command line that
answers without importing torch or plugin modules, ``harness ls KIND NAME``, and plugins that
fail, each reported in one line with its distribution and stopping only what needs it."""
from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import harness
from harness.cli import LS_HELP, main
from harness.errors import PluginError, UserError
from harness.plugins import KINDS, OTHER_KINDS, Lazy, PluginWarning, Registry

from conftest import HERE, pip_install_target

# Runs the command line as the console script does, then writes every imported module's name to
# the file named by the first argument: what a command imported is read from there.
WRAPPER = textwrap.dedent("""
    import atexit, sys
    out = sys.argv.pop(1)
    atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
    from harness.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def harness_cli(args, tmp_path, env=None):
    """(exit status, stdout, stderr, imported modules) of ``harness ARGS`` in a fresh interpreter."""
    modules = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(modules), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    return proc.returncode, proc.stdout, proc.stderr, set(modules.read_text().split())


def entry_point_modules() -> set[str]:
    return {ep.value.split(":")[0] for ep in md.entry_points(group="harness")}


def plugin_packages() -> set[str]:
    return {m.split(".")[0] for m in entry_point_modules()}


@pytest.mark.parametrize("args, allowed", [
    (["--help"], "entry points"),          # lists the plugins' commands from their declarations
    (["run", "--help"], None),             # a core command: no plugin at all
    (["validate", "--help"], None),
    (["ls", "--help"], None),
    (["ls"], "entry points"),              # descriptions read from the sources, not imported
    (["prune", "--help"], "harness_compress.commands"),  # a plugin command: its own module, not torch
])
def test_help_imports_neither_torch_nor_plugin_modules(args, allowed, tmp_path):
    code, out, err, modules = harness_cli(args, tmp_path)
    assert code == 0, err
    assert "usage: harness" in out or args == ["ls"]
    assert "torch" not in modules and not any(m.startswith("torch.") for m in modules)
    plugin_modules = {m for m in modules if m.split(".")[0] in plugin_packages()}
    expected = set() if allowed is None else entry_point_modules()
    if allowed not in (None, "entry points"):
        expected |= {allowed}
    assert plugin_modules == expected
    if args == ["--help"]:
        assert "prune" in out and "fid" in out  # the plugins' commands, with their help
    if args == ["ls"]:
        assert "window-attention" in out and "diffusion training" in out


# -- references ----------------------------------------------------------------------------
@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """A module on sys.path that no test has imported yet, and that says when it is."""
    name = f"lazy_target_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        IMPORTED = True


        class Built:
            """What the mixer builds: callable, as a mixer's module is (its contract), and
            keeping the arguments it was built with."""

            def __init__(self, *args):
                self.args = args

            def __call__(self, x, hw):
                return x


        def mixer(dim: int, heads: int = 2, *, gate: "str | None" = None, **extra):
            """A mixer described without importing its module.

            Details that `harness ls` leaves out."""
            return Built("mixer", dim, heads, gate)


        class Stages:
            """Not a stage."""


        TABLE = {"with-dash": mixer}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def registry_with(**hooks) -> Registry:
    reg = Registry(load_entrypoints=False)

    class Plugin:
        pass

    for hook, declared in hooks.items():
        setattr(Plugin, f"harness_{hook}", harness.hookimpl(lambda self, declared=declared: declared))
    reg.register(Plugin(), name="lazy-test")
    return reg


def test_a_reference_is_described_without_import_and_imported_on_first_use(lazy_module):
    reg = registry_with(mixers={"m": f"{lazy_module}:mixer", "d": Lazy(f"{lazy_module}:TABLE.with-dash", "by key"),
                                "e": (lambda dim: (lambda x, hw: dim))})
    comps = reg.components("mixer")
    assert comps["m"].description == "A mixer described without importing its module."
    assert comps["d"].description == "by key"
    assert lazy_module not in sys.modules  # listing and describing imported nothing
    assert reg.create("mixer", "m", dim=8, gate="x").args == ("mixer", 8, 2, "x")
    assert lazy_module in sys.modules
    assert reg.create("mixer", "d", dim=4).args == ("mixer", 4, 2, None)  # a step into a mapping is by key
    assert reg.create("mixer", "e", dim=3)(None, None) == 3  # eager factories are unchanged
    assert [o["name"] for o in comps["m"].options()] == ["dim", "heads", "gate", "**extra"]
    assert comps["m"].options()[1] == {"name": "heads", "default": 2, "annotation": "int"}


def test_a_reference_is_checked_against_its_contract_once_imported(tmp_path, monkeypatch):
    """Listing a reference neither imports nor checks it; looking it up does both, in one line."""
    name = f"lazy_contract_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        import harness


        class NoDirection:
            """A metric that forgot its direction."""

            def __call__(self, ctx):
                return 1.0


        STAGE = harness.Stage(schema=dict, run=lambda ctx, spec: None)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reg = registry_with(metrics={"bad": f"{name}:NoDirection"}, stages={"odd": Lazy(f"{name}:STAGE", "a stage")})
        assert "bad" in reg.components("metric") and "odd" in reg.stages()
        assert name not in sys.modules
        with pytest.raises(PluginError, match=r"^plugin 'lazy-test': metric 'bad' \(NoDirection\) declares no "
                                              r"direction"):
            reg.get("metric", "bad")
        with pytest.raises(PluginError, match=r"^plugin 'lazy-test': stage 'odd': schema must be a pydantic"):
            reg.stages()["odd"]
    finally:
        sys.modules.pop(name, None)


def test_a_reference_that_cannot_be_imported_names_plugin_and_target(lazy_module):
    reg = registry_with(metrics={"gone": "no_such_package_xyz.metrics:Metric", "typo": f"{lazy_module}:Mixr"})
    assert reg.components("metric")["gone"].description == ""  # no source to read: no description, no error
    with pytest.raises(PluginError, match=r"^metric 'gone' of plugin 'lazy-test' cannot be imported from "
                                          r"no_such_package_xyz.metrics:Metric: ModuleNotFoundError: "):
        reg.create("metric", "gone")
    with pytest.raises(PluginError, match=r"cannot be imported from .*:Mixr: AttributeError"):
        reg.create("metric", "typo")


@pytest.mark.parametrize("target", ["no_colon", "a.b:", ":attr", "a b:c", 3])
def test_a_malformed_reference_is_refused(target):
    with pytest.raises(PluginError, match="expected 'package.module:attr'"):
        Lazy(target)


def test_a_hook_that_raises_costs_only_its_own_declarations():
    reg = Registry(load_entrypoints=False)

    class Raising:
        @harness.hookimpl
        def harness_metrics(self):
            raise RuntimeError("boom")

    class Fine:
        @harness.hookimpl
        def harness_metrics(self):
            return {"fine": lambda: None}

    reg.register(Raising(), name="raising")
    reg.register(Fine(), name="fine")
    with pytest.warns(PluginWarning, match=r"^plugin 'raising' failed in harness_metrics\(\): RuntimeError: boom; "):
        assert list(reg.components("metric")) == ["fine"]


# -- harness ls KIND NAME -----------------------------------------------------------------
def test_ls_help_lists_every_kind_and_its_hook(capsys):
    with pytest.raises(SystemExit):
        main(["ls", "--help"])
    out = capsys.readouterr().out
    for kind, hook in {**KINDS, **OTHER_KINDS}.items():
        assert f"{kind} " in out and hook in out
    assert LS_HELP.splitlines()[0] in out


def test_ls_kind_name_shows_options_and_description(capsys):
    assert main(["ls", "backbone", "dit", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plugin"] == "dit" and info["distribution"] == "diffusion-harness"
    assert info["target"] == "harness_dit.models:dit" and info["description"].startswith("DiT")
    options = {o["name"]: o for o in info["options"]}
    assert options["size"]["default"] == "XL" and options["input_size"]["annotation"] == "int"
    assert main(["ls", "mixer", "window-attention"]) == 0
    out = capsys.readouterr().out
    assert "from plugin 'mixers' (distribution 'diffusion-harness')" in out
    assert "window_size" in out and "8" in out and "(required)" in out  # dim has no default
    assert main(["ls", "stage", "train", "--json"]) == 0
    stage = json.loads(capsys.readouterr().out)
    assert {"steps", "batch_size", "lr"} <= {o["name"] for o in stage["options"]}
    assert main(["ls", "command", "prune"]) == 0
    assert "usage: harness prune" in capsys.readouterr().out


def test_ls_unknown_name_suggests(capsys):
    assert main(["ls", "mixer", "windo-attention"]) == 2
    assert "unknown mixer 'windo-attention'; did you mean 'window-attention'" in capsys.readouterr().err
    assert main(["ls", "stage", "trian"]) == 2
    assert "unknown stage 'trian'; did you mean 'train'" in capsys.readouterr().err


# -- a distribution with every fault -------------------------------------------------------
@pytest.fixture(scope="module")
def faulty_site(tmp_path_factory) -> Path:
    """tests/plugin_dists/faulty: one plugin that fails to import, one whose declarations clash
    (a core command, a built-in mixer) or point at a module that fails."""
    return pip_install_target(HERE / "plugin_dists" / "faulty", tmp_path_factory.mktemp("site-faulty"))


@pytest.fixture
def faulty_env(faulty_site):
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(faulty_site),
                                                                      os.environ.get("PYTHONPATH")]))}


TOP_BROKEN = ("harness: warning: plugin 'faulty_top' of distribution 'harness-faulty' (harness_faulty_top) failed "
              "to import: ModuleNotFoundError: No module named 'no_such_dependency_here'; its components are "
              "unavailable")
MIXER_CLASH = ("harness: warning: mixer 'attention' is declared by both plugin 'mixers' (distribution "
               "'diffusion-harness') and plugin 'faulty_lazy' (distribution 'harness-faulty'); uninstall or disable "
               "one (HARNESS_DISABLE_PLUGINS)")
COMMAND_CLASH = ("harness: warning: plugin 'faulty_lazy' (distribution 'harness-faulty') declares command 'run', "
                 "which the harness already has; it is not added")


def _swapped(line: str) -> str:
    a = "plugin 'mixers' (distribution 'diffusion-harness')"
    b = "plugin 'faulty_lazy' (distribution 'harness-faulty')"
    return line.replace(a, "\0").replace(b, a).replace("\0", b)


def test_a_broken_plugin_does_not_stop_what_does_not_need_it(faulty_env, tmp_path):
    code, out, err, modules = harness_cli(["ls", "mixer"], tmp_path, faulty_env)
    assert code == 0 and "window-attention" in out and " attention " not in out
    # one line each (the clash names the two plugins in the order pluggy calls them)
    assert sorted(err.splitlines()) == sorted([TOP_BROKEN, MIXER_CLASH]) or \
        sorted(err.splitlines()) == sorted([TOP_BROKEN, _swapped(MIXER_CLASH)])
    code, out, err, _ = harness_cli(["ls", "metric"], tmp_path, faulty_env)
    assert code == 0 and "faulty_lazy_metric" in out and "A metric whose module cannot be" in out
    assert "harness_faulty_lazy.broken" not in modules
    code, out, err, _ = harness_cli(["--help"], tmp_path, faulty_env)
    assert code == 0 and "prune" in out
    assert COMMAND_CLASH in err.splitlines() and "Traceback" not in err
    code, out, err, _ = harness_cli(["plugins", "--json"], tmp_path, faulty_env)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["faulty_top"]["distribution"] == "harness-faulty"
    assert "ModuleNotFoundError" in rows["faulty_top"]["error"] and "metric:params" in rows["measure"]["components"]


def suite(tmp_path: Path, metric: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        suite: faulty
        base:
          backbone: {{name: dit, size: tiny, depth: 1, hidden_size: 32}}
          metrics: [params, {metric}]
    """))
    return path


@pytest.mark.parametrize("metric, error", [
    ("faulty_lazy_metric", "harness: error: s.yaml:4: metrics.1: metric 'faulty_lazy_metric' of plugin 'faulty_lazy' "
                           "(distribution 'harness-faulty') cannot be imported from harness_faulty_lazy.broken:Metric: "
                           "ModuleNotFoundError: No module named 'no_such_dependency_either'"),
    ("faulty_metric", "harness: error: s.yaml:4: metrics.1: unknown metric 'faulty_metric'"),
])
def test_a_suite_that_needs_a_broken_plugin_fails_in_one_line(faulty_env, tmp_path, metric, error):
    code, out, err, _ = harness_cli(["run", "--dry-run", str(suite(tmp_path, metric).name)], tmp_path, faulty_env)
    assert code == 2, out + err
    assert err.splitlines()[-1].startswith(error) and "Traceback" not in err
    if metric == "faulty_metric":  # the plugin that failed to import may be the one that has it
        assert "may belong to a plugin that did not load: plugin 'faulty_top' of distribution 'harness-faulty'" \
            in err.splitlines()[-1]
    code, out, err, _ = harness_cli(["run", "--dry-run", suite(tmp_path, "gflops").name], tmp_path, faulty_env)
    assert code == 0, err  # the same suite without that metric is fine
    assert "1 cell(s); nothing was run" in out


def test_two_distributions_with_one_plugin_name(tmp_path, with_site):
    from conftest import make_dist

    body = "import harness\n\n@harness.hookimpl\ndef harness_mixers():\n    return {{'{0}': 'json:dumps'}}\n"
    site = tmp_path / "site"
    pip_install_target(make_dist(tmp_path, "harness-one", "harness_one", body.format("one"), ep_name="same"), site)
    pip_install_target(make_dist(tmp_path, "harness-two", "harness_two", body.format("two"), ep_name="same"), site)
    with pytest.warns(PluginWarning, match=r"plugin name 'same' is declared by both distribution 'harness-(one|two)' "
                                           r"and distribution 'harness-(one|two)'; the second is not loaded"):
        reg = with_site(site)
    assert len({"one", "two"} & set(reg.components("mixer"))) == 1
    with pytest.raises(UserError):
        reg.get("mixer", "three")


def test_a_stage_named_like_a_core_key_is_not_added():
    from harness.stages import Stage

    reg = registry_with(stages={"metrics": Stage(schema=dict, run=print), "fine": Lazy("x.y:Z", "fine")})
    with pytest.warns(PluginWarning, match=r"^plugin 'lazy-test' declares stage 'metrics', a key the core reads "
                                           r"itself \(backbone, data, metrics, .*\); it is not added"):
        assert list(reg.stages()) == ["fine"]


def test_ls_name_without_kind_says_the_kind(capsys):
    assert main(["ls", "dit"]) == 2
    assert "unknown kind 'dit'; 'dit' is a backbone: harness ls backbone dit" in capsys.readouterr().err
