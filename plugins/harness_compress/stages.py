"""The ``prune`` and ``distill`` stages: layer pruning and distillation of a cell's model.

The cell's ``train`` block describes the *teacher*: it is built and trained with seeds shared
by the whole suite and cached under ``<results>/<suite>/teachers/``, so every criterion and
every loss of a suite starts from the same teacher and it is trained once. Both stages
replace the ``train`` stage (they train the teacher themselves). Then:

1. prune: the criterion scores the removable units on a calibration batch, the selection
   removes ``ratio`` of the parameters (or GFLOPs) at the lowest summed score, or keeps the
   ``depth`` highest-scored units, and the one-shot output loss against the teacher is
   recorded (plus the additivity check). Before scoring, ``ctx.prune_keep`` says how many
   units the selection will keep (None when a ratio over units of unequal weight leaves it
   open): a criterion that learns the kept set itself (``tinyfusion``) aims at it, and its
   ``details`` (the record's ``criterion_details``) must remove exactly what the selection does;
2. distill (after prune): the student (the pruned model, else a copy of the teacher) is
   retrained with the weighted losses, the teacher frozen, and the record keeps each term's
   share of the total loss;
3. the pruned model is saved as weights plus plan (``<workdir>/pruned/``) and becomes
   ``ctx.model``; the teacher stays at ``ctx.teacher`` for ``output_loss`` and the
   text-to-image scores.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness import (DEFAULT_CONVENTION, ComponentSpec, Stage, UserError, apply_plan, calibration_inputs,
                     noise_channels, output_loss, reference_outputs, registry, suggest, train_model,
                     training_checkpoint)

from .calibration import stage_calibration
from .units import BKSDM_PRESETS, bksdm_plan, bksdm_reference, save_pruned, untie


# -- the blocks ---------------------------------------------------------------------------------
class PruneSpec(BaseModel):
    """Layer pruning: a criterion scores the units, a selection removes ``ratio`` of the budget
    or keeps ``depth`` units (the highest scored); or a fixed ``preset`` (BK-SDM's handcrafted removals)."""

    model_config = ConfigDict(extra="forbid")
    criterion: Optional[Union[str, ComponentSpec]] = None
    preset: Optional[Literal["bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny"]] = None
    ratio: Optional[float] = Field(None, gt=0, lt=1)
    depth: Optional[int] = Field(None, ge=1)  # units to keep, of a plain stack of blocks (DiT, LaMamba-Diff)
    budget: Literal["params", "gflops"] = "params"
    # how budget: gflops counts (harness.flops.CONVENTIONS): BK-SDM-style papers weigh thop's MACs
    convention: Optional[Literal["fvcore", "thop"]] = None
    selection: Literal["knapsack", "greedy"] = "knapsack"
    additivity: int = Field(0, ge=0)  # random subsets for the additivity check (0: skip)
    calibration_batch: int = Field(8, gt=0)
    calibration_timesteps: int = Field(8, gt=0)
    # text U-Nets: calibrate on encoded prompts (a prompt file, and the hub id or folder of a
    # pipeline whose tokenizer and text encoder(s) encode them) instead of a random context
    calibration_prompts: Optional[str] = None
    calibration_pipeline: Optional[str] = None

    @field_validator("calibration_prompts")
    @classmethod
    def _exists(cls, v):
        if v is not None and not Path(v).exists():  # now, not after the teacher has trained
            raise ValueError(f"prompt file {v!r} not found (paths are relative to the directory harness runs in)")
        return v

    @field_validator("criterion")
    @classmethod
    def _known(cls, v):
        spec = ComponentSpec(name=v) if isinstance(v, str) else v
        if spec is not None:
            try:
                registry().get("criterion", spec.name).check_options(spec.options)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _paired(cls, v):  # before the fields: a lone prompt file is this mistake, whether or not it exists
        if isinstance(v, dict) and (v.get("calibration_prompts") is None) != (v.get("calibration_pipeline") is None):
            raise ValueError("calibration_prompts and calibration_pipeline go together (prompts, and the "
                             "pipeline whose text encoder encodes them)")
        return v

    @model_validator(mode="after")
    def _one_way(self):
        if (self.criterion is None) == (self.preset is None):
            raise ValueError("give either criterion (with ratio or depth) or preset")
        if self.criterion is not None and (self.ratio is None) == (self.depth is None):
            raise ValueError("a criterion needs either ratio (the fraction of the budget to remove, 0 < ratio < 1) "
                             "or depth (the number of units to keep), not both")
        if self.preset is not None and self.depth is not None:
            raise ValueError("a preset fixes what is removed: it takes no depth")
        if self.convention is not None and (self.budget != "gflops" or self.preset is not None):
            raise ValueError("convention says how budget: gflops counts; this block has no GFLOPs budget")
        return self

    def criterion_spec(self) -> Optional[ComponentSpec]:
        c = self.criterion
        return ComponentSpec(name=c) if isinstance(c, str) else c


class DistillTerm(ComponentSpec):
    """``{name: loss, weight: 1.0, **options}``."""

    weight: float = 1.0

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DistillSpec(BaseModel):
    """Retraining of the student against the teacher; a bare list means ``losses``."""

    model_config = ConfigDict(extra="forbid")
    losses: list[Union[str, DistillTerm]] = Field(min_length=1)
    steps: int = Field(100, ge=0)
    batch_size: Optional[int] = Field(None, gt=0)
    lr: Optional[float] = Field(None, gt=0)
    ema: Optional[float] = Field(0.0, ge=0, lt=1)  # 0: the EMA is the weights (a short retraining's EMA lags)
    features: Optional[list[str]] = None  # teacher module names; default: every stage output

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, v):
        return {"losses": v} if isinstance(v, list) else v

    @field_validator("losses")
    @classmethod
    def _known(cls, v):
        for term in v:
            spec = DistillTerm(name=term) if isinstance(term, str) else term
            try:
                registry().get("loss", spec.name).check_options(spec.options)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return v

    def terms(self) -> list[DistillTerm]:
        return [DistillTerm(name=t) if isinstance(t, str) else t for t in self.losses]


# -- the stages ---------------------------------------------------------------------------------
def prune_cell(ctx, spec: PruneSpec) -> None:
    teacher = build_teacher(ctx).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    ctx.teacher = teacher
    plan, info = prune(ctx, student, teacher, spec)
    batches = calibration_inputs(ctx, teacher)
    c = noise_channels(ctx)
    student.eval()
    info["one_shot_output_loss"] = output_loss(student, batches, reference_outputs(teacher, batches, c), c)
    ctx.extra["prune"] = info
    ctx.model = student
    ctx.pruning_plan = plan
    _save(ctx)
    if ctx.workdir is not None:  # what apply() rebuilds this structure from (the other ranks of a torchrun)
        info["apply"] = str(Path(ctx.workdir) / "pruned")


def distill_cell(ctx, spec: DistillSpec) -> None:
    teacher = ctx.teacher
    if teacher is None:  # distillation alone: the student starts as a copy of the teacher
        teacher = build_teacher(ctx).eval().requires_grad_(False)
        ctx.teacher = teacher
        student = copy.deepcopy(teacher).requires_grad_(True)
    else:
        student = ctx.model
    ctx.model = distill(ctx, student, teacher, spec).eval()
    _save(ctx)


def _save(ctx) -> None:
    """The pruned model as weights plus plan; after distillation, its retrained weights."""
    plan = getattr(ctx, "pruning_plan", None)
    if ctx.workdir is not None and plan is not None:
        save_pruned(ctx.model, plan, Path(ctx.workdir) / "pruned")


def apply(model: torch.nn.Module, value: str) -> dict:
    """``harness flops --prune``: a BK-SDM preset name, or a plan (``plan.json``, or the folder a
    pruned model was saved to), applied to ``model`` in place."""
    before = sum(p.numel() for p in model.parameters())
    if value in BKSDM_PRESETS:
        apply_plan(model, bksdm_plan(model, value))
    else:
        path = Path(value)
        if path.is_dir():
            path = path / "plan.json"
        if not path.is_file():
            raise UserError(f"--prune {value!r}: neither a preset{suggest(value, BKSDM_PRESETS)} nor a plan file")
        try:
            plan = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"--prune {value}: not a JSON plan ({exc})") from None
        apply_plan(model, plan)
    out: dict = {}
    reference = bksdm_reference(value, before, sum(p.numel() for p in model.parameters()))
    if reference:
        out["bk_sdm_published"] = reference
        out["summary"] = (f"BK-SDM publishes {reference['published_b']:.2f}B (rounded up to 0.01B); here "
                          f"{reference['ours_b']:.2f}B: {'matches' if reference['match'] else 'DOES NOT MATCH'}")
    return out


def check(config, spec: PruneSpec) -> None:
    """Whether the block applies to this backbone: ``depth`` counts the blocks of a plain stack
    (no U-Net), and the criterion's own ``check(config)``, when it has one."""
    if spec.depth is not None and config.backbone.name == "unet":
        err = UserError("prune.depth counts the blocks of a plain stack (DiT, LaMamba-Diff); backbone "
                        "'unet' has units that overlap (skip pairs) and differ in kind: use ratio")
        err.option = "depth"
        raise err
    crit = spec.criterion_spec()
    if crit is None:
        return
    applies = getattr(registry().get("criterion", crit.name).factory, "check", None)
    if applies is not None:
        try:
            applies(config)
        except UserError as exc:
            err = UserError(f"criterion {crit.name!r}: {exc}")
            err.option = "criterion"
            raise err from None


STAGES = {
    "prune": Stage(schema=PruneSpec, run=prune_cell, after=("train",), replaces=("train",), apply=apply, check=check,
                   description="layer pruning: a criterion and a budget, or a BK-SDM preset"),
    "distill": Stage(schema=DistillSpec, run=distill_cell, after=("train", "prune"), replaces=("train",),
                     description="retrain the student against the teacher with weighted losses"),
}


# -- teacher ------------------------------------------------------------------------------------
def build_teacher(ctx) -> torch.nn.Module:
    """The backbone built from a suite-wide seed, trained by ``train`` (cached per suite)."""
    cfg, train = ctx.config, ctx.train
    options = ctx.backbone_options  # may build the data set: not under the device context
    torch.manual_seed(ctx.seed("teacher-init", shared=True))
    with torch.device(ctx.device):
        model = ctx.registry.create("backbone", cfg.backbone.name, **options)
    if train.steps == 0:
        return model
    key = hashlib.sha256(json.dumps({"backbone": cfg.backbone.model_dump(), "data": cfg.data and cfg.data.model_dump(),
                                     "train": train.model_dump(), "seed": ctx.suite_seed},
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = Path(ctx.workdir).parent / "teachers" / f"{key}.safetensors" if ctx.workdir else None
    if cache is not None and cache.is_file():
        from harness import load_cache

        state = load_cache(cache, device=str(ctx.device))  # None when torn or changed: trained again
        if state is not None and set(state) == set(model.state_dict()):
            model.load_state_dict(state)
            ctx.extra["teacher"] = {"cache": str(cache), "trained_here": False}
            return model
    result = train_model(ctx, model, train, tag="teacher")
    model = result.pop("ema")
    ctx.extra["teacher"] = {"cache": str(cache) if cache else None, "trained_here": True, **result}
    if cache is not None:
        from harness import save_cache

        # atomic, with a digest of its content: a parallel cell never reads a torn file, nor anyone a changed one
        save_cache(cache, untie({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}),
                   what=f"the teacher cache {cache.name}")
        training_checkpoint(ctx, "teacher").unlink(missing_ok=True)  # only a killed training needs it
    return model


# -- prune --------------------------------------------------------------------------------------
def prune(ctx, student: torch.nn.Module, teacher: torch.nn.Module, spec) -> tuple[dict, dict]:
    """Choose and remove units from ``student`` in place; return (plan, record)."""
    from harness import conflicts, discover_units, merge_plans

    from .selection import select_units

    ctx.calibration = stage_calibration(spec)  # what every criterion scores on
    total_params = sum(p.numel() for p in student.parameters())
    units = discover_units(student)
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
        criterion = ctx.registry.create("criterion", crit_spec.name, **crit_spec.options)
        clashes = [(a.name, b.name) for i, a in enumerate(candidates) for b in candidates[i + 1:] if conflicts(a, b)]
        if spec.budget == "params":
            weights = {u.name: float(u.params) for u in candidates}
            total = float(total_params)
        else:
            weights, total = unit_flops(ctx, student, candidates, spec.convention or DEFAULT_CONVENTION)
        if spec.depth is not None:
            if clashes:
                raise UserError(f"prune.depth counts the blocks of a plain stack; the units of "
                                f"{type(student).__name__} overlap (U-Net skip pairs): use prune.ratio")
            if spec.depth >= len(candidates):
                raise UserError(f"prune.depth {spec.depth}: the model has only {len(candidates)} removable units")
        # What a criterion that learns the kept set itself (tinyfusion) must aim at: the units the
        # selection will keep (a ratio only says so when every unit weighs the same).
        removing = _removed_count(spec, candidates, weights, total)
        if removing is not None and removing > len(candidates):  # before a criterion's costly search
            raise UserError(f"pruning budget not reachable: prune.ratio {spec.ratio} is more than all "
                            f"{len(candidates)} removable units hold; lower prune.ratio")
        ctx.prune_keep = None if removing is None else len(candidates) - removing
        student.eval()
        scores = criterion.score(student, candidates, ctx)
        if spec.depth is not None:
            # a unit the criterion left unscored (outside its definition) is never removed
            scored = [i for i, u in enumerate(candidates) if u.name in scores]
            if len(scored) < len(candidates) - spec.depth:
                raise UserError(f"prune.depth {spec.depth}: criterion {crit_spec.name!r} scored {len(scored)} of "
                                f"{len(candidates)} units, too few to remove {len(candidates) - spec.depth}")
            order = sorted(scored, key=lambda i: (scores[candidates[i].name], i))
            chosen = [candidates[i].name for i in sorted(order[:len(candidates) - spec.depth])]
            info.update(criterion=crit_spec.name, depth=spec.depth, scores=scores)
        else:
            chosen = select_units(scores, weights, spec.ratio * total, spec.selection, clashes)
            info.update(criterion=crit_spec.name, ratio=spec.ratio, budget=spec.budget, selection=spec.selection,
                        **({"convention": spec.convention or DEFAULT_CONVENTION} if spec.budget == "gflops" else {}),
                        budget_total=total, budget_removed=sum(weights[n] for n in chosen), scores=scores)
        plan = merge_plans([u for u in candidates if u.name in chosen])
        details = getattr(criterion, "details", None)
        if details:
            info["criterion_details"] = details
            learned = details.get("removed")
            if learned is not None and set(learned) != set(chosen):
                raise UserError(f"criterion {crit_spec.name!r} learned to remove {sorted(learned)}, the "
                                f"{spec.budget} budget removes {sorted(chosen)}: give prune.depth instead of ratio")
        if spec.additivity:
            info["additivity"] = _additivity(ctx, student, candidates, scores if crit_spec.name == "laptop" else None,
                                             spec)
    apply_plan(student, plan)
    after = sum(p.numel() for p in student.parameters())
    info.update(removed=chosen if spec.preset is None else [], plan=plan, params_after=after, removed_params_ratio=1 - after / total_params)
    return plan, info


def _removed_count(spec, candidates, weights, total) -> Optional[int]:
    """How many units the stage removes: ``depth`` says it; a ``ratio`` only when every unit
    weighs the same (then the fewest that reach the budget); else None."""
    if spec.depth is not None:
        return len(candidates) - spec.depth
    w = {weights[u.name] for u in candidates}
    if len(w) != 1 or not next(iter(w)):
        return None
    return math.ceil(spec.ratio * total / next(iter(w)) - 1e-9)


def _additivity(ctx, model, candidates, laptop_scores, spec) -> dict:
    from harness import conflicts, remove_units

    from .criteria import Laptop
    from .selection import additivity

    by_name = {u.name: u for u in candidates}
    names = list(by_name)
    single = laptop_scores or Laptop().score(model, candidates, ctx)
    batches = calibration_inputs(ctx, model)
    c = noise_channels(ctx)
    refs = reference_outputs(model, batches, c)

    def compatible(chosen):  # a random subset may name two units that share a module: keep the first
        kept = []
        for n in chosen:
            if not any(conflicts(by_name[n], by_name[k]) for k in kept):
                kept.append(n)
        return kept

    def loss_of_set(chosen):
        with remove_units(model, [by_name[n] for n in chosen]) as pruned:
            return output_loss(pruned, batches, refs, c)

    return additivity(names, single, loss_of_set, subsets=spec.additivity, compatible=compatible,
                      seed=ctx.seed("additivity", shared=True) % (2 ** 32))


def unit_flops(ctx, model: torch.nn.Module, units: list,
               convention: str = DEFAULT_CONVENTION) -> tuple[dict[str, float], float]:
    """Multiply-adds of each unit, and of the whole model, at batch 1 in ``convention`` (fvcore's
    or thop's): one count (on the meta device) and its per-module breakdown, whatever the number
    of units. A skip pair weighs what both its modules do (it was weighed 0 when looked up by
    its joined name)."""
    from harness import count_flops

    inputs = ctx.example_inputs(1, model=model, generator=ctx.generator("flops-inputs", shared=True))
    was_training = model.training
    try:
        fc = count_flops(model.eval(), inputs, ctx.registry.flop_handles(), convention=convention)
    finally:
        model.train(was_training)
    return {u.name: float(sum(fc.modules.get(m, 0) for m in u.modules)) for u in units}, float(fc.total)


# -- distill ------------------------------------------------------------------------------------
def distill(ctx, student: torch.nn.Module, teacher: torch.nn.Module, spec) -> torch.nn.Module:
    from .distill import DistillObjective

    terms = spec.terms()
    losses = [(t.name, ctx.registry.create("loss", t.name, **t.options), t.weight) for t in terms]
    objective = DistillObjective(losses, noise_channels(ctx), teacher=teacher, features=spec.features)
    update = {"steps": spec.steps, "ema": spec.ema}
    if spec.batch_size:
        update["batch_size"] = spec.batch_size
    if spec.lr:
        update["lr"] = spec.lr
    train_spec = ctx.train.model_copy(update=update)
    student.requires_grad_(True)
    try:
        result = train_model(ctx, student, train_spec, loss_fn=objective, teacher=teacher, tag="distill")
    finally:
        objective.close()
    student = result.pop("ema")
    ctx.extra["distill"] = {"losses": [{"name": t.name, "weight": t.weight, **t.options} for t in terms],
                            "shares": objective.shares(), **result}
    return student
