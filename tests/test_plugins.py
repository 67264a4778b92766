"""Plugin discovery through real entry points, name clashes, broken plugins, blocking."""
from __future__ import annotations

import pytest

import harness
from harness.errors import PluginError, UserError
from harness.plugins import Registry

from conftest import make_dist, pip_install_target


def test_builtins_come_through_entry_points():
    reg = Registry()
    plugins = {p.name: p for p in reg.plugins()}
    assert plugins["dit"].distribution == "diffusion-harness"
    assert "harness_backbones" in plugins["dit"].hooks
    assert reg.get("backbone", "dit").plugin == "dit"
    assert {"params", "gflops", "latency"} <= set(reg.components("metric"))


def test_installed_distribution_is_discovered(plugin_site, with_site):
    reg = with_site(plugin_site)
    info = {p.name: p for p in reg.plugins()}["toy"]
    assert (info.distribution, info.version) == ("harness-toy", "0.3.1")
    assert reg.get("backbone", "toy").plugin == "toy"
    assert "toy-shift" in harness.components("mixer")
    assert harness.components("backbone", "to*") == ["toy"]
    model = harness.create("backbone", "toy", width=4)
    assert model.conv.out_channels == 4


def test_register_call_unregister():
    reg = Registry(load_entrypoints=False)

    class Plugin:
        @harness.hookimpl
        def harness_mixers(self):
            return {"nothing": lambda dim: None}

    plugin = Plugin()
    reg.register(plugin, name="inline")
    assert list(reg.components("mixer")) == ["nothing"]
    reg.unregister(plugin)
    assert reg.components("mixer") == {}


def test_duplicate_component_names_both_plugins():
    reg = Registry(load_entrypoints=False)
    reg.register(_declaring("backbones", {"dit": lambda **kw: None, "mine": lambda **kw: None}), name="first")

    class Clash:
        @harness.hookimpl
        def harness_backbones(self):
            return {"dit": lambda **kw: None}

    reg.register(Clash(), name="clash")
    with pytest.warns(harness.plugins.PluginWarning, match=r"backbone 'dit' is declared by both plugin 'first' and "
                                                          r"plugin 'clash'"):
        assert list(reg.components("backbone")) == ["mine"]  # the others' names stay usable
    with pytest.raises(PluginError, match=r"backbone 'dit' is declared by both plugin 'first' and plugin 'clash'"):
        reg.get("backbone", "dit")


def _declaring(hook: str, declared: dict):
    class Plugin:
        pass

    setattr(Plugin, f"harness_{hook}", harness.hookimpl(lambda self: declared))
    return Plugin()


def test_plugin_that_fails_to_import_names_its_distribution(tmp_path, with_site):
    src = make_dist(tmp_path, "harness-broken", "harness_broken", "import no_such_module_here\n")
    site = pip_install_target(src, tmp_path / "site")
    with pytest.warns(harness.plugins.PluginWarning,
                      match=r"plugin 'harness_broken' of distribution 'harness-broken' .*failed to import: "
                            r"ModuleNotFoundError: No module named 'no_such_module_here'"):
        reg = with_site(site)
    assert "harness_broken" in reg.broken
    assert "attention" in reg.components("mixer")  # the others still load
    with pytest.raises(UserError, match=r"unknown metric 'nothing_like_it'.*may belong to a plugin that did not "
                                        r"load: plugin 'harness_broken' of distribution 'harness-broken'"):
        reg.get("metric", "nothing_like_it")


def test_disable_plugins_env_blocks_by_name(plugin_site, with_site, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "toy, measure")
    reg = with_site(plugin_site)
    names = {p.name for p in reg.plugins()}
    assert "toy" not in names and "measure" not in names and "dit" in names
    with pytest.raises(UserError, match="unknown metric 'params'"):
        reg.get("metric", "params")


def test_unknown_names_and_options_suggest():
    with pytest.raises(UserError, match=r"unknown backbone 'ditt'; did you mean 'dit'"):
        harness.create("backbone", "ditt")
    with pytest.raises(UserError, match=r"unknown component kind 'mixers'; did you mean 'mixer'"):
        harness.components("mixers")
    with pytest.raises(UserError, match=r"has no option 'sise'; did you mean 'size'"):
        harness.create("backbone", "dit", sise="S")


def test_flop_handles_hook_collects_sdpa():
    handles = Registry().flop_handles()
    assert "aten::scaled_dot_product_attention" in handles


def test_component_description_is_the_first_paragraph_not_a_cut_line():
    from harness.plugins import Component

    def wrapped():
        """Peak memory of one generation: CUDA max allocated; on the CPU the
        growth of the resident set.

        Details that `harness ls` leaves out."""

    def long():
        """A first sentence that says what the component is, kept alone when the paragraph runs long. Then
        a second sentence, with details, ``options`` and more words than a table cell wants to show to a
        reader scanning a list of installed components."""

    assert Component("metric", "w", wrapped, "p").description == ("Peak memory of one generation: CUDA max "
                                                                  "allocated; on the CPU the growth of the "
                                                                  "resident set.")
    assert Component("metric", "l", long, "p").description.endswith("when the paragraph runs long.")
    assert Component("metric", "n", lambda: None, "p").description == ""
