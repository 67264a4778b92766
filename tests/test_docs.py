"""The docs site builds with `mkdocs build --strict`, and its API reference is `harness.__all__`.

A broken link, a missing page in the nav or a name the reference cannot locate is a warning,
which --strict turns into a failed build, so these tests fail on any of them.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import harness

from conftest import REPO

if importlib.util.find_spec("mkdocs") is None:  # `make install` installs the docs extra; a bare pytest may not
    pytest.fail("mkdocs is not installed: pip install -c constraints.txt -e '.[docs]'", pytrace=False)

sys.path.insert(0, str(REPO / "docs" / "hooks"))
import api_reference  # noqa: E402  (the mkdocs hook that writes the API page)


def build(project, site):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    done = build(REPO, site)
    assert done.returncode == 0, done.stderr
    return site


def resolve(path):
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def test_every_public_name_points_at_its_definition():
    for name in harness.__all__:
        assert resolve(api_reference.identifier(harness, name)) is getattr(harness, name), name


def test_strict_build_renders_every_public_name(site):
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [n for n in harness.__all__ if f'id="{api_reference.identifier(harness, n)}"' not in page]
    assert not missing, f"the API reference lacks {missing}"


def test_a_broken_link_fails_the_build(tmp_path):
    """The site's own settings turn a link to a missing page into a failed build (the API
    reference is left out of this copy: it plays no part in link checking, and costs seconds)."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "docs", project / "docs")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    config.pop("hooks")
    config["plugins"] = [p for p in config["plugins"] if p != "mkdocstrings" and "mkdocstrings" not in p]
    (project / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with open(project / "docs" / "suites.md", "a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    done = build(project, tmp_path / "site")
    assert done.returncode != 0
    assert "suites.md" in done.stderr and "no-such-page.md" in done.stderr  # this link, not another cause


def test_readme_is_a_two_minute_read():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; details belong in docs/"


def test_readme_links_resolve(site):
    """The README is read on GitHub, outside the site: its links to docs/ are checked here."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        assert (REPO / path).exists(), f"README.md links to {link}, which does not exist"
        if anchor:
            page = site / Path(path).relative_to("docs").with_suffix("") / "index.html"
            assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), f"README.md links to missing anchor {link}"


def test_readme_suite_is_the_default_suite():
    """The suite the README walks through is what `make run` runs."""
    block = re.search(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load((REPO / "suites" / "ablation.yaml").read_text(encoding="utf-8"))
