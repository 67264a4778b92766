"""The ``sample`` stage of class-conditional cells (harness_sample): images made once per cell,
features streamed as they are made, every keep mode giving the same figures, resumable shards,
and the same figures on 1 process or 2 gloo ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from harness.errors import UserError

METRICS = ("fid", "sfid", "isc", "precision", "recall")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's Inception with its random initialisation, saved as a weights file
    (nothing to download: the features are real Inception features of random weights)."""
    import torch
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from harness_quality.features import FEATURES_LIST

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        model = Random("inception-v3-compat", list(FEATURES_LIST))
    for m in model.modules():  # random BN statistics, so features are not all alike
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inception") / "inception-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def reference(path: Path, n: int = 8, size: int = 8, seed: int = 1) -> str:
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return str(path)


def pixel_suite(tmp_path: Path, weights: str, sample: dict, name: str = "cc", extra: str = "") -> Path:
    """A tiny pixel-space DiT cell (8x8 images, 4 classes) with the ADM metrics."""
    ref = reference(tmp_path / "ref.npz")
    metrics = [{"name": m, "weights": weights, **({} if m == "isc" else {"reference": ref})} for m in METRICS]
    doc = {"suite": name, "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "S", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 4},
                    "sample": {"num_samples": 8, "sampler": "ddim", "steps": 2, "batch_size": 4, "shard_size": 4,
                               **sample},
                    "metrics": metrics, "device": "cpu", "threads": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(doc) if not extra else json.dumps(doc) + "\n" + extra)
    return path


def run_cells(suite: Path, results: Path) -> list[dict]:
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    return [execute_cell(job) for job in plan(load_suite(suite), results)]


def figures(record: dict) -> dict:
    assert record["status"] == "ok", record.get("traceback")
    return {m: record["metrics"][m]["value"] for m in METRICS}


def image_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".png", ".npy") or p.name == "samples.npz"]


def test_the_block_is_validated_with_its_kind(tmp_path):
    from harness_sample import SampleSpec

    spec = SampleSpec.model_validate({"num_samples": 10})
    assert (spec.sampler, spec.steps, spec.cfg_scale, spec.batch_size, spec.keep) == ("ddpm", 250, 1.0, 32, "png")
    for block, message in [({}, "num_samples"), ({"num_samples": 4, "sampler": "dpm"}, "sampler 'dpm'"),
                           ({"num_samples": 4, "pipeline": "x"}, "pipeline applies to text-to-image"),
                           ({"num_samples": 4, "keep": "jpg"}, "keep")]:
        with pytest.raises(ValueError, match=message):
            SampleSpec.model_validate(block)


def test_a_bad_sample_block_is_one_line_with_file_and_line(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        suite: bad
        base:
          backbone: {name: dit, size: S, depth: 1, hidden_size: 32, num_heads: 2, patch: 4, input_size: 8}
          sample: {num_samples: 8, keep: jpeg}
          metrics: [params]
        """))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "s.yaml:4" in err and "keep" in err and "Traceback" not in err


@pytest.mark.slow  # Inception on 3 x 8 samples and the reference
def test_keep_none_png_and_npz_give_the_same_figures_and_none_writes_no_image(tmp_path, inception_file):
    from harness_quality import adm
    from harness_quality.evaluate import evaluate

    suite = pixel_suite(tmp_path, inception_file, {}, extra="matrix: {sample.keep: [none, png, npz]}")
    recs = run_cells(suite, tmp_path / "results")
    by_keep = {r["config"]["sample"]["keep"]: r for r in recs}
    assert figures(by_keep["none"]) == figures(by_keep["png"]) == figures(by_keep["npz"])
    workdir = lambda keep: tmp_path / "results" / "cc" / by_keep[keep]["cell"]  # noqa: E731
    assert image_files(workdir("none")) == []
    pngs = sorted((workdir("png")).rglob("*.png"))
    assert len(pngs) == 8
    (npz,) = workdir("npz").rglob("samples.npz")
    assert image_files(workdir("npz")) == [npz]  # the per-shard parts are gone once assembled
    from PIL import Image

    batch = adm.read_npz(npz).images
    assert batch.shape == (8, 8, 8, 3) and isinstance(batch, np.memmap)
    assert np.array_equal(batch, np.stack([np.asarray(Image.open(p)) for p in pngs]))  # the same images
    # `harness fid` on the kept PNGs extracts again from files: the same figures up to rounding
    again = evaluate(pngs[0].parent, tmp_path / "ref.npz", list(METRICS), weights=inception_file, cuda=False,
                     cache_root=tmp_path / "cache")
    for m in METRICS:
        assert again[m] == pytest.approx(figures(by_keep["png"])[m], rel=1e-5, abs=1e-6)
    entry = by_keep["none"]["metrics"]["fid"]
    assert entry["samples"] == 8 and entry["images"] is None and entry["features"].startswith("streamed")
    assert by_keep["none"]["sample"]["keep"] == "none" and by_keep["none"]["sample"]["shards"] == 2


@pytest.mark.slow  # Inception on 8 + 4 samples
def test_a_killed_run_resumes_at_its_last_finished_shard(tmp_path, inception_file, monkeypatch):
    from harness_quality.streaming import Extractors
    import harness_sample.classes as classes

    suite = pixel_suite(tmp_path, inception_file, {"keep": "none"})
    whole = figures(run_cells(suite, tmp_path / "whole")[0])

    real_save, real_sample = Extractors.save_shard, classes.sample_batch
    saved, sampled = [], []

    def killed_after_one(self, path, *a, **k):
        if saved:
            raise KeyboardInterrupt  # killed while making the second shard
        saved.append(path)
        return real_save(self, path, *a, **k)

    monkeypatch.setattr(Extractors, "save_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_cells(suite, tmp_path / "killed")
    monkeypatch.setattr(Extractors, "save_shard", real_save)
    monkeypatch.setattr(classes, "sample_batch", lambda model, idx, **k: sampled.append(idx) or
                        real_sample(model, idx, **k))
    assert figures(run_cells(suite, tmp_path / "killed")[0]) == whole
    assert sampled == [[4, 5, 6, 7]]  # the first shard was not made again


def test_fréchet_statistics_from_shard_sums_equal_np_cov():
    from harness_quality import adm
    from harness_quality.streaming import Moments, merge

    x = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32) * 3 + 1
    merged = merge(Moments.of(x[s:s + 10]) for s in range(0, 37, 10)).statistics()
    direct = adm.statistics(x)
    np.testing.assert_allclose(merged.mu, direct.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, direct.sigma, rtol=1e-10, atol=1e-12)
    assert merged.sigma.dtype == np.float64 and np.array_equal(merged.sigma, merged.sigma.T)


def test_keep_none_without_a_quality_metric_is_refused(tmp_path):
    import harness_sample.classes as classes

    class Ctx:
        config = type("C", (), {"metric_specs": lambda self: []})()

    with pytest.raises(UserError, match="keep: none"):
        classes.sample_classes(Ctx(), type("S", (), {"keep": "none"})())
