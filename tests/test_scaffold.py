"""`harness new-plugin`: the package it writes installs, lists, runs its suite and passes its tests."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.cli import main
from harness.records import load_records

from conftest import pip_install_target

KINDS = {"backbone": "demo-net", "mixer": "demo-mixer", "metric": "demo-metric", "criterion": "demo-criterion",
         "loss": "demo-loss", "stage": "demo-scale"}


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaffold")
    assert main(["new-plugin", "demo", "--dir", str(root)]) == 0
    package = root / "harness-demo"
    return package, pip_install_target(package, root / "site")


def test_the_scaffold_is_a_whole_package(scaffolded):
    package, _ = scaffolded
    names = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert names == ["README.md", "harness_demo/__init__.py", "harness_demo/components.py", "pyproject.toml",
                     "suite.yaml", "tests/test_harness_demo.py"]
    assert '[project.entry-points.harness]\ndemo = "harness_demo"' in (package / "pyproject.toml").read_text()
    source = (package / "harness_demo" / "components.py").read_text()
    assert "from harness import Command, Stage" in source and "from harness." not in source
    hooks = (package / "harness_demo" / "__init__.py").read_text()  # declarations by reference: no torch
    assert "import torch" not in hooks and '"harness_demo.components:net"' in hooks


@pytest.mark.slow  # pip install, two cells, then the package's own tests in a fresh interpreter
def test_installed_it_lists_runs_and_passes_its_own_tests(scaffolded, with_site, tmp_path, capsys):
    package, site = scaffolded
    with_site(site)
    for kind, name in KINDS.items():
        assert main(["ls", kind]) == 0
        assert name in capsys.readouterr().out, kind
    assert main(["demo-info", "--kind", "mixer"]) == 0
    assert capsys.readouterr().out.split() == ["demo-mixer"]

    results = tmp_path / "results"
    assert main(["run", str(package / "suite.yaml"), "--results", str(results)]) == 0
    records = load_records(results / "demo-demo")
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    own, pruned = sorted(records, key=lambda r: r["config"]["backbone"]["name"] != "demo-net")
    assert own["demo-scale"] == {"factor": 0.5} and own["metrics"]["demo-metric"]["value"] > 0
    assert pruned["prune"]["criterion"] == "demo-criterion"
    assert set(pruned["distill"]["shares"]["losses"]) == {"task", "demo-loss"}

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


def test_bad_names_and_existing_folders_are_one_line_errors(tmp_path, capsys):
    assert main(["new-plugin", "My_Plugin", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'My_Plugin'" in err and "lowercase" in err
    assert main(["new-plugin", "x", "--dir", str(tmp_path)]) == 0
    assert main(["new-plugin", "x", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
