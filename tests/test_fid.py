"""FID/KID/IS and val_loss: parity of `harness fid` with torch-fidelity, a cell's FID against
torch-fidelity and against the Frechet distance by hand, cached reference statistics,
unavailable offline, shared validation noise."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import harness
from harness import MetricUnavailable
from harness_quality import fidelity

TINY_EXTRACTOR = "harness-test-tiny"


class TinyExtractor(__import__("torch_fidelity").feature_extractor_base.FeatureExtractorBase):
    """Fixed random projection of 4x4-pooled pixels: FID/KID/IS in milliseconds."""

    calls = 0

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(48, 16, generator=gen))
        self.register_buffer("head", torch.randn(16, 10, generator=gen))

    @staticmethod
    def get_provided_features_list():
        return ("feat", "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits_unbiased" if metric == "isc" else "feat"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        type(self).calls += len(x)
        feat = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj
        out = {"feat": feat, "logits_unbiased": feat @ self.head}
        return tuple(out[k] for k in self.features_list)


@pytest.fixture(scope="module", autouse=True)
def tiny_extractor():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TINY_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_EXTRACTOR, TinyExtractor)


# -- harness fid == torch-fidelity --------------------------------------------------------------
def _folder(path, n, seed):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised InceptionV3 state dict in torch-fidelity's format, saved locally."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save({}, path)
    torch.manual_seed(0)
    model = Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.slow  # two InceptionV3 passes on the CPU (~20 s on 2 busy cores)
def test_harness_fid_equals_torch_fidelity(tmp_path, random_inception, capsys):
    import torch_fidelity

    from harness.cli import main

    d1, d2 = _folder(tmp_path / "a", 3, 0), _folder(tmp_path / "b", 3, 1)
    assert main(["fid", str(d1), str(d2), "--weights", random_inception, "--json", "--cpu"]) == 0
    ours = json.loads(capsys.readouterr().out)["fid"]
    direct = torch_fidelity.calculate_metrics(input1=str(d1), input2=str(d2), fid=True, cuda=False, verbose=False,
                                              cache=False, feature_extractor_weights_path=random_inception)
    assert ours == direct["frechet_inception_distance"] and ours > 0


def test_the_default_inception_is_read_safely_from_the_hub_cache(tmp_path, random_inception, monkeypatch):
    """No weights named: torch-fidelity's file, where torch.hub keeps downloads, read as tensors only."""
    import shutil

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    def never(*a, **k):
        raise AssertionError("torch-fidelity's own loading unpickles: it must not be used")

    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(random_inception, checkpoints / URL_INCEPTION_V3.rsplit("/", 1)[-1])
    monkeypatch.delenv("HARNESS_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", never)
    monkeypatch.setattr(torch.hub, "download_url_to_file", never)
    monkeypatch.setattr(__import__("torch_fidelity").feature_extractor_inceptionv3, "load_state_dict_from_url", never)
    ext = fidelity.resolve_extractor()
    assert ext.weights is None
    module = fidelity.build_extractor(ext, ["2048"], cuda=False)
    saved = torch.load(random_inception, weights_only=True)
    got = module.state_dict()
    assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)


def test_harness_fid_without_weights_offline_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.delenv("HARNESS_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fidelity, "_online", lambda *a, **k: False)
    d = _folder(tmp_path / "a", 2, 0)
    assert main(["fid", str(d), str(d)]) == 2
    assert "--weights" in capsys.readouterr().err


def _one_line_exit_2(capsys, argv):
    from harness.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _bad_folder(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "not-images":
        (d / "notes.txt").write_text("hello")
        (d / "data.npz").write_bytes(b"\0" * 32)
    elif kind == "junk-png":
        Image.new("RGB", (16, 16)).save(d / "a.png")
        (d / "b.png").write_text("not a png")
    elif kind == "mixed-sizes":
        Image.new("RGB", (16, 16)).save(d / "a.png")
        Image.new("RGB", (32, 16)).save(d / "b.png")
    elif kind == "one-image":
        Image.new("RGB", (16, 16)).save(d / "a.png")
    return d


@pytest.mark.parametrize("kind, expected", [
    ("empty", r"DIR\d '.*empty' holds 0 .png/.jpg/.jpeg image\(s\); FID needs at least 2 per folder"),
    ("not-images", r"DIR\d '.*not-images' holds 0 .png/.jpg/.jpeg image"),
    ("junk-png", r"DIR\d file '.*junk-png/b.png' is not a readable image \(UnidentifiedImageError\)"),
    ("mixed-sizes", r"DIR\d '.*mixed-sizes' mixes image sizes \(a.png is 16x16, b.png is 32x16\); expected one size"),
    ("one-image", r"DIR\d '.*one-image' holds 1 .png/.jpg/.jpeg image\(s\); FID needs at least 2"),
], ids=["empty", "not-images", "junk-png", "mixed-sizes", "one-image"])
def test_harness_fid_bad_folders_are_one_line_errors(tmp_path, capsys, kind, expected):
    good, bad = _folder(tmp_path / "good", 2, 0), _bad_folder(tmp_path, kind)
    for arg, argv in (("DIR1", [str(bad), str(good)]), ("DIR2", [str(good), str(bad)])):
        assert re.search("fid: " + expected.replace(r"DIR\d", arg), _one_line_exit_2(capsys, ["fid", *argv]))


@pytest.mark.parametrize("size", ["0", "-3"])
def test_harness_fid_rejects_a_batch_size_below_one(tmp_path, capsys, size):
    d = _folder(tmp_path / "a", 2, 0)
    err = _one_line_exit_2(capsys, ["fid", str(d), str(d), "--batch-size", size])
    assert f"fid: --batch-size must be a positive integer, got {size}" in err


def test_harness_fid_refuses_junk_and_code_carrying_weights(tmp_path, capsys, monkeypatch):
    d = _folder(tmp_path / "a", 2, 0)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02 definitely not weights")
    err = _one_line_exit_2(capsys, ["fid", str(d), str(d), "--weights", str(junk)])
    assert re.search(r"FID weights \(--weights\) '.*junk.pth' is not a weights file", err)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": Evil()}, evil)
    err = _one_line_exit_2(capsys, ["fid", str(d), str(d), "--weights", str(evil)])
    assert re.search(r"FID weights \(--weights\) '.*inception.pth' is refused: it holds a pickled \S*system", err)
    other = tmp_path / "other.safetensors"
    __import__("safetensors.torch").torch.save_file({"fc.bias": torch.zeros(2)}, str(other))
    err = _one_line_exit_2(capsys, ["fid", str(d), str(d), "--weights", str(other)])
    assert re.search(r"'.*other.safetensors' does not fit FeatureExtractorInceptionV3: Missing key\(s\)", err)
    monkeypatch.setenv("HARNESS_FID_WEIGHTS", str(evil))
    err = _one_line_exit_2(capsys, ["fid", str(d), str(d)])
    assert "FID weights (HARNESS_FID_WEIGHTS)" in err and "refused" in err
    assert not (tmp_path / "pwned").exists()


# -- metrics in a cell ----------------------------------------------------------------------------
def _suite(tmp_path, metrics, backbone=None, steps=0):
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    doc = {"suite": "q", "seed": 0,
           "base": {"backbone": backbone or {"name": "dit", "size": "tiny", "patch": 4, "depth": 1,
                                             "hidden_size": 32, "num_heads": 2},
                    "data": {"name": "shapes", "resolution": 16, "size": 24, "cache_dir": str(tmp_path / "cache")},
                    "train": {"steps": steps, "batch_size": 8},
                    "metrics": metrics, "device": "cpu"}}
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(doc))
    jobs = plan(load_suite(path), tmp_path / "results")
    return [execute_cell(j) for j in jobs]


def test_fid_kid_isc_in_a_cell_with_cached_reference(tmp_path):
    opts = {"num_samples": 8, "steps": 2, "batch_size": 4, "extractor": TINY_EXTRACTOR}
    TinyExtractor.calls = 0
    (rec,) = _suite(tmp_path, [{"name": "fid", **opts}, {"name": "kid", **opts}, {"name": "isc", **opts}])
    assert rec["status"] == "ok", rec.get("traceback")
    m = rec["metrics"]
    assert m["fid"]["value"] > 0 and m["fid"]["samples"] == 8 and m["fid"]["reference_images"] == 24
    assert np.isfinite(m["kid"]["value"]) and m["isc"]["value"] >= 1.0
    # fid and kid share the reference features: 8 + 24 for fid, only 8 more for kid, 8 for isc.
    assert TinyExtractor.calls == 8 + 24 + 8 + 8
    cached = list((tmp_path / "cache" / "fidelity").glob("harness-ref-*"))
    assert cached and all(TINY_EXTRACTOR in p.name and p.suffix == ".safetensors" for p in cached)


def test_the_reference_cache_holds_no_pickles_and_never_unpickles(tmp_path):
    """Features are cached as .safetensors; a .pt where torch-fidelity kept its pickles is not read."""
    opts = {"num_samples": 4, "steps": 2, "batch_size": 4, "extractor": TINY_EXTRACTOR}
    (first,) = _suite(tmp_path, [{"name": "fid", **opts}])
    cache = tmp_path / "cache" / "fidelity"
    (feat,) = cache.glob("harness-ref-*-features-feat.safetensors")
    name = feat.name[: -len("-features-feat.safetensors")]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for old in (f"{name}-{TINY_EXTRACTOR}-features-feat.pt", f"{name}-{TINY_EXTRACTOR}-stat-fid-feat.pt"):
        torch.save(Evil(), cache / old)
    TinyExtractor.calls = 0
    (again,) = _suite(tmp_path, [{"name": "fid", **opts}])
    assert again["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]
    assert TinyExtractor.calls == 4  # the samples only: the reference came from the cache
    feat.write_bytes(b"corrupt")  # our own entry, unreadable: recomputed, not an error
    (third,) = _suite(tmp_path, [{"name": "fid", **opts}])
    assert third["metrics"]["fid"]["value"] == first["metrics"]["fid"]["value"]
    assert not marker.exists()


def test_fid_equals_torch_fidelity_on_the_same_samples(tmp_path):
    import torch_fidelity

    opts = {"num_samples": 6, "steps": 2, "batch_size": 3, "extractor": TINY_EXTRACTOR}
    (rec,) = _suite(tmp_path, [{"name": "fid", **opts}])
    samples = next((tmp_path / "results" / "q" / rec["cell"]).glob("samples-*"))
    ds = harness.create("dataset", "shapes", resolution=16, size=24,
                        seed=__import__("harness.context", fromlist=["x"]).derive_seed(0, "data"))
    ref = _folder_from(ds, tmp_path / "ref")
    direct = torch_fidelity.calculate_metrics(input1=str(samples), input2=str(ref), fid=True, cuda=False,
                                              verbose=False, cache=False, feature_extractor=TINY_EXTRACTOR)
    assert rec["metrics"]["fid"]["value"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)
    # And by hand, without torch-fidelity: the tiny extractor's features of both folders, then
    # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr (S1 S2)^1/2 from the eigenvalues of
    # S1^1/2 S2 S1^1/2 (symmetric, so no complex square root).
    def stats(folder):
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                            for p in sorted(folder.glob("*.png"))])
        with torch.no_grad():
            (feat,) = TinyExtractor(TINY_EXTRACTOR, ["feat"])(imgs)
        feat = feat.double().numpy()
        return feat.mean(0), np.cov(feat, rowvar=False)

    (mu1, s1), (mu2, s2) = stats(samples), stats(ref)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1).clip(min=0)).sum()
    by_hand = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert by_hand > 0 and rec["metrics"]["fid"]["value"] == pytest.approx(by_hand, rel=1e-5)


def test_a_half_written_sample_is_not_measured(tmp_path):
    import torch_fidelity

    samples, ref = _folder(tmp_path / "s", 4, 0), _folder(tmp_path / "r", 4, 1)
    (samples / "000004.tmp.png").write_bytes(b"\x89PNG half")  # what a kill while sampling leaves
    ext = fidelity.resolve_extractor(TINY_EXTRACTOR)
    out = fidelity.fidelity_metrics(str(samples), str(ref), ext)
    (samples / "000004.tmp.png").unlink()
    direct = torch_fidelity.calculate_metrics(input1=str(samples), input2=str(ref), fid=True, cuda=False,
                                              verbose=False, cache=False, feature_extractor=TINY_EXTRACTOR)
    assert out["samples"] == 4 and out["value"] == direct["frechet_inception_distance"]


def _folder_from(ds, path):
    path.mkdir()
    for i, img in enumerate(ds.uint8_images()):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path / f"{i:03d}.png")
    return path


def test_fid_offline_without_weights_is_unavailable_not_a_number(tmp_path, monkeypatch):
    from harness.table import render

    monkeypatch.delenv("HARNESS_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(fidelity, "_online", lambda *a, **k: False)
    (rec,) = _suite(tmp_path, ["params", {"name": "fid", "num_samples": 4}])
    assert rec["status"] == "ok"
    fid = rec["metrics"]["fid"]
    assert fid["status"] == "unavailable" and fid["value"] is None and "HARNESS_FID_WEIGHTS" in fid["reason"]
    assert not list((tmp_path / "results").rglob("samples-*"))  # nothing sampled for nothing
    assert "n/a (no Inception weights" in render([rec], "markdown")


def test_resolve_extractor_prefers_the_given_weights(tmp_path, monkeypatch):
    w = tmp_path / "w.pth"
    torch.save({"fc.bias": torch.zeros(2)}, w)
    monkeypatch.setenv("HARNESS_FID_WEIGHTS", str(w))
    env = fidelity.resolve_extractor()
    assert env.weights == str(w) and env.identity.endswith(fidelity.file_hash(w))
    w2 = tmp_path / "w2.pth"
    torch.save({"fc.bias": torch.ones(2)}, w2)
    assert fidelity.resolve_extractor(weights=str(w2)).identity != env.identity
    with pytest.raises(harness.UserError, match="not a file"):
        fidelity.resolve_extractor(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(harness.UserError, match="'clip-vit-b-32' takes no weights file"):
        fidelity.resolve_extractor("clip-vit-b-32", weights=str(w))


def test_junk_fid_weights_fail_a_cell_before_it_samples(tmp_path, monkeypatch):
    junk = tmp_path / "inception.pth"
    junk.write_bytes(b"junk")
    monkeypatch.setenv("HARNESS_FID_WEIGHTS", str(junk))
    (rec,) = _suite(tmp_path, ["params", {"name": "fid", "num_samples": 4}])
    assert rec["status"] == "failed"
    assert "FID weights (HARNESS_FID_WEIGHTS)" in rec["error"] and "is not a weights file" in rec["error"]
    assert not list((tmp_path / "results").rglob("samples-*"))


# -- val_loss -------------------------------------------------------------------------------------
def test_val_loss_is_the_same_test_for_every_candidate(tmp_path):
    from harness.context import CellContext
    from harness.suite import CellConfig
    from harness_quality.metrics import ValLoss

    def ctx(cell, hidden):
        cfg = CellConfig.model_validate({
            "backbone": {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": hidden, "num_heads": 2},
            "data": {"name": "shapes", "resolution": 16, "size": 16}, "metrics": ["val_loss"], "device": "cpu"})
        return CellContext("s", cell, 0, cfg)

    metric = ValLoss(num_timesteps=4, max_samples=16, batch_size=8)
    a, b = ctx("a", 32), ctx("b", 32)
    b.model = a.model  # same weights in two cells: the test set and noise are shared
    ra, rb = metric(a), metric(b)
    assert ra["value"] == rb["value"] and ra["timesteps"] == 4 and ra["samples"] == 16
    # An untrained adaLN-Zero DiT predicts zero noise: the loss is the noise's variance, ~1.
    assert ra["value"] == pytest.approx(1.0, abs=0.1)
    c = ctx("c", 64)
    with torch.no_grad():
        for p in c.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert metric(c)["value"] != ra["value"]


def test_trained_cell_records_loss_curve_and_val_loss(tmp_path):
    (rec,) = _suite(tmp_path, ["params", {"name": "val_loss", "num_timesteps": 3, "max_samples": 16}], steps=4)
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["train"]["steps"] == 4 and rec["train"]["loss_curve"]
    assert 0 < rec["metrics"]["val_loss"]["value"] < 2
