"""``harness prune BACKBONE [--option value ...]``: the prunable units of one configuration."""
from __future__ import annotations

import argparse
import json

from harness import Command, backbone_context


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backbone")
    p.add_argument("--json", action="store_true")


def _run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from harness import discover_units  # torch: not for `harness prune --help`

    ctx = backbone_context(args.backbone, args.options)
    model = ctx.build_backbone(device="meta")  # sizes only
    total = sum(p.numel() for p in model.parameters())
    units = discover_units(model)
    removable = [u for u in units if u.removable]
    if args.json:
        print(json.dumps({"backbone": args.backbone, "options": args.options, "params": total,
                          "units": [u.to_dict() for u in units]}, indent=2))
        return 0
    table = Table("unit", "kind", "params", "share", "removable", box=None)
    table.columns[0].overflow = table.columns[4].overflow = "fold"  # long module paths: wrap, never cut
    for u in units:
        table.add_row(u.name, u.kind, f"{u.params:,}", f"{u.params / total:.2%}",
                      "yes" if u.removable else f"no: {u.reason}")
    console = Console(highlight=False, markup=False)  # module names are printed verbatim
    console.print(table)
    # pairs overlap single units, so the removable total counts each module once
    names = {name for u in removable for name in u.modules}
    names = {n for n in names if not any(n.startswith(o + ".") for o in names)}  # nested: count once
    covered = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}
    console.print(f"{args.backbone}: {total:,} params; {len(removable)} removable units "
                  f"covering {sum(covered.values()) / total:.1%} of them")
    return 0


COMMANDS = {
    "prune": Command(help="the prunable units of one backbone configuration", arguments=_arguments, run=_run,
                     backbone_options=True,
                     description="Options after the backbone name are passed to its factory, "
                                 "e.g. harness prune unet --preset sd15"),
}
