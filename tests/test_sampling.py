"""Samplers: per-index determinism, 1 vs 2 processes, resumable folders, ADM .npz, CFG."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
from harness import sampling

SHAPE = (3, 8, 8)


def tiny_model():
    torch.manual_seed(0)
    m = harness.create("backbone", "dit", size="tiny", depth=1, hidden_size=32, num_heads=2, input_size=8,
                       in_channels=3, num_classes=3, patch=2)
    # adaLN-Zero starts as the identity map; perturb it so samples depend on the weights.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


KW = dict(shape=SHAPE, num_classes=3, seed=7, steps=4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_sample_depends_on_its_index_not_its_batch(sampler):
    m = tiny_model()
    a, ya = sampling.sample_batch(m, [0, 1, 2, 3], sampler=sampler, **KW)
    b, yb = sampling.sample_batch(m, [2, 3], sampler=sampler, **KW)
    c, _ = sampling.sample_batch(m, [4, 5], sampler=sampler, **KW)
    torch.testing.assert_close(a[2:], b, rtol=1e-5, atol=1e-5)
    assert torch.equal(ya[2:], yb)
    assert not torch.allclose(a[:2], c)


def test_ddpm_and_ddim_use_the_learned_variance_differently():
    m = tiny_model()
    assert m.learn_sigma
    a, _ = sampling.sample_batch(m, [0], sampler="ddpm", **KW)
    b, _ = sampling.sample_batch(m, [0], sampler="ddim", **KW)
    assert a.shape == b.shape == (1,) + SHAPE and not torch.allclose(a, b)
    with pytest.raises(harness.UserError, match="ddim"):
        sampling.make_sampler("ddmi")


class Recorder(torch.nn.Module):
    """Returns fixed outputs so guidance arithmetic can be checked exactly."""

    def forward(self, x, t, y=None):
        base = torch.arange(8.0).view(1, 8, 1, 1).expand(len(x), 8, *x.shape[2:])
        return base + (0.0 if y is None else 10.0)


def test_guidance_applies_to_the_first_channels_only():
    x, t, y = torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1])
    out = sampling.guided_eps(Recorder(), x, t, y, cfg_scale=4.0, guided_channels=3)
    # guided = uncond + 4 * (cond - uncond) = c + 40 on channels 0..2; channel 3 and the
    # variance half keep the conditional output (c + 10).
    expect = torch.arange(8.0) + torch.tensor([40.0] * 3 + [10.0] * 5)
    assert torch.equal(out[0, :, 0, 0], expect)
    all_ch = sampling.guided_eps(Recorder(), x, t, y, cfg_scale=4.0, guided_channels=None)
    assert torch.equal(all_ch[0, :4, 0, 0], torch.arange(4.0) + 40)


def _pngs(folder):
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sampling.sample_to_folder(tiny_model(), out, 10, batch_size=3, sampler="ddpm", **KW)
    finally:
        dist.destroy_process_group()


def test_two_processes_write_the_same_samples_as_one(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    one = tmp_path / "one"
    sampling.sample_to_folder(tiny_model(), one, 10, batch_size=3, sampler="ddpm", **KW)
    two = tmp_path / "two"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(two)), nprocs=2, join=True)
    a, b = _pngs(one), _pngs(two)
    assert len(a) == 10 and list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_restarted_sampling_skips_what_is_written(tmp_path, monkeypatch):
    m = tiny_model()
    sampling.sample_to_folder(m, tmp_path, 7, batch_size=3, sampler="ddim", **KW)
    before = _pngs(tmp_path)
    (tmp_path / "000004.png").unlink()  # a kill in the middle of batch 1 ([3, 6))
    calls = []
    real = sampling.sample_batch
    monkeypatch.setattr(sampling, "sample_batch", lambda model, idx, **kw: calls.append(idx) or real(model, idx, **kw))
    sampling.sample_to_folder(m, tmp_path, 7, batch_size=3, sampler="ddim", **KW)
    assert calls == [[3, 4, 5]]
    after = _pngs(tmp_path)
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_adm_npz_export(tmp_path):
    sampling.sample_to_folder(tiny_model(), tmp_path / "s", 5, batch_size=2, sampler="ddim", **KW)
    path = sampling.export_npz(tmp_path / "s", tmp_path / "samples.npz")
    arr = np.load(path)["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[0], _pngs(tmp_path / "s")["000000.png"])


def test_entry_point_samples_a_trained_cell(tmp_path):
    import json

    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    doc = {"suite": "s", "seed": 0, "base": {
        "backbone": {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": 32, "num_heads": 2},
        "data": {"name": "shapes", "resolution": 8, "size": 16}, "train": {"steps": 2, "batch_size": 4},
        "metrics": ["params"], "device": "cpu"}}
    (tmp_path / "s.yaml").write_text(json.dumps(doc))
    (job,) = plan(load_suite(tmp_path / "s.yaml"), tmp_path / "results")
    assert execute_cell(job)["status"] == "ok"
    out = tmp_path / "samples"
    assert sampling.main([str(job.record_path), "--out", str(out), "--num-samples", "3", "--steps", "2",
                          "--sampler", "ddim", "--npz", str(tmp_path / "s.npz")]) == 0
    assert len(_pngs(out)) == 3 and np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 3)
    with pytest.raises(harness.UserError, match="no such cell record"):
        sampling.main([str(tmp_path / "missing.json"), "--out", str(out)])


def test_ddpm_ignores_an_untrained_variance_when_told():
    m = tiny_model()
    learned, _ = sampling.sample_batch(m, [0], sampler="ddpm", **KW)
    fixed, _ = sampling.sample_batch(m, [0], sampler="ddpm", learn_sigma=False, **KW)
    m.learn_sigma = False  # same weights, variance channels ignored by the model's own flag
    same, _ = sampling.sample_batch(m, [0], sampler="ddpm", **KW)
    assert torch.equal(fixed, same) and not torch.allclose(fixed, learned)
