"""Shared fixtures: real plugin distributions installed into a temporary site folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent


def pip_install_target(src: Path, target: Path) -> Path:
    """Install a distribution with pip into ``target`` (a folder for sys.path).

    pip builds in the source tree, so it works on a copy: the repo stays clean."""
    build = target.parent / f"{target.name}-src"
    shutil.copytree(src, build, dirs_exist_ok=True)
    src = build
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    return target


def make_dist(root: Path, dist: str, module: str, body: str, ep_name: str | None = None) -> Path:
    """Source of a one-package plugin distribution whose entry point in `harness` is ``module``."""
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "1.0"
        [project.entry-points.harness]
        {ep_name or module} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    """))
    (pkg / module / "__init__.py").write_text(textwrap.dedent(body))
    return pkg


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """tests/plugin_dists/toy installed as a real distribution with a `harness` entry point."""
    target = tmp_path_factory.mktemp("site-toy")
    return pip_install_target(HERE / "plugin_dists" / "toy", target)


@pytest.fixture
def with_site(monkeypatch):
    """Put an installed site folder on sys.path (and PYTHONPATH for subprocesses), fresh registry."""
    import harness.plugins

    added: list[str] = []

    def use(site: Path):
        monkeypatch.syspath_prepend(str(site))
        path = os.pathsep.join([str(site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        monkeypatch.setenv("PYTHONPATH", path)
        added.append(str(site))
        harness.plugins.reset_registry()
        return harness.plugins.registry()

    yield use
    harness.plugins.reset_registry()
    # forget what was imported from the sites, so the next test imports its own install afresh
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if where and any(str(where).startswith(site + os.sep) for site in added):
            del sys.modules[name]


@pytest.fixture(scope="module")
def random_inception():
    """torch-fidelity's Inception with its random initialisation (no weights offline), random BN
    statistics so that features differ: real Inception features of random weights."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from harness_quality.features import FEATURES_LIST

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:  # nothing to download: the weights stay random
        mp.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        model = Random("inception-v3-compat", list(FEATURES_LIST))
    for m in model.modules():  # random BN statistics, so features are not all alike
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory, random_inception):
    """``random_inception`` saved as a weights file (nothing to download)."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("inception") / "inception-random.safetensors"
    save_file({k: v.contiguous() for k, v in random_inception.state_dict().items()}, str(path))
    return str(path)


def weightless_unet(folder: Path):
    """A pipeline folder (``folder/unet``) of an `sd-tiny` U-Net with one ResNet per stage where
    the preset has two (a smaller checkpoint, as BK-SDM's), its config only: the weights file is
    deleted, so anything that reads it fails. Returns the config and the plain preset's U-Net."""
    import harness

    preset = harness.create("backbone", "unet", preset="sd-tiny", input_size=16).unet
    config = dict(preset.config)
    config["layers_per_block"] = 1
    type(preset).from_config(config).save_pretrained(folder / "unet")
    for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    return config, preset


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: models this small run fastest so, and several threads
    spin against each other on a busy machine (20x slower on the shared 2-core one). Modules
    take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
