"""TinyFusion: the learnable depth-pruning criterion and the masked KD loss."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import harness
from harness.cli import main
from harness.context import CellContext
from harness.suite import CellConfig
from harness_compress.tinyfusion import candidate_masks, spread_keep, stack_groups

BACKBONE = {"name": "dit", "size": "tiny", "input_size": 8, "in_channels": 4, "num_classes": 3, "patch": 2,
            "depth": 4, "hidden_size": 32, "num_heads": 2, "learn_sigma": False}
FAST = dict(steps=30, batch_size=8, log_every=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx(depth=4, seed=0):
    config = CellConfig.model_validate({"backbone": {**BACKBONE, "depth": depth}, "metrics": ["params"],
                                        "device": "cpu"})
    return CellContext("t", "cell", seed, config)


def _trained_dit(ctx, identity=()):
    """A tiny DiT trained a little (20 steps) on stand-in data (x0 ~ N(0, I)), so that its blocks
    matter, then with the adaLN gates of ``identity`` zeroed: those blocks are the identity.
    (Untrained, the search's choice is no better than a coin: the test would fail.)"""
    model = ctx.model
    torch.manual_seed(0)
    for block in model.blocks:  # adaLN-Zero starts every block as the identity
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    abar = harness.alphas_cumprod()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        x0, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
        t = torch.randint(0, 1000, (8,))
        a = abar[t].view(-1, 1, 1, 1)
        out = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, torch.randint(0, 3, (8,)))
        loss = torch.mean((out[:, :4] - noise) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for i in identity:  # gate_msa and gate_mlp are chunks 2 and 5 of the 6C modulation
            w, b = model.blocks[i].adaLN_modulation[-1].weight, model.blocks[i].adaLN_modulation[-1].bias
            for chunk in (2, 5):
                w[chunk * 32:(chunk + 1) * 32].zero_()
                b[chunk * 32:(chunk + 1) * 32].zero_()
    return model.eval().requires_grad_(False)


def _search(ctx, model, **options):
    crit = harness.create("criterion", "tinyfusion", **{**FAST, **options})
    units = [u for u in harness.discover_units(model) if u.removable]
    return crit, crit.score(model, units, ctx)


# -- (a) the learned mask drops the blocks that do nothing --------------------------------------
@pytest.mark.parametrize("identity", [(1, 2), (0, 3)])
def test_the_learned_mask_drops_identity_blocks(identity):
    ctx = _ctx()
    model = _trained_dit(ctx, identity=identity)
    crit, scores = _search(ctx, model, group=2, keep=1)
    dropped = [f"blocks.{i}" for i in identity]
    kept = [f"blocks.{i}" for i in range(4) if i not in identity]
    assert crit.details["removed"] == dropped and crit.details["kept"] == kept, crit.details["groups"]
    # the scores make any selection remove exactly those: kept = 1 + p(kept), dropped = p(kept) < 1
    assert max(scores[n] for n in dropped) < 1 <= min(scores[n] for n in kept)
    assert crit.details["steps"] == FAST["steps"] and len(crit.details["loss_curve"]) == 3
    for g in crit.details["groups"]:
        assert sum(g["masks"].values()) == pytest.approx(1.0, abs=1e-5) and g["probability"] == max(g["masks"].values())


# -- (b) the N:M pattern, and seeds ------------------------------------------------------------
def test_the_mask_keeps_n_of_every_m_and_is_seeded():
    ctx = _ctx(depth=8)
    model = _trained_dit(ctx)
    crit, _ = _search(ctx, model, group=4, keep=2, steps=12)
    assert crit.details["pattern"] == [[2, 4], [2, 4]]
    for g, names in zip(crit.details["groups"], (["blocks.0", "blocks.1", "blocks.2", "blocks.3"],
                                                 ["blocks.4", "blocks.5", "blocks.6", "blocks.7"])):
        assert g["units"] == names and len(g["kept"]) == 2 and set(g["kept"]) <= set(names)
        assert len(g["masks"]) == 6  # C(4, 2) candidate masks, all recorded
    again, _ = _search(_ctx(depth=8), model, group=4, keep=2, steps=12)
    assert again.details == crit.details  # same suite seed: same draws, same mask and probabilities
    other, _ = _search(_ctx(depth=8, seed=1), model, group=4, keep=2, steps=12)
    assert other.details["groups"] != crit.details["groups"]  # another seed draws otherwise


def test_groups_and_spread():
    assert stack_groups(["blocks.0", "blocks.1", "blocks.2", "a.blocks.0", "a.blocks.1"], 2) == [
        ["blocks.0", "blocks.1"], ["blocks.2"], ["a.blocks.0", "a.blocks.1"]]
    assert spread_keep([4] * 7, 14) == [2] * 7 and spread_keep([4] * 7, 16) == [3, 3, 2, 2, 2, 2, 2]
    assert spread_keep([2, 2, 3], 4) == [1, 1, 2]
    assert candidate_masks(4, 2).sum(1).tolist() == [2.0] * 6 and len(candidate_masks(14, 7)) == 3432
    with pytest.raises(harness.UserError, match="cannot keep 9 of 8"):
        spread_keep([4, 4], 9)


# -- (c) the model is left as it was -----------------------------------------------------------
def test_the_model_is_unchanged_after_the_search():
    ctx = _ctx()
    model = _trained_dit(ctx).train()
    model.blocks[0].attn.qkv.weight.requires_grad_(True)  # a flag of the caller's: kept as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    inputs = ctx.example_inputs(2, model=model, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    model.train()
    _search(ctx, model, group=2, keep=1, steps=5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules  # no LoRA module left behind
    assert not any(m._forward_hooks for m in model.modules())  # nor hook
    assert model.training and model.blocks[0].attn.qkv.weight.requires_grad
    assert not model.blocks[1].attn.qkv.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs), out)


def test_options_are_checked():
    with pytest.raises(harness.UserError, match="keep must be between 1 and group=2"):
        harness.create("criterion", "tinyfusion", keep=3)
    with pytest.raises(harness.UserError, match="tau"):
        harness.create("criterion", "tinyfusion", tau=[4, 0])
    ctx = _ctx()
    with pytest.raises(harness.UserError, match="needs the number of blocks to keep"):
        _search(ctx, ctx.model, steps=1)


# -- (d) through `harness run`: depth or ratio, then distill with masked KD ----------------------
SUITE = """\
suite: tf
seed: 0
base:
  backbone: {name: dit, size: tiny, input_size: 8, patch: 2, depth: 4, hidden_size: 32, num_heads: 2}
  data: {name: shapes, resolution: 8, size: 32}
  train: {steps: 2, batch_size: 4}
  distill: {losses: [{name: masked-kd, stride: 2}], steps: 2, batch_size: 4}
  metrics: [params]
  device: cpu
matrix:
  prune:
    - {criterion: {name: tinyfusion, steps: 6, batch_size: 4}, depth: 2}
    - {criterion: {name: tinyfusion, steps: 6, batch_size: 4}, ratio: 0.5}
    - {criterion: {name: tinyfusion, steps: 6, batch_size: 4}, ratio: 0.4}
"""


def test_tinyfusion_then_masked_kd_through_harness_run(tmp_path):
    suite = tmp_path / "tf.yaml"
    suite.write_text(SUITE)
    assert main(["run", str(suite), "--results", str(tmp_path / "r")]) == 0
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "r" / "tf").glob("*.json"))]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    # Each block holds 21% of the parameters (embedders and final layer hold the rest): depth 2
    # and ratio 0.4 remove two blocks, 1:2; ratio 0.5 needs a third, so one group keeps none.
    patterns = {r["prune"].get("depth", r["prune"].get("ratio")): r["prune"]["criterion_details"]["pattern"]
                for r in records}
    assert patterns == {2: [[1, 2], [1, 2]], 0.4: [[1, 2], [1, 2]], 0.5: [[1, 2], [0, 2]]}
    for r in records:
        prune, details = r["prune"], r["prune"]["criterion_details"]
        assert prune["criterion"] == "tinyfusion" and details["steps"] == 6
        assert sorted(prune["removed"]) == sorted(details["removed"]) == sorted(prune["plan"]["skip"])
        assert ("depth" in prune) != ("ratio" in prune) and prune["removed_params_ratio"] >= prune.get("ratio", 0)
        assert set(r["distill"]["shares"]["losses"]) == {"masked-kd"}
        # stride 2 on four blocks: the hidden states at blocks 1 and 3 (the ends of the 1:2 groups)
        assert set(r["distill"]["shares"]["features"]["masked-kd"]) == {"blocks.1", "blocks.3"}
        assert r["metrics"]["params"]["value"] == prune["params_after"]


# -- (e) masked KD against a direct computation ------------------------------------------------
def test_masked_kd_excludes_exactly_the_massive_activations():
    g = torch.Generator().manual_seed(0)
    s = {f"blocks.{i}": torch.rand(2, 16, 8, generator=g) * 2 - 1 for i in range(4)}
    t = {f"blocks.{i}": torch.rand(2, 16, 8, generator=g) * 2 - 1 for i in range(4)}
    planted = [(0, 3, 5), (1, 10, 0)]  # (sample, token, channel): a massive activation in each sample
    for feats in (s, t):
        for k in feats:
            for b, tok, ch in planted:
                feats[k][b, tok, ch] = 100.0
    t["blocks.2"][0, 7, 7] = -80.0  # in the teacher alone
    s_out, t_out, noise = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))

    from harness_compress.distill import massive_mask

    expected_mask = torch.ones(2, 16, 8, dtype=torch.bool)
    for b, tok, ch in planted:
        expected_mask[b, tok, ch] = False
    assert torch.equal(massive_mask(s["blocks.0"], 2.0), expected_mask)
    teacher_mask = expected_mask.clone()
    teacher_mask[0, 7, 7] = False
    assert torch.equal(massive_mask(t["blocks.2"], 2.0), teacher_mask)

    def direct(keys, alpha=0.9, beta=1e-2):
        feat = []
        for k in keys:
            mt = teacher_mask if k == "blocks.2" else expected_mask
            feat.append(((expected_mask * s[k] - mt * t[k]) ** 2).sum() / s[k].numel())
        return (alpha * ((s_out - t_out) ** 2).mean() + (1 - alpha) * ((s_out - noise) ** 2).mean()
                + beta * sum(feat) / len(feat))

    loss = harness.create("loss", "masked-kd")
    assert loss(s_out, t_out, noise, s, t).item() == pytest.approx(direct(list(s)).item(), rel=1e-6)
    strided = harness.create("loss", "masked-kd", stride=2, alpha=0.5, beta=1.0)
    assert strided(s_out, t_out, noise, s, t).item() == pytest.approx(
        direct(["blocks.1", "blocks.3"], 0.5, 1.0).item(), rel=1e-6)
    assert set(strided.terms(s, t)) == {"blocks.1", "blocks.3"}
    # unmasked, the planted values would dominate: the mask is what makes the term small
    assert loss.term(s["blocks.2"], t["blocks.2"]) < ((s["blocks.2"] - t["blocks.2"]) ** 2).mean()
    with pytest.raises(harness.UserError, match="masked-kd"):
        harness.create("loss", "masked-kd", alpha=2)


# -- (f) where the definition cannot apply: refused at validation, one line at its line --------------
@pytest.mark.parametrize("backbone,prune,message", [
    ("{name: unet, preset: adm-tiny}", "{criterion: tinyfusion, ratio: 0.3}",
     ":6: prune.criterion: criterion 'tinyfusion': TinyFusion learns which N of every M consecutive blocks"),
    ("{name: lamamba, size: tiny, input_size: 8}", "{criterion: tinyfusion, ratio: 0.3}",
     ":6: prune.criterion: criterion 'tinyfusion': on LaMamba-Diff the blocks of different stages differ"),
    ("{name: unet, preset: adm-tiny}", "{criterion: laptop, depth: 3}",
     ":6: prune.depth: prune.depth counts the blocks of a plain stack"),
])
def test_validation_refuses_where_it_cannot_apply(tmp_path, capsys, backbone, prune, message):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        suite: demo
        base:
          backbone: {backbone}
          metrics: [params]
          device: cpu
          prune: {prune}
        """))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}{message}" in err


def test_depth_and_ratio_are_exclusive(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("suite: d\nbase:\n  backbone: {name: dit, size: tiny}\n  metrics: [params]\n"
                    "  prune: {criterion: tinyfusion, ratio: 0.5, depth: 2}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "either ratio" in err and "depth" in err, err


def test_lamamba_groups_stay_within_a_stage():
    config = CellConfig.model_validate({"backbone": {"name": "lamamba", "size": "tiny", "input_size": 8,
                                                     "in_channels": 4, "num_classes": 3}, "metrics": ["params"],
                                        "device": "cpu"})
    ctx = CellContext("t", "cell", 0, config)
    model = ctx.model.eval()
    ctx.prune_keep = 9  # what the prune stage asks for with depth: 9 (of 13 blocks)
    crit, scores = _search(ctx, model, steps=3, batch_size=2)
    for g in crit.details["groups"]:  # encoder, mid and decoder stages hold 1 or 2 blocks: never mixed
        assert len({n.rsplit(".", 2)[0] for n in g["units"]}) == 1
    assert len(crit.details["kept"]) == 9 and len(crit.details["removed"]) == 4
    assert sorted(scores, key=scores.get)[:4] == sorted(crit.details["removed"], key=scores.get)


def test_lora_trains_the_share_of_dit_xl_the_readme_states():
    # VainF/TinyFusion's README: the trainable parameters for pruning are ~0.9% of the model
    # (rank 8 on every linear layer of DiT-XL/2); the logits add a few dozen more.
    from harness_compress.tinyfusion import lora_adapters

    with torch.device("meta"):
        model = harness.create("backbone", "dit", size="XL", input_size=32)
    adapters = lora_adapters(model, 8, 16, torch.Generator().manual_seed(0))
    share = sum(p.numel() for a in adapters.values() for p in a.parameters()) / sum(
        p.numel() for p in model.parameters())
    assert len(adapters) == 28 * 5 + 4 and share == pytest.approx(0.0089, abs=5e-5)


def test_a_keep_option_that_contradicts_the_prune_block_fails_the_cell(tmp_path):
    from harness.runner import CellJob, execute_cell

    config = {"backbone": {k: v for k, v in BACKBONE.items() if k != "learn_sigma"}, "metrics": ["params"],
              "device": "cpu", "prune": {"criterion": {"name": "tinyfusion", "keep": 1, "steps": 2, "batch_size": 2},
                                         "depth": 3, "calibration_batch": 2, "calibration_timesteps": 1}}
    record = execute_cell(CellJob("t", "t.yaml", "c1", "base", 0, config, str(tmp_path / "t")))
    assert record["status"] != "ok"
    assert "keep=1 of every 2 keeps 2 blocks, the prune block asks for 3" in json.dumps(record)


def test_gumbel_softmax_is_torchs_straight_through_estimator():
    # TinyFusion samples with torch.nn.functional.gumbel_softmax(hard=True); ours draws the same
    # Gumbel noise from a generator of its own (a fresh generator and the global one seeded alike
    # give the same stream): same one-hot values, same gradients to the logits.
    from harness_compress.tinyfusion import gumbel_softmax

    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)) * 3
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    torch.manual_seed(7)
    ref = torch.nn.functional.gumbel_softmax(a, tau=0.7, hard=True)
    ours = gumbel_softmax(b, 0.7, torch.Generator().manual_seed(7))
    assert torch.equal(ref, ours) and torch.equal(ours.sum(-1), torch.ones(5))
    (ref * w).sum().backward()
    (ours * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_lora_hook_adds_the_scaled_low_rank_update():
    # torchtune's LoRALinear (what TinyFusion attaches): W x + b + (alpha / rank) B A x, B zero at first
    from harness_compress.tinyfusion import lora_adapters

    layer = torch.nn.Linear(6, 5)
    (lora,) = lora_adapters(layer, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0)).values()
    x = torch.randn(3, 6)
    handle = layer.register_forward_hook(lora.hook)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # B = 0: the layer as it was
    with torch.no_grad():
        lora.b.normal_()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + 2.0 * x @ lora.a.T @ lora.b.T)
    handle.remove()


def test_depth_keeps_the_highest_scored_units_for_any_criterion(tmp_path):
    from harness.runner import CellJob, execute_cell

    config = {"backbone": {k: v for k, v in BACKBONE.items() if k != "learn_sigma"}, "metrics": ["params"],
              "device": "cpu", "prune": {"criterion": "random", "depth": 3, "calibration_batch": 2,
                                         "calibration_timesteps": 1}}
    record = execute_cell(CellJob("t", "t.yaml", "c1", "base", 0, config, str(tmp_path / "t")))
    assert record["status"] == "ok", record.get("error")
    prune = record["prune"]
    lowest = min(prune["scores"], key=prune["scores"].get)
    assert prune["depth"] == 3 and prune["removed"] == [lowest] and prune["plan"]["skip"] == [lowest]


class _ScoresAllButTheFirst(harness.Criterion):
    """Leaves the first unit unscored, as block-influence leaves out a unit outside its definition."""

    def score(self, model, units, ctx):
        return {u.name: float(i) for i, u in enumerate(units) if i > 0}


class _ScoresTheLastOnly(harness.Criterion):
    def score(self, model, units, ctx):
        return {units[-1].name: 0.0}


def _run_partial(tmp_path, criterion, depth):
    from harness.runner import CellJob, execute_cell

    class Plugin:
        @harness.hookimpl
        def harness_pruning_criteria(self):
            return {"partial-test": criterion}

    plugin = Plugin()
    harness.registry().register(plugin, name="partial-test")
    try:
        config = {"backbone": {k: v for k, v in BACKBONE.items() if k != "learn_sigma"}, "metrics": ["params"],
                  "device": "cpu", "prune": {"criterion": "partial-test", "depth": depth}}
        return execute_cell(CellJob("t", "t.yaml", f"d{depth}", "base", 0, config, str(tmp_path / f"d{depth}")))
    finally:
        harness.registry().unregister(plugin)


@pytest.mark.parametrize("depth", [1, 2])
def test_depth_never_removes_a_unit_the_criterion_left_unscored(tmp_path, depth):
    # of 4 blocks, 3 are scored: keeping 1 removes every scored block, keeping 2 the two lowest
    record = _run_partial(tmp_path, _ScoresAllButTheFirst, depth)
    assert record["status"] == "ok", record.get("error")
    scores, removed = record["prune"]["scores"], record["prune"]["removed"]
    assert len(scores) == 3 and removed == sorted(scores, key=scores.get)[:4 - depth]


def test_depth_beyond_what_the_criterion_scored_is_one_clear_error(tmp_path):
    record = _run_partial(tmp_path, _ScoresTheLastOnly, 1)
    assert record["status"] == "failed"
    assert "prune.depth 1: criterion 'partial-test' scored 1 of 4 units, too few to remove 3" in record["error"]
