"""Diffusion training: it learns, it resumes after a kill, every candidate sees the same data."""
from __future__ import annotations

import pytest
import torch

from harness.context import CellContext
from harness.suite import CellConfig
from harness.training import TrainSpec
from harness import training
from harness_train import train_cell

TINY = {"name": "dit", "size": "tiny", "patch": 4, "depth": 1, "hidden_size": 32, "num_heads": 2}


def make_ctx(tmp_path, cell="c1", train=None, backbone=None, seed=0, workdir=None):
    cfg = CellConfig.model_validate({
        "backbone": backbone or TINY, "data": {"name": "shapes", "resolution": 16, "size": 64},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 3, "checkpoint_every": 2, **(train or {})},
        "metrics": ["val_loss"], "device": "cpu"})
    return CellContext("suite", cell, seed, cfg, workdir=tmp_path / (workdir or cell))


def test_training_lowers_the_loss_and_keeps_the_curve(tmp_path):
    ctx = make_ctx(tmp_path, train={"steps": 30, "log_every": 5, "lr": 3e-3})
    train_cell(ctx, ctx.train)
    rec = ctx.extra["train"]
    curve = [loss for _, loss, _ in rec["loss_curve"]]
    assert len(curve) == 6 and rec["steps"] == 30 and rec["objective"] == "mse"
    assert curve[-1] < 0.8 * curve[0]
    # The measured model is the EMA copy, not the raw weights.
    assert ctx.model is not None and not ctx.model.training


def test_learned_variance_adds_the_vlb_term(tmp_path):
    ctx = make_ctx(tmp_path, train={"steps": 2, "learn_sigma": True})
    train_cell(ctx, ctx.train)
    terms = ctx.extra["train"]["loss_curve"][-1][2]
    assert set(terms) == {"mse", "vb"} and ctx.extra["train"]["objective"] == "mse+vlb"


def test_vlb_is_zero_when_the_model_matches_the_posterior():
    # With the true noise and the posterior variance (var_out = -1 picks the clipped
    # posterior log-variance), the KL term vanishes for t > 0.
    sched = training.make_scheduler("linear", 1000, learn_sigma=True)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([5, 100, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    vb = training.vlb_term(sched, x0, x_t, t, noise, -torch.ones_like(x0))
    assert vb.abs().item() < 1e-4
    assert training.vlb_term(sched, x0, x_t, t, noise + 0.5, torch.ones_like(x0)).item() > 1e-3


def _final_state(ctx):
    return {k: v.clone() for k, v in ctx.model.state_dict().items()}


def test_killed_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    # Same cell (same initialisation), two working folders: one run uninterrupted.
    full = make_ctx(tmp_path, workdir="full")
    train_cell(full, full.train)
    expected = _final_state(full)

    killed = make_ctx(tmp_path, workdir="killed")
    real_save = training.save_checkpoint
    calls = []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(args[4])
        if len(calls) == 2:  # killed right after the step-4 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_cell(killed, killed.train)
    monkeypatch.setattr(training, "save_checkpoint", real_save)

    resumed = make_ctx(tmp_path, workdir="killed")
    train_cell(resumed, resumed.train)
    assert calls == [2, 4] and resumed.extra["train"]["resumed_from"] == 4
    got = _final_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.extra["train"]["loss_curve"] == full.extra["train"]["loss_curve"]


def test_every_candidate_sees_the_same_batches_and_noise(tmp_path):
    seen = {}

    def spy(name):
        def loss_fn(model, x0, t, y, noise, x_t, teacher):
            seen.setdefault(name, []).append((x0.clone(), t.clone(), y.clone(), noise.clone()))
            out = model(x_t, t, y)[:, : x0.shape[1]]
            return ((out - noise) ** 2).mean(), {}
        return loss_fn

    wide = dict(TINY, hidden_size=64)
    for cell, bb in (("a", TINY), ("b", wide)):
        ctx = make_ctx(tmp_path, cell=cell, backbone=bb)
        training.train_model(ctx, ctx.model, ctx.train, loss_fn=spy(cell))
    assert len(seen["a"]) == 6
    for sa, sb in zip(seen["a"], seen["b"]):
        assert all(torch.equal(u, v) for u, v in zip(sa, sb))
    # A different suite seed draws different data.
    ctx = make_ctx(tmp_path, cell="c", seed=1)
    training.train_model(ctx, ctx.model, ctx.train, loss_fn=spy("c"))
    assert not torch.equal(seen["c"][0][3], seen["a"][0][3])


def test_custom_loss_gets_the_teacher_and_its_terms_are_logged(tmp_path):
    ctx = make_ctx(tmp_path, train={"steps": 2, "log_every": 1})
    teacher = ctx.build_backbone()
    student = ctx.build_backbone()

    def distill(model, x0, t, y, noise, x_t, teacher):
        s = model(x_t, t, y)
        with torch.no_grad():
            tt = teacher(x_t, t, y)
        kd = ((s - tt) ** 2).mean()
        return kd, {"kd": kd.detach()}

    out = training.train_model(ctx, student, ctx.train, loss_fn=distill, teacher=teacher, tag="student")
    assert out["objective"] == "custom" and "kd" in out["loss_curve"][0][2]
    assert (ctx.workdir / "student-checkpoint.safetensors").is_file()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_ema_warms_up_then_uses_the_given_decay():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    training.ema_update(ema, model, 0.9999, step=0)  # decay min(0.9999, 1/10)
    assert torch.allclose(ema.weight, 0.1 * before + 0.9 * model.weight)
    before = ema.weight.detach().clone()
    training.ema_update(ema, model, 0.5, step=10_000)  # warm-up over: the given decay
    assert torch.allclose(ema.weight, 0.5 * before + 0.5 * model.weight)


def test_label_dropout_without_a_null_class_is_a_user_error(tmp_path):
    from harness import UserError

    ctx = make_ctx(tmp_path, backbone=dict(TINY, class_dropout_prob=0.0))
    with pytest.raises(UserError, match="label_dropout"):
        train_cell(ctx, ctx.train)
    ok = make_ctx(tmp_path, cell="ok", backbone=dict(TINY, class_dropout_prob=0.0), train={"label_dropout": 0.0})
    train_cell(ok, ok.train)
    assert ok.extra["train"]["steps"] == 6


def test_checkpoint_temporary_file_is_per_process(tmp_path):
    """Two processes saving one checkpoint (a stale claim taken over while the old run still
    trains) must not write into, or rename away, each other's half-written file."""
    path = tmp_path / "train-checkpoint.safetensors"
    theirs = path.with_suffix(".tmp")  # what any writer used before
    theirs.write_bytes(b"another process is writing this")
    model = torch.nn.Linear(2, 2)
    ema = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    training.save_checkpoint(path, model, ema, opt, 3, {"window": []})
    assert theirs.read_bytes() == b"another process is writing this"
    assert training.load_checkpoint(path, model, ema, opt) == (3, {"window": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-checkpoint.safetensors", "train-checkpoint.tmp"]
