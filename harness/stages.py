"""Stages: the work a cell does to its model before it is measured (training, pruning,
distillation, a third party's quantisation).

A stage owns one top-level block of a cell's configuration (``train:``, ``prune:``...) and
is registered by a plugin through :func:`harness.hookspecs.harness_stages`. The core knows
no stage by name: it validates each block with the stage's schema, orders the stages a cell
uses by their ``after`` declarations, and runs them on the :class:`harness.context.CellContext`
before the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel

from .errors import PluginError, UserError


@dataclass(frozen=True)
class Stage:
    """One method a suite can apply to a cell's model.

    Attributes:
        schema: pydantic model of the block; its errors are reported with the suite's file,
            line and key like any other. A stage whose block may be a bare list or value
            converts it in a ``model_validator(mode="before")``.
        run: ``run(ctx, spec)``: transform ``ctx.model`` (or replace it) and put what the
            record should keep in ``ctx.extra``; ``spec`` is the validated block.
        after: stages that run before this one when the cell has both.
        replaces: stages this one takes over when the cell has both (pruning trains the
            teacher the ``train`` block describes itself, so ``train`` does not run).
        active: ``active(spec) -> bool``: whether a given block asks for any work
            (``train: {steps: 0}`` does not); default: always.
        apply: optional ``apply(model, value) -> dict``, the stage's result applied outside a
            suite, in place (``harness flops --prune PLAN``); returns what to report. A stage
            that records the value rebuilding its result's structure as ``ctx.extra[name]["apply"]``
            lets the other ranks of a run rebuild it instead of repeating the stage (see
            ``every_rank``).
        description: one line for ``harness ls stage``.
        every_rank: the stage shares its work over the ranks of a torch.distributed group
            itself (the ``sample`` stage). Under several ranks (``torchrun ... harness run``) the
            stages before the cell's first such stage run once, on rank 0; every other rank
            builds the backbone, calls ``apply(model, ctx.extra[name]["apply"])`` of each of
            them that recorded a value, and receives rank 0's weights. A stage without ``apply``
            is taken to change weights only (training, distillation): the weights carry its
            result. When a rank's model still differs in structure from rank 0's (parameter
            names, shapes, dtypes), that rank runs those stages itself, then takes rank 0's
            weights. Then every rank runs this stage and the ones after it; metrics run on rank 0.
            Such a stage runs after every stage of the cell that is not one (see :func:`order`).
        costs: optional ``costs(config, spec, model_gflops, input_size) -> dict[str, str] | None``,
            what the block will cost before anything runs, for ``harness validate --costs``:
            ``config`` is the cell's :class:`harness.CellConfig`, ``model_gflops`` the backbone's
            GFLOPs per image as the suite builds it (None when it cannot be counted on meta) and
            ``input_size`` its input side. The returned columns (column title -> text, a
            ``note`` column last) make one row of the block's cost table.
        check: optional ``check(config, spec) -> None``, called when the suite is validated,
            after the cell's backbone, data and metrics are known to exist: raise
            :class:`harness.UserError` with one line when the block cannot apply to this cell
            (a method defined for U-Nets on a DiT). ``config`` is the cell's
            :class:`harness.CellConfig`, ``spec`` the validated block. The error is shown at
            the block's line, or at its key ``exc.option`` when the error sets one.
    """

    schema: type[BaseModel]
    run: Callable[[Any, Any], None]
    after: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    active: Optional[Callable[[Any], bool]] = None
    apply: Optional[Callable[[Any, Any], dict]] = None
    description: str = field(default="")
    every_rank: bool = False
    costs: Optional[Callable[[Any, Any, Optional[float], int], Optional[dict]]] = None
    check: Optional[Callable[[Any, Any], None]] = None

    def wants(self, spec: Any) -> bool:
        return True if self.active is None else bool(self.active(spec))


def order(stages: dict[str, Stage], specs: dict[str, Any]) -> list[str]:
    """The stages a cell runs, in order: those whose block is present and asks for work,
    less those another such stage replaces, each after the ones it names in ``after``
    (ties in name order, so the order never depends on a suite's key order). A stage that
    runs on every rank (``every_rank``: it uses the finished model, as ``sample`` does) comes
    after every stage that does not."""
    names = sorted(n for n in specs if n in stages and stages[n].wants(specs[n]))
    replaced = {r for n in names for r in stages[n].replaces}
    todo = [n for n in names if n not in replaced]
    done: list[str] = []
    while todo:
        models_left = any(not stages[n].every_rank for n in todo)
        ready = [n for n in todo if all(a not in todo for a in stages[n].after)
                 and not (stages[n].every_rank and models_left)]
        if not ready:
            raise PluginError(f"stages {', '.join(todo)} name each other in 'after': no order runs them")
        done.append(ready[0])
        todo.remove(ready[0])
    return done


def run_stages(ctx, specs: dict[str, Any], stages: dict[str, Stage]) -> list[str]:
    """Run the cell's stages on ``ctx`` in order; return the names of those that ran."""
    ran = order(stages, specs)
    for name in ran:
        stages[name].run(ctx, specs[name])
    return ran


def split_applications(args: list[str], stages: dict[str, Stage]) -> tuple[dict[str, str], list[str]]:
    """``--STAGE VALUE`` (or ``--STAGE=VALUE``) pairs for the given stages, taken out of a
    command line's extra arguments: ``({stage: value}, the other arguments)``. The value is
    kept as typed (a plan's path, a preset's name) for the stage's ``apply``."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in stages:
            if not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise UserError(f"--{key} needs a value (what the {key!r} stage applies)")
                value, i = args[i + 1], i + 1
            found[key] = value
        else:
            rest.append(arg)
        i += 1
    return found, rest
