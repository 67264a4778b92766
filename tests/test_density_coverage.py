"""Density and coverage (Naeem et al. 2020): a hand-worked example, parity with the authors'
``prdc`` package on the same features, the blocked computation, and the metrics in a cell sharing
precision/recall's single Inception pass."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness_quality import manifolds


def test_density_and_coverage_worked_by_hand_in_one_dimension():
    # reals 0, 1, 3, 7 with k = 1: each radius is the distance to the nearest other real,
    #   r(0) = 1, r(1) = 1, r(3) = 2, r(7) = 4.
    # fakes 0.5, 2.5, 20, 11:
    #   0.5 is inside the balls of 0 (0.5 < 1) and 1 (0.5 < 1)          -> 2
    #   2.5 is inside the ball of 3 (0.5 < 2); 1 is 1.5 away (not < 1)  -> 1
    #   20 is inside none                                                -> 0
    #   11 is exactly 4 from 7, on the radius: not inside (strict <)     -> 0
    # density = (2 + 1 + 0 + 0) / (k * M) = 3 / 4 = 0.75
    # coverage: 0, 1 and 3 each hold a fake (0.5, 0.5, 0.5 away); 7's nearest fake is 11, at 4,
    #   not < 4: 3 of 4 reals covered = 0.75
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.5], [2.5], [20.0], [11.0]])
    np.testing.assert_array_equal(manifolds.real_radii(real, k=1), [1.0, 1.0, 2.0, 4.0])
    assert manifolds.density_coverage(real, fake, k=1) == (0.75, 0.75)
    # k = 2: r(0) = 3, r(1) = 2, r(3) = 3, r(7) = 6; counts 0.5 -> 3 (0, 1, 3; 7 is 6.5 away),
    # 2.5 -> 4 (2.5 < 3, 1.5 < 2, 0.5 < 3, 4.5 < 6), 20 -> 0, 11 -> 1 (7: 4 < 6);
    # density = 8 / (2 * 4) = 1.0; every real holds a fake: coverage 1.0
    np.testing.assert_array_equal(manifolds.real_radii(real, k=2), [3.0, 2.0, 3.0, 6.0])
    assert manifolds.density_coverage(real, fake, k=2) == (1.0, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5, 10])
@pytest.mark.parametrize("block", [7, 4096])
def test_equal_to_the_prdc_package_on_the_same_features(k, block, capsys):
    from prdc import compute_prdc

    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(loc=0.3, scale=1.2, size=(250, 16))
    ref = compute_prdc(real, fake, nearest_k=k)
    capsys.readouterr()  # prdc prints the counts
    got = manifolds.density_coverage(real, fake, k=k, block=block)
    assert got.density == ref["density"] and got.coverage == ref["coverage"]  # bit for bit, not approximately
    assert 0 < got.coverage < 1 and got.density > 0  # neither figure trivially 0 or 1 here


def test_the_hand_worked_example_is_prdc_s_too(capsys):
    from prdc import compute_prdc

    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    fake = np.array([[0.5], [2.5], [20.0], [11.0]])
    for k, want in ((1, (0.75, 0.75)), (2, (1.0, 1.0))):
        ref = compute_prdc(real, fake, nearest_k=k)
        assert (ref["density"], ref["coverage"]) == want
    capsys.readouterr()


def test_duplicated_reals_count_as_neighbours_as_in_prdc(capsys):
    from prdc import compute_prdc

    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 4))
    real = np.concatenate([base, base[:10]])  # ten points twice: a radius of 0 for k = 1
    fake = np.concatenate([rng.normal(size=(30, 4)), base[:5]])
    for k in (1, 2, 5):
        ref = compute_prdc(real, fake, nearest_k=k)
        got = manifolds.density_coverage(real, fake, k=k, block=16)
        assert (got.density, got.coverage) == (ref["density"], ref["coverage"])
    capsys.readouterr()


def test_identical_sets_cover_everything():
    x = np.random.default_rng(3).normal(size=(50, 8))
    d, c = manifolds.density_coverage(x, x, k=5)
    assert c == 1.0  # every real ball holds its own point, at distance 0
    assert d >= 1.0  # each sample sits in its own ball and in those of the reals it is a k-NN of


def test_bad_input_is_refused():
    x = np.zeros((6, 3))
    with pytest.raises(ValueError, match="more than 5 real points"):
        manifolds.density_coverage(x[:5], x, k=5)
    with pytest.raises(ValueError, match="one width"):
        manifolds.density_coverage(x, np.zeros((4, 2)), k=2)
    with pytest.raises(ValueError, match="k >= 1"):
        manifolds.density_coverage(x, x, k=0)


def test_the_metrics_are_registered_with_their_k_option():
    import harness

    assert {"density", "coverage"} <= set(harness.components("metric"))
    metric = harness.create("metric", "density", k=3, reference="ref.npz")
    assert metric.k == 3 and metric.direction == "higher"
    with pytest.raises(Exception, match="k"):
        harness.create("metric", "coverage", k=0)


@pytest.mark.slow  # a cell: DiT sampling, Inception on 6 samples and 7 reference images
def test_in_a_cell_beside_precision_recall_one_pass_unchanged_figures(tmp_path, inception_file, monkeypatch):
    from prdc import compute_prdc

    from harness.runner import execute_cell, plan
    from harness.suite import load_suite
    from harness_quality import adm, evaluate

    calls, knn = [], []
    real = evaluate.extract
    monkeypatch.setattr(evaluate, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    knn_real = manifolds.density_coverage
    monkeypatch.setattr(manifolds, "density_coverage", lambda *a, **k: knn.append(1) or knn_real(*a, **k))
    monkeypatch.setattr(adm, "frechet_distance", lambda a, b: float(len(a.mu)))  # seconds at 2048-d; not tested here
    np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8))
    opts = {"num_samples": 6, "steps": 2, "batch_size": 6, "reference": str(tmp_path / "ref.npz"),
            "weights": inception_file}
    metrics = [{"name": m, **opts, **({"k": 3} if m in ("density", "coverage") else {})}
               for m in ("fid", "precision", "recall", "density", "coverage")]
    doc = {"suite": "dc", "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2},
                    "data": {"name": "shapes", "resolution": 16, "size": 24, "cache_dir": str(tmp_path / "c")},
                    "metrics": metrics, "device": "cpu"}}
    (tmp_path / "dc.yaml").write_text(json.dumps(doc))
    (job,) = plan(load_suite(tmp_path / "dc.yaml"), tmp_path / "results")
    rec = execute_cell(job)
    assert rec["status"] == "ok", rec.get("traceback")
    m = rec["metrics"]
    assert len(calls) == 2  # one Inception pass over the samples, one over the reference, for all five metrics
    assert len(knn) == 1  # and one k-NN computation for the two entries
    # the features that pass gave, as cached in chunks: reference and samples by their content keys
    chunks = {p.parent.name.split("-")[0]: np.load(p)["pool"] for p in (tmp_path / "c").rglob("adm/*/*.npz")}
    fake = chunks[evaluate.Source(next((tmp_path / "results").rglob("samples-*")), "s").content_key()]
    real_pool = chunks[evaluate.Source(tmp_path / "ref.npz", "r").content_key()]
    assert (len(real_pool), len(fake)) == (7, 6)
    # precision/recall are the evaluator's figures of those features, as without density/coverage
    assert (m["precision"]["value"], m["recall"]["value"]) == adm.precision_recall(real_pool, fake)
    folder = next((tmp_path / "results").rglob("samples-*"))
    ask = lambda names: evaluate.evaluate(folder, tmp_path / "ref.npz", names, weights=inception_file,  # noqa: E731
                                          cuda=False, cache_root=tmp_path / "c" / "adm", nearest_k=3)
    without, with_them = ask(["fid", "precision", "recall"]), ask(["fid", "precision", "recall", "density", "coverage"])
    assert {k: with_them[k] for k in without} == without  # adding them changes no other figure
    assert len(calls) == 2  # those two read the cached features: still one pass per input
    # the reference's radii are cached on disk (every cell of a suite shares them): read back, not recomputed
    (radii,) = (tmp_path / "c" / "adm" / "radii").glob("*-7x2048-k3-*.safetensors")
    evaluate._LAST_DENSITY_COVERAGE.clear()
    monkeypatch.setattr(manifolds, "real_radii", None)
    assert ask(["density", "coverage"])["density"] == m["density"]["value"]
    assert m["fid"]["value"] == 2048  # fid read the same pool_3 features
    # density/coverage are prdc's on the same features (reals: the reference's; fakes: the samples')
    want = compute_prdc(real_pool.astype(np.float64), fake.astype(np.float64), nearest_k=3)
    d, c = m["density"], m["coverage"]
    assert (d["value"], c["value"]) == (want["density"], want["coverage"])
    assert d["nearest_k"] == c["nearest_k"] == 3 and d["feature"].startswith("pool_3")
    assert (d["real_features"], d["fake_features"]) == (7, 6) and d["reference"] == str(tmp_path / "ref.npz")
    assert d["direction"] == c["direction"] == "higher"


@pytest.mark.parametrize("args, message", [
    (["--metrics", "density", "--nearest-k", "5"], "density needs more than k = 5 images in REFERENCE"),
    (["--metrics", "coverage", "--nearest-k", "0"], "coverage: k must be a positive integer"),
    (["--metrics", "precision,densty"], "'densty' is not one of .* did you mean 'density'"),
])
def test_harness_fid_density_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, message):
    import re

    from PIL import Image

    from harness.cli import main

    (tmp_path / "s").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "s" / f"{i}.png")
    np.savez(tmp_path / "ref.npz", np.zeros((5, 8, 8, 3), np.uint8))  # 5 images: not more than k = 5
    assert main(["fid", str(tmp_path / "s"), str(tmp_path / "ref.npz"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
