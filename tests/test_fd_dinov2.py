"""fd_dinov2 (EDM2's Fréchet distance of DINOv2 ViT-L/14 features) through torch-fidelity's real
DINOv2 wrapper (resize to 224, ImageNet normalisation), with torch.hub.load answering a tiny
fixed network instead of ViT-L/14: no checkpoint offline, so the code path is what is tested,
not a figure of the real model."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harness.errors import MetricUnavailable, UserError
from harness_quality import adm

HUB_CALLS = []


class StandIn(torch.nn.Module):
    """Deterministic in place of dinov2_vitl14: a 28x28-patch conv (8x8 on 224 px), tanh, mean."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 28, stride=28)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.02)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.tanh(self.conv(x)).mean((2, 3))


def _fake_hub_load(repo, model, *args, **kwargs):
    HUB_CALLS.append((repo, model))
    assert (repo, model) == ("facebookresearch/dinov2", "dinov2_vitl14")
    return StandIn()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch.hub's folder with DINOv2's repo and checkpoint in place (empty: never read), no
    network, no Inception weights anywhere, and torch.hub.load answering the stand-in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_FID_WEIGHTS", raising=False)
    monkeypatch.setattr("harness_quality.fidelity._online", lambda *a, **k: False)
    hub_dir = tmp_path / "torch" / "hub"
    (hub_dir / "facebookresearch_dinov2_main").mkdir(parents=True)
    (hub_dir / "checkpoints").mkdir()
    (hub_dir / "checkpoints" / "dinov2_vitl14_pretrain.pth").write_bytes(b"")
    monkeypatch.setattr(torch.hub, "load", _fake_hub_load)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    def no_inception(*a, **k):
        raise AssertionError("Inception was built")

    monkeypatch.setattr(FeatureExtractorInceptionV3, "__init__", no_inception)
    HUB_CALLS.clear()
    return hub_dir


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch.hub folder and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_FID_WEIGHTS", raising=False)
    monkeypatch.setattr("harness_quality.fidelity._online", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load called offline"))
    return tmp_path / "empty-torch" / "hub"


def _images(n, seed, size):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _png_folder(path, images):
    from PIL import Image

    path.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def _wrapper_features(images):
    """Independently of the harness: torch-fidelity's wrapper on the images, one batch."""
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    model = FeatureExtractorDinoV2("dinov2-vit-l-14", ["dinov2"])
    with torch.inference_mode():
        (f,) = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    return f.numpy()


def _expected(smp_images, ref_images):
    return adm.frechet_distance(adm.statistics(_wrapper_features(smp_images)),
                                adm.statistics(_wrapper_features(ref_images)))


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_harness_fid_fd_dinov2_is_the_frechet_distance_of_the_wrappers_features(tmp_path, hub, capsys,
                                                                                monkeypatch):
    from harness.cli import main
    from harness_quality import evaluate

    smp_images, ref_images = _images(8, 0, 16), _images(7, 1, 20)
    samples = _png_folder(tmp_path / "samples", smp_images)
    # Inception statistics of the wrong width: fd_dinov2 must take the images, never these
    np.savez(tmp_path / "ref.npz", ref_images, mu=np.zeros(2048), sigma=np.eye(2048))
    expected = _expected(smp_images, ref_images)
    HUB_CALLS.clear()

    argv = ["fid", str(samples), str(tmp_path / "ref.npz"), "--metrics", "fd_dinov2", "--json", "--cpu"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["fd_dinov2"] == expected and expected > 0
    assert got["samples"] == 8 and got["reference_images"] == 7
    assert got["dinov2_extractor"] == "dinov2-vit-l-14-dinov2_vitl14_pretrain"
    assert "extractor" not in got and "weights" not in got  # no Inception took part
    assert HUB_CALLS == [("facebookresearch/dinov2", "dinov2_vitl14")]  # one build for both inputs

    # cached by content, in chunks of their own: a rerun builds and extracts nothing
    chunks = sorted((tmp_path / "cache" / "adm").rglob("*.npz"))
    assert len(chunks) == 2 and all("-dinov2-vit-l-14-" in c.parent.name for c in chunks)
    HUB_CALLS.clear()
    monkeypatch.setattr(evaluate, "extract_dinov2", None)
    assert main(argv[:-2]) == 0  # the text form
    out = capsys.readouterr().out
    assert re.search(r"^fd_dinov2\s+\S+", out, re.M) and "dinov2-vit-l-14" in out
    assert HUB_CALLS == []


def test_npz_samples_and_folder_reference_give_the_same_figure(tmp_path, hub, capsys):
    from harness.cli import main

    smp_images, ref_images = _images(6, 2, 12), _images(5, 3, 12)
    np.savez(tmp_path / "samples.npz", smp_images)
    ref = _png_folder(tmp_path / "ref", ref_images)
    assert main(["fid", str(tmp_path / "samples.npz"), str(ref), "--metrics", "fd_dinov2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fd_dinov2"] == _expected(smp_images, ref_images)


def test_progress_names_the_extractor(tmp_path, hub):
    from harness_quality.evaluate import evaluate

    np.savez(tmp_path / "s.npz", _images(3, 0, 8))
    np.savez(tmp_path / "r.npz", _images(3, 1, 8))
    seen = []
    evaluate(tmp_path / "s.npz", tmp_path / "r.npz", ["fd_dinov2"], cuda=False, batch_size=2,
             progress=lambda *a: seen.append(a))
    assert seen == [("DINOv2 ViT-L/14 features of SAMPLES", 2, 3), ("DINOv2 ViT-L/14 features of SAMPLES", 3, 3),
                    ("DINOv2 ViT-L/14 features of REFERENCE", 2, 3), ("DINOv2 ViT-L/14 features of REFERENCE", 3, 3)]


def test_inception_weights_with_only_fd_dinov2_are_refused(tmp_path, hub, capsys):
    from harness.cli import main

    np.savez(tmp_path / "s.npz", _images(3, 0, 8))
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert main(["fid", str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--metrics", "fd_dinov2",
                 "--weights", str(tmp_path / "w.safetensors")]) == 2
    err = _one_line_error(capsys)
    assert "--weights" in err and "w.safetensors" in err and "Inception weights" in err and "fd_dinov2" in err


def test_offline_without_dinov2_the_cli_says_what_is_missing_and_where(tmp_path, offline, capsys):
    from harness.cli import main

    np.savez(tmp_path / "s.npz", _images(3, 0, 8))
    assert main(["fid", str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--metrics", "fd_dinov2"]) == 2
    err = _one_line_error(capsys)
    assert "no DINOv2 ViT-L/14 offline" in err and "facebookresearch/dinov2" in err
    assert "dinov2_vitl14_pretrain.pth" in err and str(offline) in err
    assert "--weights" not in err  # no Inception file can stand in for DINOv2


def test_each_metric_resolves_only_its_own_extractor(tmp_path, offline):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from harness_quality.evaluate import resolve_extractors
    from harness_quality.fidelity import WeightsUnavailable

    with pytest.raises(WeightsUnavailable, match="no Inception weights offline"):
        resolve_extractors(["fid"])
    with pytest.raises(MetricUnavailable, match="no DINOv2 ViT-L/14 offline") as exc:
        resolve_extractors(["fd_dinov2"])
    assert not isinstance(exc.value, WeightsUnavailable)
    # Inception's file cached (never read to resolve): fid is available, fd_dinov2 still not
    (offline / "checkpoints").mkdir(parents=True)
    (offline / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]).write_bytes(b"")
    assert list(resolve_extractors(["fid", "sfid"])) == ["inception"]
    with pytest.raises(MetricUnavailable, match="no DINOv2"):
        resolve_extractors(["fid", "fd_dinov2"])
    # and DINOv2's in place too: both, each once
    (offline / "facebookresearch_dinov2_master").mkdir()
    (offline / "checkpoints" / "dinov2_vitl14_pretrain.pth").write_bytes(b"")
    assert list(resolve_extractors(["fd_dinov2", "isc"])) == ["inception", "dinov2"]


def test_offline_the_metric_is_unavailable_before_any_sampling(tmp_path, offline):
    from harness_quality.metrics import FDDinoV2

    np.savez(tmp_path / "r.npz", _images(3, 0, 8))
    metric = FDDinoV2(reference=str(tmp_path / "r.npz"))
    # a cell's own samples: nothing but the extractor check may run (no model, no data set)
    ctx = SimpleNamespace(samples=None, dataset=SimpleNamespace(null_context=None))
    with pytest.raises(MetricUnavailable, match=f"no DINOv2 ViT-L/14 offline.*{re.escape(str(offline))}"):
        metric(ctx)
    # a stage's generated images
    ctx = SimpleNamespace(samples=SimpleNamespace(folder=tmp_path / "nowhere", teacher=None),
                          device=torch.device("cpu"))
    with pytest.raises(MetricUnavailable, match="no DINOv2 ViT-L/14 offline"):
        metric(ctx)


def test_a_reference_without_images_is_one_line(tmp_path, hub, capsys):
    from harness.cli import main

    np.savez(tmp_path / "s.npz", _images(3, 0, 8))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["fid", str(tmp_path / "s.npz"), str(tmp_path / "stats.npz"), "--metrics", "fd_dinov2"]) == 2
    err = _one_line_error(capsys)
    assert re.search(r"REFERENCE '.*stats\.npz' has no images \('arr_0'\) for fd_dinov2", err), err
    assert HUB_CALLS == []


def test_stage_generated_images_and_their_teacher(tmp_path, hub):
    from harness_quality.metrics import FDDinoV2

    smp_images, teacher_images, ref_images = _images(5, 0, 8), _images(5, 1, 8), _images(4, 2, 8)
    np.savez(tmp_path / "ref.npz", ref_images)
    images = SimpleNamespace(folder=_png_folder(tmp_path / "student", smp_images),
                             teacher=_png_folder(tmp_path / "teacher", teacher_images))
    ctx = SimpleNamespace(samples=images, device=torch.device("cpu"))
    entry = FDDinoV2(reference=str(tmp_path / "ref.npz"))(ctx)
    assert entry["value"] == _expected(smp_images, ref_images)
    assert entry["teacher"] == _expected(teacher_images, ref_images)
    assert entry["change"] == pytest.approx((entry["value"] - entry["teacher"]) / entry["teacher"])
    assert entry["protocol"] == "ADM evaluator" and entry["dinov2_extractor"].startswith("dinov2-vit-l-14")


def test_registered_with_direction_lower_and_no_inception_options(tmp_path, capsys):
    from harness.cli import main
    from harness.plugins import registry

    assert main(["ls", "metric", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fd_dinov2"]["plugin"] == rows["sfid"]["plugin"]
    comp = registry().components("metric")["fd_dinov2"]
    assert comp.factory.direction == "lower" and comp.factory.name == "fd_dinov2"
    with pytest.raises(UserError, match="fd_dinov2 has no option 'weights'"):
        comp.check_options({"weights": "inception.safetensors"})
    with pytest.raises(ValueError, match="no weights, extractor or feature_layer"):
        comp.factory(feature_layer="2048")


def test_in_a_cell_fd_dinov2_scores_its_samples_while_fid_is_unavailable(tmp_path, hub):
    """Offline with DINOv2 in torch.hub's folder but no Inception weights: one metric does not
    hold up the other, and the unavailable one is recorded with its reason."""
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    np.savez(tmp_path / "ref.npz", _images(5, 0, 16))
    opts = {"num_samples": 4, "steps": 2, "batch_size": 4, "reference": str(tmp_path / "ref.npz")}
    doc = {"suite": "dino", "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2},
                    "data": {"name": "shapes", "resolution": 16, "size": 24, "cache_dir": str(tmp_path / "cache")},
                    "metrics": [{"name": m, **opts} for m in ("fd_dinov2", "fid")], "device": "cpu"}}
    (tmp_path / "suite.yaml").write_text(json.dumps(doc))
    (job,) = plan(load_suite(tmp_path / "suite.yaml"), tmp_path / "results")
    rec = execute_cell(job)
    assert rec["status"] == "ok", rec.get("traceback")
    m = rec["metrics"]
    assert m["fid"]["status"] == "unavailable" and "no Inception weights offline" in m["fid"]["reason"]
    assert m["fd_dinov2"]["direction"] == "lower" and m["fd_dinov2"]["value"] > 0
    assert m["fd_dinov2"]["samples"] == 4 and m["fd_dinov2"]["reference_images"] == 5
    assert HUB_CALLS == [("facebookresearch/dinov2", "dinov2_vitl14")]


@pytest.mark.slow  # Inception (random weights) on 9 images
def test_fd_dinov2_beside_the_inception_metrics(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from harness.cli import main
    from harness_quality.features import FEATURES_LIST

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Random("inception-v3-compat", list(FEATURES_LIST)).state_dict().items()},
              str(tmp_path / "inception.safetensors"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("harness_quality.fidelity._online", lambda *a, **k: True)
    monkeypatch.setattr(torch.hub, "load", _fake_hub_load)
    # 2048-d square roots take tens of seconds on two cores: record the widths instead
    monkeypatch.setattr(adm, "frechet_distance", lambda a, b: float(len(a.mu)))
    smp, ref = _images(5, 0, 16), _images(4, 1, 16)
    np.savez(tmp_path / "s.npz", smp)
    np.savez(tmp_path / "r.npz", ref)
    assert main(["fid", str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), "--metrics", "fid,fd_dinov2,isc",
                 "--weights", str(tmp_path / "inception.safetensors"), "--json", "--cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["fid"], got["fd_dinov2"]) == (2048.0, 4.0) and got["isc"] >= 1
    assert got["extractor"].startswith("inception-v3-compat-") and got["weights"].endswith("inception.safetensors")
    assert got["dinov2_extractor"] == "dinov2-vit-l-14-dinov2_vitl14_pretrain"
    assert got["reference_statistics"] == "computed from the reference images"
    folders = {p.parent.name.split("-", 1)[1] for p in (tmp_path / "cache" / "adm").rglob("*.npz")}
    assert len(folders) == 2  # one per network, shared by both inputs' content keys
