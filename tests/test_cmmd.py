"""CMMD (Jayasumana et al. 2024): the formula by hand and against a numpy transcription of
google-research's ``cmmd/distance.py``, its properties, a cell scored end to end with a tiny CLIP
vision model saved locally, and an unloadable model reported as unavailable."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness_quality import cmmd
from test_pickscore import tiny_clip  # noqa: F401 - a whole tiny CLIP (text and vision) saved to a folder


def google_research_mmd(x, y):
    """google-research/google-research ``cmmd/distance.py`` ``mmd`` written in numpy: the three
    kernel matrices in full, each mean over every pair (diagonal included), sigma 10, scale 1000."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x_sqnorms, y_sqnorms = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * 10 ** 2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sqnorms[:, None] + x_sqnorms[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sqnorms[:, None] + y_sqnorms[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sqnorms[:, None] + y_sqnorms[None, :])))
    return 1000 * (k_xx + k_yy - 2 * k_xy)


def unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_worked_by_hand_on_two_dimensional_embeddings():
    # x = {(0, 0), (3, 4)}, y = {(0, 0)}; sigma = 10, so k(a, b) = exp(-|a - b|^2 / 200).
    # |(3, 4) - (0, 0)|^2 = 25, so the only kernel value below 1 is e = exp(-25/200) = exp(-1/8).
    #   mean k(x, x') over the 4 pairs (diagonal included) = (1 + e + e + 1) / 4 = (1 + e) / 2
    #   mean k(y, y')  = 1 (one pair, the diagonal)
    #   mean k(x, y)   = (1 + e) / 2 (two pairs: distance 0 and 5)
    # CMMD = 1000 * ((1 + e)/2 + 1 - 2 (1 + e)/2) = 1000 * (1 - e) / 2 = 58.7515...
    e = math.exp(-1 / 8)
    assert cmmd.mmd([[0, 0], [3, 4]], [[0, 0]]) == pytest.approx(1000 * (1 - e) / 2, rel=1e-14)
    assert 1000 * (1 - e) / 2 == pytest.approx(58.75155, abs=1e-5)
    # unit vectors (1, 0) and (0, 1): |a - b|^2 = 2, k = exp(-0.01); k_xx = k_yy = 1:
    # CMMD = 1000 * (2 - 2 exp(-0.01)) = 19.9003...
    assert cmmd.mmd([[1, 0]], [[0, 1]]) == pytest.approx(2000 * (1 - math.exp(-0.01)), rel=1e-14)
    assert 2000 * (1 - math.exp(-0.01)) == pytest.approx(19.90033, abs=1e-5)


@pytest.mark.parametrize("block", [7, 4096])
@pytest.mark.parametrize("n, m, d", [(200, 150, 32), (64, 64, 768)])
def test_equal_to_google_research_s_definition_on_random_embeddings(n, m, d, block):
    rng = np.random.default_rng(n + d)
    x, y = unit(rng, n, d), unit(rng, m, d)
    y[: m // 2] += 0.3 * x[: m // 2]  # half of y leans towards x: a figure neither 0 nor maximal
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    want = google_research_mmd(x, y)
    assert want > 0.01  # CMMD figures of unit embeddings are small: the papers print 0.1 to 5
    assert abs(cmmd.mmd(x, y, block=block) - want) < 1e-10


def test_properties_where_their_estimator_has_them():
    rng = np.random.default_rng(0)
    x, y = unit(rng, 50, 16), unit(rng, 40, 16)
    for block in (3, 4096):
        assert cmmd.mmd(x, x, block=block) == 0.0  # the biased estimator: exactly 0 on one set
    assert google_research_mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    assert cmmd.mmd(x, y) == pytest.approx(cmmd.mmd(y, x), rel=1e-12)  # symmetric
    assert cmmd.mmd(x, y) > 0  # a squared distance in the kernel's feature space
    # biased, not unbiased: two sets drawn alike still score above 0 (the diagonals weigh in)
    unbiased_xx = (np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 200).sum() - len(x)) / (len(x) * (len(x) - 1))
    biased_xx = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 200).mean()
    assert biased_xx != pytest.approx(unbiased_xx, rel=1e-9)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one width"):
        cmmd.mmd(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        cmmd.mmd(np.zeros((0, 2)), np.zeros((3, 2)))


@pytest.fixture(scope="module")
def tiny_clip_vision(tmp_path_factory):
    """A random CLIP vision tower with projection and its image processor, saved as a folder."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=16)
    folder = tmp_path_factory.mktemp("clip-vision")
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_the_embedder_gives_unit_rows_of_the_projection(tiny_clip_vision):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    embedder = cmmd.load_embedder(tiny_clip_vision)
    got = embedder(images, batch_size=2)
    assert got.shape == (5, 16) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(embedder(images, batch_size=5), got, rtol=1e-5, atol=1e-6)  # batching aside
    assert embedder.identity == cmmd.load_embedder(tiny_clip_vision).identity


def _suite(tmp_path, metrics, sample=None, name="cm"):
    doc = {"suite": name, "seed": 0,
           "base": {"backbone": {"name": "dit", "size": "S", "patch": 4, "depth": 1, "hidden_size": 32,
                                 "num_heads": 2, "input_size": 8, "in_channels": 3, "num_classes": 4},
                    "metrics": metrics, "device": "cpu", "threads": 1}}
    if sample is not None:
        doc["base"]["sample"] = {"num_samples": 8, "sampler": "ddim", "steps": 2, "batch_size": 4, "shard_size": 4,
                                 **sample}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return path


def _run(path, results):
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    (job,) = plan(load_suite(path), results)
    return execute_cell(job)


@pytest.mark.slow  # a cell: DiT sampling, the tiny CLIP on 8 samples and 6 reference images
def test_a_sample_block_is_scored_from_embeddings_streamed_as_images_are_made(tmp_path, tiny_clip_vision,
                                                                            monkeypatch):
    import harness_sample.classes as classes

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    made = []
    real_batch = classes.sample_batch
    monkeypatch.setattr(classes, "sample_batch", lambda model, idx, **k: made.append(len(idx)) or
                        real_batch(model, idx, **k))
    ref = tmp_path / "ref.npz"
    ref_images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)  # any size: CLIP resizes
    np.savez(ref, ref_images)
    results = tmp_path / "results"
    rec = _run(_suite(tmp_path, [{"name": "cmmd", "model": tiny_clip_vision, "reference": str(ref),
                                  "batch_size": 3}], {"keep": "png"}), results)
    assert rec["status"] == "ok", rec.get("traceback")
    entry = rec["metrics"]["cmmd"]
    assert made == [4, 4]  # every image made once, by the stage
    assert entry["features"] == "streamed by the sample stage" and entry["samples"] == 8
    assert entry["reference_images"] == 6 and (entry["sigma"], entry["scale"]) == (10.0, 1000.0)
    assert entry["direction"] == "lower" and entry["value"] > 0
    # the figure is google-research's formula on the CLIP embeddings of the kept PNGs and the reference
    from PIL import Image

    pngs = sorted(next(results.rglob("sample-*")).rglob("*.png"))
    samples = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    embedder = cmmd.load_embedder(tiny_clip_vision)
    want = google_research_mmd(embedder(ref_images), embedder(samples))
    assert entry["value"] == pytest.approx(want, rel=1e-4)
    # the reference's embeddings are cached (safetensors, with a digest) by content and model
    (cached,) = (tmp_path / "cache" / "cmmd").glob("*.safetensors")
    assert embedder.identity in cached.name


def test_without_a_sample_block_it_samples_like_fid_and_compares_with_the_data_set(tmp_path, tiny_clip_vision,
                                                                                 monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = _suite(tmp_path, [{"name": "cmmd", "model": tiny_clip_vision, "num_samples": 4, "steps": 2}])
    doc = json.loads(path.read_text())
    doc["base"]["data"] = {"name": "shapes", "resolution": 8, "size": 12, "cache_dir": str(tmp_path / "c")}
    for key in ("input_size", "in_channels", "num_classes"):  # the data block's
        del doc["base"]["backbone"][key]
    path.write_text(json.dumps(doc))
    rec = _run(path, tmp_path / "results")
    assert rec["status"] == "ok", rec.get("traceback")
    entry = rec["metrics"]["cmmd"]
    assert entry["samples"] == 4 and entry["reference_images"] == 12 and entry["reference"].startswith("shapes")
    assert np.isfinite(entry["value"]) and entry["num_samples"] == 4


def test_a_model_that_cannot_be_loaded_is_unavailable_with_its_reason(tmp_path, monkeypatch):
    import harness
    from harness.errors import MetricUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricUnavailable, match="cannot load CLIP vision model"):
        cmmd.load_embedder(str(tmp_path / "no-such-model"))
    # in a cell, with a sample block: the record says why, and the cell is ok
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8))
    missing = str(tmp_path / "no-such-model")
    rec = _run(_suite(tmp_path, ["params", {"name": "cmmd", "model": missing, "reference": str(ref)}],
                      {"keep": "png"}), tmp_path / "results")
    assert rec["status"] == "ok", rec.get("traceback")
    entry = rec["metrics"]["cmmd"]
    assert entry["status"] == "unavailable" and "cannot load CLIP vision model" in entry["reason"]
    assert missing in entry["reason"]
    assert "cmmd" in harness.components("metric")


def test_the_sample_stage_embeds_with_one_clip_model_and_leaves_a_missing_one_to_the_metric(tmp_path):
    from types import SimpleNamespace as Spec

    from harness.errors import UserError
    from harness_quality import STREAMED_METRICS, Extractors

    assert "cmmd" in STREAMED_METRICS
    with pytest.raises(UserError, match="one CLIP model; the cmmd entries name a, b"):
        Extractors.for_metrics([Spec(name="cmmd", options={"model": "a"}), Spec(name="cmmd", options={"model": "b"})],
                               cuda=False)
    missing = str(tmp_path / "no-such-model")
    ext = Extractors.for_metrics([Spec(name="cmmd", options={"model": missing})], cuda=False)
    assert "clip" not in ext.resolved and "cannot load CLIP vision model" in ext.unavailable["cmmd"]


def test_a_whole_clip_checkpoint_loads_and_embeds_as_clip_s_own_image_features(tiny_clip):
    """The default model is a whole CLIP repository (text tower too), as openai/clip-vit-large-patch14-336
    is: the vision tower and projection load from it, and the embedding is CLIPModel's
    get_image_features, normalised."""
    import torch
    from transformers import CLIPModel

    from harness_t2i import scoring

    images = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    got = cmmd.load_embedder(tiny_clip)(images)
    clip, processor = scoring.load_clip(tiny_clip)
    assert isinstance(clip, CLIPModel)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        want = scoring._features(clip.get_image_features(pixel_values=pixels))
    want = (want / want.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
