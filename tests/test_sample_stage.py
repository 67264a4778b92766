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
# A Fréchet distance of 2048-d statistics takes seconds on 2 cores: the tests of ranks and resumption
# compare these figures and the shards' float64 sums themselves, bit for bit
POINT_METRICS = ("isc", "precision", "recall")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Reference features are cached under $HARNESS_CACHE: the test's own folder (subprocesses inherit it)."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "harness-cache"))
    return tmp_path / "harness-cache"


def reference(path: Path, n: int = 8, size: int = 8, seed: int = 1) -> str:
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return str(path)


def pixel_suite(tmp_path: Path, weights: str, sample: dict, name: str = "cc", matrix: dict | None = None,
                metrics=METRICS) -> Path:
    """A tiny pixel-space DiT cell (8x8 images, 4 classes) with the ADM metrics."""
    ref = reference(tmp_path / "ref.npz")
    metrics = [{"name": m, "weights": weights, **({} if m == "isc" else {"reference": ref})} for m in metrics]
    doc = {"suite": name, "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "S", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 4},
                    "sample": {"num_samples": 8, "sampler": "ddim", "steps": 2, "batch_size": 4, "shard_size": 4,
                               **sample},
                    "metrics": metrics, "device": "cpu", "threads": 1}}
    if matrix:
        doc["matrix"] = matrix
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return path


def run_cells(suite: Path, results: Path) -> list[dict]:
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    return [execute_cell(job) for job in plan(load_suite(suite), results)]


def figures(record: dict) -> dict:
    assert record["status"] == "ok", record.get("traceback")
    return {m: e["value"] for m, e in record["metrics"].items()}


def shards(results: Path, record: dict) -> list[dict]:
    """The arrays of every feature shard of a cell, in order."""
    files = sorted((results / record["suite"] / record["cell"]).glob("sample-*/features/*.npz"))
    assert files
    out = []
    for f in files:
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def assert_same_shards(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert np.array_equal(x[k], y[k]), k  # float64 sums and features, bit for bit


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


def cheap_frechet(a, b) -> float:
    """Stands in for the Fréchet distance (seconds per call at 2048-d): a function of the same
    statistics, so equal figures still mean equal means and covariances."""
    return float(((a.mu - b.mu) ** 2).sum() + np.trace(a.sigma) - np.trace(b.sigma) + np.abs(a.sigma).sum())


@pytest.mark.slow  # Inception on 3 x 8 samples and the reference
def test_keep_none_png_and_npz_give_the_same_figures_and_none_writes_no_image(tmp_path, inception_file,
                                                                              monkeypatch):
    from PIL import Image

    from harness_quality import adm
    from harness_quality.evaluate import Network, Source, features_of
    from harness_quality.features import FEATURES_LIST, extract
    from harness_quality.fidelity import build_extractor, resolve_extractor

    monkeypatch.setattr(adm, "frechet_distance", cheap_frechet)
    suite = pixel_suite(tmp_path, inception_file, {}, matrix={"sample.keep": ["none", "png", "npz"]},
                        metrics=("fid", "sfid") + POINT_METRICS)
    results = tmp_path / "results"
    recs = run_cells(suite, results)
    by_keep = {r["config"]["sample"]["keep"]: r for r in recs}
    assert figures(by_keep["none"]) == figures(by_keep["png"]) == figures(by_keep["npz"])
    assert_same_shards(shards(results, by_keep["none"]), shards(results, by_keep["png"]))
    assert_same_shards(shards(results, by_keep["none"]), shards(results, by_keep["npz"]))
    workdir = lambda keep: results / "cc" / by_keep[keep]["cell"]  # noqa: E731
    assert image_files(workdir("none")) == []
    pngs = sorted((workdir("png")).rglob("*.png"))
    assert len(pngs) == 8
    (npz,) = workdir("npz").rglob("samples.npz")
    assert image_files(workdir("npz")) == [npz]  # the per-shard parts are gone once assembled
    batch = adm.read_npz(npz).images
    assert batch.shape == (8, 8, 8, 3) and isinstance(batch, np.memmap)
    assert np.array_equal(batch, np.stack([np.asarray(Image.open(p)) for p in pngs]))  # the same images
    # `harness fid` reads the kept PNGs back and extracts in its own batches: the same features up to rounding
    ext = resolve_extractor(weights=inception_file)
    net = Network(ext.identity, "Inception", lambda: build_extractor(ext, list(FEATURES_LIST), False), extract)
    again = features_of(Source(pngs[0].parent, "samples"), net, device="cpu", batch_size=64, cache=tmp_path / "c")
    streamed = [s for s in shards(results, by_keep["png"]) if "pool" in s]  # not moments.npz, the merged sums
    assert len(streamed) == 2 and all("pool_outer" not in s for s in streamed)  # merged, then dropped
    np.testing.assert_allclose(again.pool, np.concatenate([s["pool"] for s in streamed]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(again.logits, np.concatenate([s["logits"] for s in streamed]), rtol=1e-4, atol=1e-5)
    entry = by_keep["none"]["metrics"]["fid"]
    assert entry["samples"] == 8 and entry["images"] is None and entry["features"].startswith("streamed")
    assert by_keep["none"]["sample"]["keep"] == "none" and by_keep["none"]["sample"]["shards"] == 2


@pytest.mark.slow  # Inception on 8 + 4 samples
def test_a_killed_run_resumes_at_its_last_finished_shard(tmp_path, inception_file, monkeypatch):
    from harness_quality.streaming import Extractors
    import harness_sample.classes as classes

    suite = pixel_suite(tmp_path, inception_file, {"keep": "none"}, metrics=POINT_METRICS)
    whole = run_cells(suite, tmp_path / "whole")[0]

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
    resumed = run_cells(suite, tmp_path / "killed")[0]
    assert sampled == [[4, 5, 6, 7]]  # the first shard was not made again
    assert figures(resumed) == figures(whole)
    assert_same_shards(shards(tmp_path / "killed", resumed), shards(tmp_path / "whole", whole))


def test_fréchet_statistics_from_shard_sums_equal_np_cov():
    from harness_quality import adm
    from harness_quality.streaming import Moments, merge

    x = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32) * 3 + 1
    merged = merge(Moments.of(x[s:s + 10]) for s in range(0, 37, 10)).statistics()
    direct = adm.statistics(x)
    np.testing.assert_allclose(merged.mu, direct.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, direct.sigma, rtol=1e-10, atol=1e-12)
    assert merged.sigma.dtype == np.float64 and np.array_equal(merged.sigma, merged.sigma.T)


def test_keep_none_without_a_quality_metric_is_refused_at_validation(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        suite: nothing-to-score
        base:
          backbone: {name: dit, size: S, depth: 1, hidden_size: 32, num_heads: 2, patch: 4, input_size: 8}
          sample: {num_samples: 8,
                   keep: none}
          metrics: [params]
        """))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s.yaml:5: sample.keep: keep: none writes no image" in err and "fid" in err


def test_keep_none_without_a_quality_metric_is_refused(tmp_path):
    import harness_sample.classes as classes

    class Ctx:
        config = type("C", (), {"metric_specs": lambda self: []})()

    with pytest.raises(UserError, match="keep: none"):
        classes.sample_classes(Ctx(), type("S", (), {"keep": "none"})())


# -- several ranks ---------------------------------------------------------------------------------
RANKED_STAGES = '''
"""Three third-party stages for the ranked test; each leaves a marker per rank that ran it."""
import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

import harness
from harness.stages import Stage


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = 1.0


def mark(ctx, what):
    folder = Path(os.environ["MARKS"])
    folder.mkdir(exist_ok=True)
    (folder / f"{ctx.cell_id}-{what}-rank{os.environ.get('RANK', '0')}").touch()


def scale(ctx, spec):  # weights only, no apply: the broadcast carries its result
    mark(ctx, "scale")
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.mul_(spec.value)


def grow_apply(model, value):
    model.register_parameter("grown", torch.nn.Parameter(torch.zeros(int(value))))
    return {}


def grow(ctx, spec):  # a new structure, rebuilt on the other ranks through its apply
    mark(ctx, "grow")
    grow_apply(ctx.model, spec.value)
    ctx.extra["grow"] = {"apply": spec.value}


def reshape(ctx, spec):  # a new structure and no apply: every rank runs it
    mark(ctx, "reshape")
    ctx.model.register_parameter("reshaped", torch.nn.Parameter(torch.full((2,), spec.value)))


class Plugin:
    @harness.hookimpl
    def harness_stages(self):
        return {"scale": Stage(schema=Spec, run=scale), "grow": Stage(schema=Spec, run=grow, apply=grow_apply),
                "reshape": Stage(schema=Spec, run=reshape)}


def register():
    from harness.plugins import registry

    registry().register(Plugin(), name="ranked-test-stages")
'''

LAUNCH = '''
import sys
sys.path.insert(0, sys.argv.pop(1))
import ranked_stages
ranked_stages.register()
from harness.cli import main
raise SystemExit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # two gloo ranks start torch; Inception on 3 x 8 samples, twice
def test_two_gloo_ranks_give_one_process_figures_and_run_the_stages_before_sample_once(tmp_path, inception_file,
                                                                                     monkeypatch):
    (tmp_path / "ranked_stages.py").write_text(RANKED_STAGES)
    (tmp_path / "launch.py").write_text(LAUNCH)
    suite = pixel_suite(tmp_path, inception_file, {"keep": "none"}, metrics=POINT_METRICS)
    doc = json.loads(suite.read_text())
    doc["include"] = [{"scale": {"value": 1.5}}, {"grow": {"value": 3}}, {"reshape": {"value": 2}}]
    suite.write_text(json.dumps(doc))
    env = {**os.environ, "MARKS": str(tmp_path / "marks-2"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "launch.py"), str(tmp_path), "run", str(suite), "--results",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MARKS", str(tmp_path / "marks-1"))
    import ranked_stages
    from harness.plugins import registry

    plugin = ranked_stages.Plugin()
    registry().register(plugin, name="ranked-test-stages")
    try:
        one = {r["label"]: r for r in run_cells(suite, tmp_path / "one")}
    finally:
        registry().unregister(plugin)
    two = {r["label"]: r for r in map(json.loads, map(Path.read_text, (tmp_path / "two" / "cc").glob("*.json")))}
    assert sorted(two) == sorted(one) and len(one) == 4  # the base cell and the three included
    for label in one:
        assert figures(two[label]) == figures(one[label]), label
        assert_same_shards(shards(tmp_path / "two", two[label]), shards(tmp_path / "one", one[label]))
        assert two[label]["sample"]["world_size"] == 2 and two[label]["ranks"]["world_size"] == 2
    marks = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "marks-2").iterdir())
    # rank 1 rebuilt grow's structure through its apply and took scale's result with the weights;
    # reshape changes the structure without an apply, so rank 1 ran it as well
    assert marks == ["grow-rank0", "reshape-rank0", "reshape-rank1", "scale-rank0"]


# -- DiT's chain end to end ---------------------------------------------------------------------------
@pytest.mark.slow  # Inception on 8 samples and the reference, two 2048-d Fréchet distances
def test_dit_chain_train_py_checkpoint_tiny_vae_random_inception(tmp_path, inception_file, capsys, own_cache):
    """DiT-XL/2's FID-50K protocol in miniature, one command: a facebookresearch/DiT train.py
    checkpoint, 250 -> 3 DDPM steps under cfg, a diffusers VAE, the ADM metrics against an npz."""
    import argparse

    import torch
    from diffusers import AutoencoderKL

    import harness
    from harness.cli import main

    arch = {"size": "S", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch": 2, "input_size": 4,
            "in_channels": 4, "num_classes": 10}
    raw = harness.create("backbone", "dit", **arch).state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in raw.items()}
    ckpt = tmp_path / "0000010.pt"  # what DiT's train.py writes
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": argparse.Namespace(model="DiT-S/2", image_size=8)}, ckpt)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(tmp_path / "vae")
    ref = reference(tmp_path / "VIRTUAL_tiny.npz", n=8, size=8)
    doc = {"suite": "dit-chain", "seed": 0,
           "base": {"backbone": {"name": "dit", **arch, "pretrained": str(ckpt)},
                    "sample": {"num_samples": 8, "sampler": "ddpm", "steps": 3, "cfg_scale": 1.5, "batch_size": 4,
                               "shard_size": 4, "vae": str(tmp_path / "vae"), "keep": "none"},
                    "metrics": [{"name": m, "weights": inception_file, **({} if m == "isc" else {"reference": ref})}
                                for m in METRICS],
                    "device": "cpu", "threads": 1}}
    (tmp_path / "dit.yaml").write_text(json.dumps(doc))
    assert main(["run", str(tmp_path / "dit.yaml"), "--results", str(tmp_path / "results")]) == 0, \
        capsys.readouterr().err[-2000:]
    (rec,) = map(json.loads, map(Path.read_text, (tmp_path / "results" / "dit-chain").glob("*.json")))
    got = figures(rec)
    assert sorted(got) == sorted(METRICS) and all(np.isfinite(v) for v in got.values())
    # the point metrics again by hand, from the shards' features and the reference's (cached by the run)
    from harness_quality import adm
    from harness_quality.evaluate import Network, Source, features_of
    from harness_quality.features import FEATURES_LIST, extract, probabilities
    from harness_quality.fidelity import build_extractor, resolve_extractor

    points = [s for s in shards(tmp_path / "results", rec) if "pool" in s]
    ext = resolve_extractor(weights=inception_file)
    net = Network(ext.identity, "Inception", lambda: build_extractor(ext, list(FEATURES_LIST), False), extract)
    ref_pool = features_of(Source(ref, "reference"), net, device="cpu", batch_size=64, cache=own_cache / "adm").pool
    pool, logits = (np.concatenate([s[k] for s in points]) for k in ("pool", "logits"))
    assert got["isc"] == adm.inception_score(probabilities(logits))
    assert (got["precision"], got["recall"]) == adm.precision_recall(ref_pool, pool)
    sample = rec["sample"]
    assert sample["learn_sigma"] is True and sample["vae"] == str(tmp_path / "vae") and sample["num_classes"] == 10
    assert sample["cfg_scale"] == 1.5 and sample["sampler"] == "ddpm" and sample["steps"] == 3
    fid = rec["metrics"]["fid"]
    assert fid["samples"] == 8 and fid["reference_images"] == 8 and fid["protocol"] == "ADM evaluator"
    assert image_files(tmp_path / "results" / "dit-chain" / rec["cell"]) == []


@pytest.mark.slow  # a submitit job of two local tasks, each starting torch
def test_a_two_task_submitit_job_samples_on_both_tasks_with_one_process_figures(tmp_path, inception_file):
    from harness.cli import main

    suite = pixel_suite(tmp_path, inception_file, {"keep": "none"}, metrics=POINT_METRICS)
    (one,) = run_cells(suite, tmp_path / "one")
    doc = json.loads(suite.read_text())
    doc["executor"] = {"name": "submitit", "cluster": "local", "tasks_per_node": 2, "timeout_min": 20}
    suite.write_text(json.dumps(doc))
    assert main(["run", str(suite), "--results", str(tmp_path / "two")]) == 0
    (rec,) = map(json.loads, map(Path.read_text, (tmp_path / "two" / "cc").glob("*.json")))
    assert figures(rec) == figures(one) and rec["sample"]["world_size"] == 2
    assert_same_shards(shards(tmp_path / "two", rec), shards(tmp_path / "one", one))


def test_a_feature_network_that_cannot_be_had_is_left_to_its_metrics(monkeypatch):
    from harness.errors import MetricUnavailable
    from harness.suite import ComponentSpec
    from harness_quality import evaluate
    from harness_quality.streaming import Extractors

    def offline(names, weights=None, option=""):
        raise MetricUnavailable("no Inception weights here")

    monkeypatch.setattr(evaluate, "resolve_extractors", offline)
    got = Extractors.for_metrics([ComponentSpec(name="fid"), ComponentSpec(name="isc")], cuda=False)
    assert got.resolved == {} and got.unavailable == {"fid, isc": "no Inception weights here"}
    with pytest.raises(UserError, match="different weights"):
        Extractors.for_metrics([ComponentSpec(name="fid", weights="a"), ComponentSpec(name="isc")],
                               cuda=False)


def test_the_sample_stage_comes_after_every_stage_that_changes_the_model():
    from pydantic import BaseModel

    from harness.stages import Stage, order

    run = lambda ctx, spec: None  # noqa: E731
    stages = {"sample": Stage(schema=BaseModel, run=run, after=("train",), every_rank=True),
              "train": Stage(schema=BaseModel, run=run), "zip": Stage(schema=BaseModel, run=run),
              "quantize": Stage(schema=BaseModel, run=run, after=("train",))}
    assert order(stages, dict.fromkeys(stages)) == ["train", "quantize", "zip", "sample"]
