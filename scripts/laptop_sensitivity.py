"""How robust is a one-shot pruning ranking? Replicates one prune cell of a suite over seeds,
teacher training budgets and calibration sizes, and measures every criterion's held-out
output loss (the ``output_loss`` metric, as the suite records it).

    python scripts/laptop_sensitivity.py suites/compression.yaml --backbone unet --ratio 0.5 \\
        --seeds 0 1 2 --teacher-steps 100 400 --calibration 8x4 32x16 --out /tmp/sens

Teachers are trained once per (seed, steps) and cached under ``--out``; the table goes to
stdout and every row (with the chosen units) to ``--out/sensitivity.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import pandas as pd

from harness import CellConfig, CellContext, UserError, load_suite
from harness_compress.metrics import OutputLoss
from harness_compress.stages import PruneSpec, build_teacher, prune

CRITERIA = ("laptop", "random", "magnitude", "taylor", "similarity", "bk-sdm")


def prune_cell(suite, backbone: str, ratio: float):
    for cell in suite.cells():
        cfg = cell.parsed()
        spec = PruneSpec.model_validate(cfg.blocks["prune"]) if "prune" in cfg.blocks else None
        if cfg.backbone.name == backbone and spec and spec.ratio == ratio and "distill" not in cfg.blocks:
            return cell, cfg, spec
    raise UserError(f"{suite.source}: no prune cell with backbone {backbone!r} and ratio {ratio}")


def calibration(text: str) -> tuple[int, int]:
    try:
        batch, steps = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxTIMESTEPS, e.g. 32x16") from None
    return batch, steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite")
    p.add_argument("--backbone", default="unet")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-steps", type=int, nargs="+", help="default: the suite's train.steps")
    p.add_argument("--calibration", type=calibration, nargs="+", help="BATCHxTIMESTEPS (default: the suite's)")
    p.add_argument("--eval", type=calibration, help="held-out BATCHxTIMESTEPS (default: the suite's output_loss)")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        suite = load_suite(args.suite)
        cell, cfg, prune_spec = prune_cell(suite, args.backbone, args.ratio)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    criteria = [c for c in args.criteria if not (c == "bk-sdm" and args.backbone != "unet")]
    metric = next((m for m in cfg.metric_specs() if m.name == "output_loss"), None)
    options = dict(metric.options if metric else {})
    if args.eval:
        options.update(batch_size=args.eval[0], timesteps=args.eval[1])
    output_loss = OutputLoss(**options)
    rows = []
    for seed in args.seeds:
        train = cfg.blocks.get("train") or {}
        for steps in args.teacher_steps or [train.get("steps", 0)]:
            run_cfg = CellConfig.model_validate({**cfg.model_dump(), "train": {**train, "steps": steps}})
            # one folder per teacher: a teacher's training checkpoint must not resume another's
            workdir = args.out / f"seed{seed}-steps{steps}" / suite.name / cell.id
            ctx = CellContext(suite.name, cell.id, seed, run_cfg, workdir=workdir)
            teacher = build_teacher(ctx).eval().requires_grad_(False)
            default = [(prune_spec.calibration_batch, prune_spec.calibration_timesteps)]
            for batch, timesteps in args.calibration or default:
                for name in criteria:
                    t0 = time.perf_counter()
                    spec = prune_spec.model_copy(update={"criterion": name, "calibration_batch": batch,
                                                        "calibration_timesteps": timesteps, "additivity": 0})
                    student = copy.deepcopy(teacher)
                    _, info = prune(ctx, student, teacher, spec)
                    ctx.teacher, ctx.model = teacher, student.eval()
                    rows.append({"seed": seed, "teacher_steps": steps, "calibration": f"{batch}x{timesteps}",
                                 "criterion": name, "output_loss": output_loss(ctx)["value"],
                                 "removed_params": info["removed_params_ratio"], "removed": sorted(info["removed"]),
                                 "seconds": round(time.perf_counter() - t0, 1)})
                    print(f"seed {seed} teacher {steps} steps calibration {batch}x{timesteps} {name}: "
                          f"{rows[-1]['output_loss']:.5f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(rows, indent=1))
    df = pd.DataFrame(rows)
    order = list(dict.fromkeys(df["calibration"]))  # as given, not sorted as strings
    df["calibration"] = pd.Categorical(df["calibration"], categories=order, ordered=True)
    table = df.pivot_table(index=["teacher_steps", "calibration", "seed"], columns="criterion",
                           values="output_loss", aggfunc="first", observed=True)[criteria]
    best = table[criteria].min(axis=1)
    table["lowest"] = [" = ".join(c for c in criteria if row[c] <= low * (1 + 1e-9)) for (_, row), low
                       in zip(table.iterrows(), best)]  # a tie names every criterion in it
    ranks = table[criteria].rank(axis=1, method="min")
    table["laptop rank"] = ranks["laptop"].astype(int) if "laptop" in criteria else ""
    print(f"held-out output_loss ({output_loss.batch_size} images x {output_loss.timesteps} timesteps), "
          f"{args.backbone} at {args.ratio:.0%} parameters removed, {prune_spec.selection}")
    print(table.reset_index().to_markdown(index=False, floatfmt=".5f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
