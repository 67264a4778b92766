"""The ADM evaluator's formulas (openai/guided-diffusion evaluations/evaluator.py), pinned on
inputs small enough to work out by hand, and against brute-force re-implementations."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from harness.errors import UserError
from harness_quality import adm


def test_statistics_are_mean_and_unbiased_covariance():
    st = adm.statistics(np.array([[0.0, 1.0], [2.0, 5.0]]))
    assert st.mu.tolist() == [1.0, 3.0]
    # unbiased (N - 1): ((-1)^2 + 1^2) / 1 = 2, ((-2)^2 + 2^2) / 1 = 8, cross 4
    assert st.sigma.tolist() == [[2.0, 4.0], [4.0, 8.0]]


def test_frechet_distance_of_gaussians_worked_by_hand():
    # 1-D: (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10
    one = adm.frechet_distance(adm.Statistics(np.array([0.0]), np.array([[1.0]])),
                               adm.Statistics(np.array([3.0]), np.array([[4.0]])))
    assert one == pytest.approx(10.0, abs=1e-12)
    # diagonal 2-D: |(1, 2)|^2 + (1 + 9) + (4 + 1) - 2 * (sqrt(4) + sqrt(9)) = 5 + 15 - 10 = 10
    two = adm.frechet_distance(adm.Statistics(np.zeros(2), np.diag([1.0, 9.0])),
                               adm.Statistics(np.array([1.0, 2.0]), np.diag([4.0, 1.0])))
    assert two == pytest.approx(10.0, abs=1e-12)


def test_frechet_distance_singular_product(monkeypatch):
    a, b = adm.Statistics(np.zeros(3), np.zeros((3, 3))), adm.Statistics(np.ones(3), np.zeros((3, 3)))
    assert adm.frechet_distance(a, b) == pytest.approx(3.0, abs=1e-12)  # only the means differ
    # where the square root fails (non-finite), eps joins both diagonals inside the root only, as
    # in the evaluator: 3 + 0 + 0 - 2 tr(sqrt(eps^2 I)) = 3 - 6 eps
    real, calls = adm.trace_sqrt_product, []

    def flaky(s1, s2):
        calls.append((s1.copy(), s2.copy()))
        return float("nan") if len(calls) == 1 else real(s1, s2)

    monkeypatch.setattr(adm, "trace_sqrt_product", flaky)
    with pytest.warns(RuntimeWarning, match="singular covariance product; adding 0.01"):
        d = adm.frechet_distance(a, b, eps=0.01)
    assert np.allclose(calls[1][0], np.eye(3) * 0.01) and np.allclose(calls[1][1], np.eye(3) * 0.01)
    assert d == pytest.approx(3.0 - 0.06, abs=1e-9)


def test_frechet_distance_refuses_mismatched_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        adm.frechet_distance(adm.Statistics(np.zeros(2), np.eye(2)), adm.Statistics(np.zeros(3), np.eye(3)))


def test_inception_score_by_hand():
    eye = np.eye(4)
    assert adm.inception_score(np.full((6, 4), 0.25)) == pytest.approx(1.0)    # no information
    assert adm.inception_score(eye) == pytest.approx(4.0)                      # KL = log 4 each
    # splits are consecutive: [c0, c0] scores 1, [c1, c2] scores 2; the mean is 1.5
    assert adm.inception_score(eye[[0, 0, 1, 2]], split_size=2) == pytest.approx(1.5)
    # one split: the marginal is (1/2, 1/4, 1/4, 0); KLs log 2, log 2, log 4, log 4; mean 1.5 log 2
    assert adm.inception_score(eye[[0, 0, 1, 2]], split_size=4) == pytest.approx(2 ** 1.5)


def test_inception_score_matches_the_kl_written_out():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=12)
    expected = []
    for part in (p[:5], p[5:10], p[10:]):
        m = part.mean(0)
        expected.append(np.exp(np.mean([sum(pi * np.log(pi / mi) for pi, mi in zip(row, m)) for row in part])))
    assert adm.inception_score(p, split_size=5) == pytest.approx(np.mean(expected), rel=1e-12)


def test_precision_recall_by_hand_with_points_on_the_radius():
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    smp = np.array([[4.0], [5.0], [6.0], [7.0], [20.0]])
    # squared radii, 3rd nearest other point: ref 9, 4, 4, 9; samples 9, 4, 4, 9, 225
    assert adm.manifold_radii(ref).tolist() == [9, 4, 4, 9]
    assert adm.manifold_radii(smp).tolist() == [9, 4, 4, 9, 225]
    # precision: 4, 5 and 6 (exactly on 3's radius: 9 <= 9) lie in the reference manifold
    # recall: 1 (exactly on 4's radius), 2 and 3 lie in the sample manifold; 0 does not
    assert adm.precision_recall(ref, smp) == (pytest.approx(0.6), pytest.approx(0.75))
    # the same in 3-D, along another axis and shifted (integers: the boundary cases stay exact)
    lift = lambda x: np.hstack([np.zeros((len(x), 2)), x]) + np.array([5.0, -3.0, 7.0])  # noqa: E731
    assert adm.precision_recall(lift(ref), lift(smp), dtype=np.float64) == (pytest.approx(0.6), pytest.approx(0.75))


def _brute_force(ref, smp, k=3):
    def radii(x):
        d = cdist(x, x, "sqeuclidean")
        return np.sort(d, axis=1)[:, k]

    r_ref, r_smp = radii(ref), radii(smp)
    d = cdist(smp, ref, "sqeuclidean")
    precision = np.mean([(d[i] <= r_ref).any() for i in range(len(smp))])
    recall = np.mean([(d[:, j] <= r_smp).any() for j in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("block", [7, 10_000])
def test_precision_recall_agree_with_brute_force(block):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(40, 6))
    smp = rng.normal(loc=0.5, scale=0.7, size=(53, 6))
    got = adm.precision_recall(ref, smp, block=block, dtype=np.float64)
    want = _brute_force(ref, smp)
    assert got == (pytest.approx(want[0]), pytest.approx(want[1]))
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a test that can tell wrong answers apart


def test_precision_recall_need_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3 points"):
        adm.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_read_npz_batches(tmp_path):
    imgs = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "samples.npz", imgs)
    b = adm.read_npz(tmp_path / "samples.npz")
    assert b.images.shape == (2, 8, 8, 3) and b.pool is None and b.spatial is None
    np.savez(tmp_path / "ref.npz", arr_0=imgs, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.ones(2), sigma_s=np.eye(2))
    b = adm.read_npz(tmp_path / "ref.npz")
    assert b.pool.sigma.shape == (4, 4) and b.spatial.mu.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("content, message", [
    (dict(arr_0=np.zeros((2, 8, 8), np.uint8)), "must be \\(N, H, W, 3\\) uint8"),
    (dict(arr_0=np.zeros((2, 8, 8, 3), np.float32)), "must be \\(N, H, W, 3\\) uint8"),
    (dict(labels=np.zeros(2)), "no 'arr_0' images"),
    (dict(arr_0=np.array([{"a": 1}], dtype=object)), "not a plain .npz"),
])
def test_read_npz_refuses_what_is_not_a_batch(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(UserError, match=message):
        adm.read_npz(path, what="reference")


def test_read_npz_missing_and_junk(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        adm.read_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        adm.read_npz(tmp_path / "junk.npz")


# -- features (random_inception: tests/conftest.py) ----------------------------------------
def test_features_are_pool3_mixed6d_conv_first7_and_unbiased_logits(random_inception):
    import torch

    from harness_quality.features import extract, probabilities

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 32, 40, 3), dtype=np.uint8)
    seen, block = [], []
    # independent read-out in the same pass: the block's concatenated output starts with its 1x1 branch
    h = random_inception.Mixed_6d.register_forward_hook(lambda m, i, o: block.append(o))
    try:
        feats = extract(random_inception, [images[:1], images[1:]], progress=seen.append)
    finally:
        h.remove()
    assert seen == [1, 1]
    assert feats.pool.shape == (2, 2048) and feats.spatial.shape == (2, 17 * 17 * 7)
    assert feats.logits.shape == (2, 1008)
    assert np.array_equal(feats.spatial, torch.cat(block)[:, :7].flatten(1).numpy())
    w = random_inception.fc.weight.double().numpy()
    np.testing.assert_allclose(feats.logits, feats.pool.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)
    p = probabilities(feats.logits)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert np.argmax(p, 1).tolist() == np.argmax(feats.logits, 1).tolist()


def test_read_npz_maps_stored_images_and_reads_compressed_ones(tmp_path):
    imgs = np.random.default_rng(3).integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", imgs, mu=np.zeros(2), sigma=np.eye(2))
    np.savez_compressed(tmp_path / "packed.npz", imgs)
    stored, packed = adm.read_npz(tmp_path / "stored.npz"), adm.read_npz(tmp_path / "packed.npz")
    assert isinstance(stored.images, np.memmap) and not isinstance(packed.images, np.memmap)
    assert np.array_equal(stored.images[1:4], imgs[1:4]) and np.array_equal(packed.images, imgs)


# -- harness fid --metrics: the ADM protocol end to end ---------------------------------------
def _png_folder(path, n, seed, size=(24, 24)):
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=size + (3,), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.mark.slow  # Inception on 8 images, then again by hand
def test_harness_fid_adm_metrics_on_a_folder_and_an_npz(tmp_path, inception_file, capsys, monkeypatch):
    import json

    from harness.cli import main
    from harness_quality.features import FEATURES_LIST, extract, probabilities
    from harness_quality.fidelity import build_extractor, resolve_extractor

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    samples = _png_folder(tmp_path / "samples", 4, 0)
    ref_images = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    model = build_extractor(resolve_extractor(weights=inception_file), list(FEATURES_LIST), False)
    from harness_quality.evaluate import _read_image
    smp_images = np.stack([_read_image(str(p)) for p in sorted(samples.glob("*.png"))])
    fs, fr = extract(model, [smp_images]), extract(model, [ref_images])
    # the reference carries statistics of its own (shifted, so using them shows in the figure)
    ref_stats = adm.Statistics(adm.statistics(fr.pool).mu + 0.5, adm.statistics(fr.pool).sigma)
    np.savez(tmp_path / "ref.npz", ref_images, mu=ref_stats.mu, sigma=ref_stats.sigma)

    # The distance itself is pinned above; here, which statistics reach it (2048-d square roots
    # take tens of seconds on two cores, so the call is recorded instead of computed).
    seen = []
    monkeypatch.setattr(adm, "frechet_distance", lambda a, b: seen.append((a, b)) or float(len(seen)))
    argv = ["fid", str(samples), str(tmp_path / "ref.npz"), "--metrics", "fid,sfid,isc,precision,recall,kid",
            "--weights", inception_file, "--cpu", "--json", "--batch-size", "3"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["samples"] == 4 and got["reference_images"] == 4
    assert got["reference_statistics"].startswith("from the reference npz (mu/sigma")
    (fid_a, fid_b), (sfid_a, sfid_b) = seen
    assert (got["fid"], got["sfid"]) == (1.0, 2.0)
    np.testing.assert_allclose(fid_a.mu, fs.pool.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fid_a.sigma, np.cov(fs.pool.astype(np.float64), rowvar=False), rtol=1e-4, atol=1e-6)
    assert fid_b.mu is not None and np.array_equal(fid_b.mu, ref_stats.mu)  # the npz's own, not recomputed
    # no mu_s/sigma_s in the npz: sfid's reference side comes from its images
    np.testing.assert_allclose(sfid_a.mu, fs.spatial.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sfid_b.mu, fr.spatial.mean(0), rtol=1e-5, atol=1e-6)
    assert got["isc"] == pytest.approx(adm.inception_score(probabilities(fs.logits)), rel=1e-6)
    p, r = adm.precision_recall(fr.pool, fs.pool)
    assert (got["precision"], got["recall"]) == (pytest.approx(p), pytest.approx(r))
    assert "kid" in got and got["weights"] == inception_file
    # features are cached by content, in chunks: a second run reads them back
    chunks = list((tmp_path / "cache" / "adm").rglob("*.npz"))
    assert len(chunks) == 2
    monkeypatch.setattr("harness_quality.evaluate.extract", None)  # a second extraction would fail
    argv[argv.index("--metrics") + 1] = "isc,precision,recall"
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in ("isc", "precision", "recall")} == {k: got[k] for k in ("isc", "precision", "recall")}


@pytest.mark.parametrize("args, message", [
    (["--metrics", "fid,precison"], "'precison' is not one of .* did you mean 'precision'"),
    (["--metrics", ","], "expected a comma-separated list"),
    (["--metrics", "precision", "--stats-only"], "has no images \\('arr_0'\\) for precision"),
    (["--metrics", "fid", "--one-sample"], "SAMPLES .* holds 1 "),
    (["--metrics", "sfid", "--missing"], "REFERENCE .*: not found"),
])
def test_harness_fid_adm_bad_input_is_one_line(tmp_path, capsys, args, message):
    import re

    from harness.cli import main

    samples = _png_folder(tmp_path / "s", 1 if "--one-sample" in args else 4, 0)
    ref = tmp_path / "ref.npz"
    if "--stats-only" in args:
        np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    elif "--missing" not in args:
        np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8))
    args = [a for a in args if not a.startswith("--") or a == "--metrics"]
    assert main(["fid", str(samples), str(ref), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.slow  # Inception on 6 samples and 5 reference images
def test_adm_metrics_in_a_cell_sample_once_and_extract_once(tmp_path, inception_file, monkeypatch):
    import json

    from harness.runner import execute_cell, plan
    from harness.suite import load_suite
    from harness_quality import evaluate

    calls = []
    real = evaluate.extract
    monkeypatch.setattr(evaluate, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(adm, "frechet_distance", lambda a, b: float(len(a.mu)))  # the width it was given
    np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    opts = {"num_samples": 6, "steps": 2, "batch_size": 6, "weights": inception_file,
            "reference": str(tmp_path / "ref.npz")}
    metrics = [{"name": m, **opts} for m in ("fid", "sfid", "precision", "recall", "isc")]
    doc = {"suite": "adm", "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2},
                    "data": {"name": "shapes", "resolution": 16, "size": 24, "cache_dir": str(tmp_path / "cache")},
                    "metrics": metrics, "device": "cpu"}}
    (tmp_path / "suite.yaml").write_text(json.dumps(doc))
    (job,) = plan(load_suite(tmp_path / "suite.yaml"), tmp_path / "results")
    rec = execute_cell(job)
    assert rec["status"] == "ok", rec.get("traceback")
    m = rec["metrics"]
    assert m["fid"]["value"] == 2048 and m["sfid"]["value"] == 2023  # pool_3 and mixed_6/conv[:7]
    assert 0 <= m["precision"]["value"] <= 1 and 0 <= m["recall"]["value"] <= 1 and m["isc"]["value"] >= 1
    assert m["sfid"]["protocol"] == "ADM evaluator" and m["sfid"]["reference_images"] == 5
    assert m["recall"]["direction"] == "higher" and m["sfid"]["direction"] == "lower"
    # one pass over the samples, one over the reference, whatever the number of metrics
    assert len(calls) == 2
    assert len(list((tmp_path / "results" / "adm").rglob("samples-*"))) == 1


def test_a_missing_reference_fails_validation(tmp_path):
    from harness.cli import main

    doc = {"suite": "adm", "base": {"backbone": {"name": "dit", "size": "tiny"}, "data": {"name": "shapes"},
                                    "metrics": [{"name": "precision", "reference": str(tmp_path / "nope.npz")}]}}
    (tmp_path / "s.yaml").write_text(__import__("yaml").safe_dump(doc))
    assert main(["validate", str(tmp_path / "s.yaml")]) == 2


def test_without_a_reference_the_data_set_becomes_an_adm_batch_once(tmp_path):
    import harness
    from harness_quality.metrics import _dataset_npz

    ds = harness.create("dataset", "shapes", resolution=8, size=6)
    path = _dataset_npz(ds, None, tmp_path)
    batch = adm.read_npz(path)
    assert batch.images.shape == (6, 8, 8, 3)
    assert np.array_equal(batch.images, ds.uint8_images().permute(0, 2, 3, 1).numpy())
    mtime = path.stat().st_mtime_ns
    assert _dataset_npz(ds, None, tmp_path) == path and path.stat().st_mtime_ns == mtime  # by content, once
    assert adm.read_npz(_dataset_npz(ds, 4, tmp_path)).images.shape[0] == 4
