"""Layer pruning and distillation of a cell's model (the ``prune`` / ``distill`` blocks).

The cell's ``train`` block describes the *teacher*: it is built and trained with seeds shared
by the whole suite and cached under ``<results>/<suite>/teachers/``, so every criterion and
every loss of a suite starts from the same teacher and it is trained once. Then:

1. prune: the criterion scores the removable units on a calibration batch, the selection
   removes ``ratio`` of the parameters (or GFLOPs) at the lowest summed score, and the
   one-shot output loss against the teacher is recorded (plus the additivity check);
2. distill: the student is retrained with the weighted losses, the teacher frozen, and the
   record keeps each term's share of the total loss;
3. the pruned model is saved as weights plus plan (``<workdir>/pruned/``), and becomes
   ``ctx.model``; the teacher stays at ``ctx.teacher`` for ``output_loss``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import UserError


def compress_cell(ctx) -> None:
    from harness_compress.calibration import (calibration_inputs, noise_channels, output_loss,
                                              reference_outputs)

    cfg = ctx.config
    teacher = _teacher(ctx).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    ctx.teacher = teacher
    plan = {"skip": [], "drop": []}
    if cfg.prune is not None:
        plan, info = prune(ctx, student, teacher, cfg.prune)
        batches = calibration_inputs(ctx, teacher, cfg.prune.calibration_batch, cfg.prune.calibration_timesteps)
        c = noise_channels(ctx)
        student.eval()
        info["one_shot_output_loss"] = output_loss(student, batches, reference_outputs(teacher, batches, c), c)
        ctx.extra["prune"] = info
    if cfg.distill is not None:
        student = distill(ctx, student, teacher, cfg.distill)
    ctx.model = student.eval()
    if ctx.workdir is not None and cfg.prune is not None:
        from harness_compress.units import save_pruned

        save_pruned(student, plan, Path(ctx.workdir) / "pruned")


# -- teacher ------------------------------------------------------------------------------------
def _teacher(ctx) -> torch.nn.Module:
    """The backbone built from a suite-wide seed, trained by ``train`` (cached per suite)."""
    cfg = ctx.config
    options = ctx.backbone_options  # may build the data set: not under the device context
    torch.manual_seed(ctx.seed("teacher-init", shared=True))
    with torch.device(ctx.device):
        model = ctx.registry.create("backbone", cfg.backbone.name, **options)
    if cfg.train.steps == 0:
        return model
    key = hashlib.sha256(json.dumps({"backbone": cfg.backbone.model_dump(), "data": cfg.data and cfg.data.model_dump(),
                                     "train": cfg.train.model_dump(), "seed": ctx.suite_seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = Path(ctx.workdir).parent / "teachers" / f"{key}.safetensors" if ctx.workdir else None
    if cache is not None and cache.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(cache), device=str(ctx.device)))
        ctx.extra["teacher"] = {"cache": str(cache), "trained_here": False}
        return model
    from .training import train_model

    result = train_model(ctx, model, cfg.train, tag="teacher")
    model = result.pop("ema")
    ctx.extra["teacher"] = {"cache": str(cache) if cache else None, "trained_here": True, **result}
    if cache is not None:
        from harness_compress.units import _untie
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")  # id() can repeat across processes
        save_file(_untie({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}), str(tmp))
        tmp.replace(cache)  # atomic: a parallel cell never reads a torn file
        from .training import _ckpt_path

        _ckpt_path(ctx, "teacher").unlink(missing_ok=True)  # only a killed training needs it
    return model


# -- prune --------------------------------------------------------------------------------------
def prune(ctx, student: torch.nn.Module, teacher: torch.nn.Module, spec) -> tuple[dict, dict]:
    """Choose and remove units from ``student`` in place; return (plan, record)."""
    from harness_compress.calibration import removed
    from harness_compress.selection import additivity, select_units
    from harness_compress.units import apply_plan, bksdm_plan, discover

    total_params = sum(p.numel() for p in student.parameters())
    units = discover(student)
    candidates = [u for u in units if u.removable]
    info: dict = {"params_before": total_params, "units": len(units), "removable": len(candidates),
                  "unremovable": {u.name: u.reason for u in units if not u.removable}}
    if spec.preset is not None:
        plan = bksdm_plan(student, spec.preset)
        info.update(preset=spec.preset)
    else:
        if not candidates:
            raise UserError(f"{type(student).__name__} has no removable unit to prune")
        crit_spec = spec.criterion_spec()
        comp = ctx.registry.get("criterion", crit_spec.name)
        options = dict(crit_spec.options)
        accepted = comp.defaults()
        for key, value in (("batch_size", spec.calibration_batch), ("timesteps", spec.calibration_timesteps)):
            if key in accepted:
                options.setdefault(key, value)
        criterion = comp(**options)
        student.eval()
        scores = criterion.score(student, candidates, ctx)
        if spec.budget == "params":
            weights = {u.name: float(u.params) for u in candidates}
            total = float(total_params)
        else:
            weights, total = unit_flops(ctx, student, candidates)
        from harness_compress.units import conflicts, merge_plans

        clashes = [(a.name, b.name) for i, a in enumerate(candidates) for b in candidates[i + 1:] if conflicts(a, b)]
        chosen = select_units(scores, weights, spec.ratio * total, spec.selection, clashes)
        plan = merge_plans([u for u in candidates if u.name in chosen])
        info.update(criterion=crit_spec.name, ratio=spec.ratio, budget=spec.budget, selection=spec.selection,
                    budget_total=total, budget_removed=sum(weights[n] for n in chosen), scores=scores)
        if spec.additivity:
            info["additivity"] = _additivity(ctx, student, candidates, scores if crit_spec.name == "laptop" else None,
                                             spec, removed)
    apply_plan(student, plan)
    after = sum(p.numel() for p in student.parameters())
    info.update(removed=chosen if spec.preset is None else [], plan=plan, params_after=after, removed_params_ratio=1 - after / total_params)
    return plan, info


def _additivity(ctx, model, candidates, laptop_scores, spec, removed) -> dict:
    from harness_compress.calibration import calibration_inputs, noise_channels, output_loss, reference_outputs
    from harness_compress.criteria import Laptop
    from harness_compress.selection import additivity

    from harness_compress.units import conflicts

    by_name = {u.name: u for u in candidates}
    names = list(by_name)
    single = laptop_scores or Laptop(spec.calibration_batch, spec.calibration_timesteps).score(model, candidates, ctx)
    batches = calibration_inputs(ctx, model, spec.calibration_batch, spec.calibration_timesteps)
    c = noise_channels(ctx)
    refs = reference_outputs(model, batches, c)

    def compatible(chosen):  # a random subset may name two units that share a module: keep the first
        kept = []
        for n in chosen:
            if not any(conflicts(by_name[n], by_name[k]) for k in kept):
                kept.append(n)
        return kept

    def loss_of_set(chosen):
        with removed(model, [by_name[n] for n in chosen]) as pruned:
            return output_loss(pruned, batches, refs, c)

    return additivity(names, single, loss_of_set, subsets=spec.additivity, compatible=compatible,
                      seed=ctx.seed("additivity", shared=True) % (2 ** 32))


def unit_flops(ctx, model: torch.nn.Module, units: list) -> tuple[dict[str, float], float]:
    """fvcore multiply-adds of each unit, and of the whole model, at batch 1: one count (on the
    meta device) and its per-module breakdown, whatever the number of units. A skip pair
    weighs what both its modules do (it was weighed 0 when looked up by its joined name)."""
    from .flops import count_flops

    inputs = ctx.example_inputs(1, model=model, generator=ctx.generator("flops-inputs", shared=True))
    was_training = model.training
    try:
        fc = count_flops(model.eval(), inputs, ctx.registry.flop_handles())
    finally:
        model.train(was_training)
    return {u.name: float(sum(fc.modules.get(m, 0) for m in u.covers)) for u in units}, float(fc.total)


# -- distill ------------------------------------------------------------------------------------
def distill(ctx, student: torch.nn.Module, teacher: torch.nn.Module, spec) -> torch.nn.Module:
    from harness_compress.calibration import noise_channels
    from harness_compress.distill import DistillObjective

    from .training import train_model

    terms = spec.terms()
    losses = [(ctx.registry.create("loss", t.name, **t.options), t.weight) for t in terms]
    objective = DistillObjective(losses, noise_channels(ctx), teacher=teacher, features=spec.features)
    update = {"steps": spec.steps, "ema": spec.ema}
    if spec.batch_size:
        update["batch_size"] = spec.batch_size
    if spec.lr:
        update["lr"] = spec.lr
    train_spec = ctx.config.train.model_copy(update=update)
    student.requires_grad_(True)
    try:
        result = train_model(ctx, student, train_spec, loss_fn=objective, teacher=teacher, tag="distill")
    finally:
        objective.close()
    student = result.pop("ema")
    ctx.extra["distill"] = {"losses": [{"name": t.name, "weight": t.weight, **t.options} for t in terms],
                            "shares": objective.shares(), **result}
    return student
