"""The ``harness`` command line.

Bad input (UserError) prints one line and exits 2; a run exits 1 when any cell failed, 75
when none failed but some are running elsewhere (claimed by another run), 130 on Ctrl-C
and 143 on SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import PluginError, UserError

EXIT_USAGE = 2
# Some cells were left to another run that holds their claim (sysexits' EX_TEMPFAIL: retry later).
EXIT_ELSEWHERE = 75


def _console(stderr: bool = False):
    """Markup off: labels, paths and errors are the user's text, and ``[/x]`` or ``[enforce fail at
    ...]`` in them must print verbatim. Styled words go through :func:`_styled`."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False)


def _styled(*parts):
    """A line of plain strings and ``(text, style)`` pairs; nothing in it is read as markup."""
    from rich.text import Text

    return Text.assemble(*parts)


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: expected an integer >= 1")


# -- run / validate ----------------------------------------------------------------------
def _prepare(args):
    from .suite import load_suite

    _at_least_one("--max-cells", args.max_cells)
    suite = load_suite(args.suite)
    suite.max_cells = args.max_cells
    suite.check_size()  # before importing torch: a suite refused for its size is refused at once
    from .runner import plan

    seed = getattr(args, "seed", None)
    if seed is not None:  # a replicate: other draws, other cell ids, same results folder
        if seed < 0:
            raise UserError(f"--seed {seed}: expected an integer >= 0")
        suite.spec.seed = seed
    jobs = plan(suite, Path(args.results), getattr(args, "only", None))
    return suite, jobs


def cmd_validate(args) -> int:
    suite, jobs = _prepare(args)
    from .runner import check_builds

    check_builds(suite, jobs)
    _console().print(f"{args.suite}: suite {suite.name!r} is valid: {len(jobs)} cell(s), every backbone builds")
    if args.costs:
        _print_costs(jobs)
    return 0


def _print_costs(jobs) -> None:
    """Parameters and GFLOPs of each cell's backbone as built, counted on the meta device."""
    from rich.table import Table

    from .suite import CellConfig

    table = Table("cell", "params", "GFLOPs", "note", box=None)
    counted: dict[str, dict] = {}
    for job in jobs:
        count = _count_backbone(job, counted)
        if count["own"]:
            params = f"{count['params'] / 1e6:.2f}M"
            gflops = "n/a" if count["gflops"] is None else f"{count['gflops']:.3f}"  # None: shapes depend on data
        else:  # a pretrained model whose config is not here: the cell counts it when it runs
            params = gflops = "n/a"
        blocks = sorted(CellConfig.model_validate(job.config).blocks)
        # the backbone as built: what the cell's stages (pruning, quantisation) change is not in it
        notes = [f"before {', '.join(blocks)}" if blocks else "", "" if count["own"] else count["why"]]
        table.add_row(job.label, params, gflops, "; ".join(n for n in notes if n))
    _console().print(table)
    for stage_table in _stage_costs(jobs, counted):  # blocks that say what they cost: the sample block's images...
        _console().print(stage_table)


def _count_backbone(job, counted: dict) -> dict:
    """The backbone of ``job`` built and counted on the meta device, once per distinct backbone
    (``counted`` keeps them). ``own`` says whether it is the model the cell names: a
    ``pretrained`` diffusers model builds from its ``config.json`` and reads no weights, so only
    a config that is not on this machine (a hub id offline) stops it, and then the suite's
    options are counted instead, ``why`` saying so. Never a real build: costing a suite reads
    and downloads no weight."""
    import torch

    from .context import CellContext
    from .flops import AbstractCountError, count_flops
    from .suite import CellConfig
    from .weights import counting_structure

    config = CellConfig.model_validate(job.config)
    key = repr(config.backbone.model_dump())
    if key in counted:
        return counted[key]
    with torch.no_grad(), counting_structure():
        ctx = CellContext(job.suite, job.cell, job.seed, config)
        model, why = _meta_backbone(ctx)
        own = model is not None
        if not own:  # the checkpoint's config is not here: the suite's options instead
            raw = dict(job.config)
            raw["backbone"] = {k: v for k, v in raw["backbone"].items() if k != "pretrained"}
            ctx = CellContext(job.suite, job.cell, job.seed, CellConfig.model_validate(raw))
            model = ctx.abstract_model().eval()
        try:
            gflops = count_flops(model, ctx.example_inputs(1, model=model), ctx.registry.flop_handles()).total / 1e9
        except AbstractCountError:
            gflops = None  # its shapes depend on data: the gflops metric traces real tensors
        size = int(ctx.input_spec["input_size"])
    counted[key] = {"own": own, "why": why, "params": sum(p.numel() for p in model.parameters()),
                    "gflops": gflops, "size": size}
    return counted[key]


def _meta_backbone(ctx):
    """``(model on the meta device, None)``, or ``(None, why)`` when it cannot be built there
    (see :func:`_count_backbone`). The model becomes the context's abstract one, so that what
    reads the input shape from it does not build it again."""
    import torch

    from .weights import counting_structure

    try:
        with torch.random.fork_rng(devices=[]), counting_structure():
            ctx._meta_model = ctx.build_backbone(device="meta").eval()
            return ctx._meta_model, None
    except Exception as exc:  # noqa: BLE001 - any failure of a factory on meta is reported, not raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"not built on meta here: {first[:100]}"


def _stage_costs(jobs, counted: dict) -> list:
    """One table per stage with a ``costs`` hook (:attr:`harness.Stage.costs`), a row per cell that
    has its block, each costed with that cell's own block. The denoiser is the one
    :func:`_count_backbone` counted (``counted``), and a note says where it is the suite's
    options rather than the pretrained model's."""
    from rich.table import Table

    from .context import CellContext
    from .plugins import registry
    from .stages import order
    from .suite import CellConfig

    stages = {name: stage for name, stage in registry().stages().items() if stage.costs is not None}
    rows: dict[str, list[tuple[str, dict]]] = {}
    for job in jobs:
        present = [name for name in stages if (job.config or {}).get(name) is not None]
        if not present:
            continue
        count = _count_backbone(job, counted)
        base_notes = [] if count["own"] else [
            "denoiser counted from the suite's options (its pretrained config cannot be read here)"]
        if count["gflops"] is None:
            base_notes.append("denoiser GFLOPs depend on data: not counted")
        config = CellConfig.model_validate(job.config)
        specs = CellContext(job.suite, job.cell, job.seed, config).specs  # this cell's blocks, validated
        ran = order(registry().stages(), specs)
        for name in present:
            notes = list(base_notes)
            before = [n for n in ran[:ran.index(name)]] if name in ran else []
            if before:
                notes.append(f"denoiser before {', '.join(before)} (an upper bound)")
            row = stages[name].costs(config, specs[name], count["gflops"], count["size"])
            if row is None:
                continue
            row = dict(row)
            row["note"] = "; ".join(n for n in notes + [row.get("note", "")] if n)
            rows.setdefault(name, []).append((job.label, row))
    tables = []
    for name, cells in rows.items():
        columns = list(dict.fromkeys(k for _, row in cells for k in row if k != "note")) + ["note"]
        table = Table("cell", *columns, title=f"what the {name} block costs", box=None)
        for label, row in cells:
            table.add_row(label, *(str(row.get(c, "")) for c in columns))
        tables.append(table)
    return tables


def cmd_run(args) -> int:
    _at_least_one("--jobs", args.jobs)
    suite, jobs = _prepare(args)
    from .plugins import registry
    from .records import ensure_writable
    from .runner import check_builds, launched_ranks, pending
    from .table import render, terminal_width

    console = _console()
    follower = launched_ranks()[0] != 0  # under torchrun rank 0 reports; the other ranks only work
    console.quiet = console.quiet or follower
    if args.dry_run:
        for job in jobs:
            console.print(_styled((job.cell, "bold"), f"  {job.label}"))
            console.print(json.dumps(job.config, indent=2, sort_keys=True))
        console.print(f"{len(jobs)} cell(s); nothing was run")
        return 0
    check_builds(suite, jobs)
    out_dir = Path(args.results) / suite.name
    ensure_writable(out_dir)
    exec_spec = suite.spec.executor
    name = args.executor or (exec_spec.name if exec_spec else None)
    if name is None:  # `--jobs N` alone asks for parallel cells on this machine
        name = "process" if args.jobs and args.jobs > 1 else "local"
    options = dict(exec_spec.options) if exec_spec and not args.executor else {}
    if args.jobs is not None and not (name == "local" and args.jobs == 1):
        options["jobs"] = args.jobs
    executor = registry().create("executor", name, **options)
    todo, done = pending(jobs, args.rerun)
    console.print(_styled("suite ", (suite.name, "bold"), f": {len(jobs)} cell(s), {len(done)} already done, "
                                                          f"{len(todo)} to run ({name} executor) -> {out_dir}"))
    with _terminate_like_interrupt():
        failed, elsewhere = _run_with_progress(console, todo, executor, args.rerun)
    from .claims import claim_path
    from .records import inspect_record, warn
    from .runner import is_done

    records = []
    for job in jobs:
        rec, problem = inspect_record(job.record_path)
        if problem is not None:
            warn(job.record_path, problem, "not in the table")
        elif rec is not None:
            records.append(rec)
    if records and not follower:
        print()
        # plain print: rich would wrap wide tables; render splits them to the terminal's width
        print(render(records, "markdown", width=terminal_width()), flush=True)
    if failed:
        console.print(_styled((f"{failed} cell(s) failed", "red"),
                              "; their records hold the error. Rerun to retry them."))
    # held by another run at the end of this one (those it finished meanwhile count as done)
    running = [j for j in jobs if j.cell in elsewhere and (claim_path(j.record_path).exists() or not is_done(j))]
    if running:
        console.print(f"{len(running)} cell(s) running elsewhere (another run holds their claim); "
                      f"rerun when it is done. Exit status {EXIT_ELSEWHERE}.", soft_wrap=True)
    if failed or any(j not in running and not is_done(j) for j in jobs):
        return 1
    return EXIT_ELSEWHERE if running else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: workers stopped, claims released, finished cells kept."""


@contextmanager
def _terminate_like_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_with_progress(console, todo, executor, rerun: bool = False) -> tuple[int, set[str]]:
    """Run ``todo``; (how many failed, ids of the cells another run holds)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from .runner import run_jobs

    failed = 0
    elsewhere: set[str] = set()
    starts: dict[str, float] = {}
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("cells", total=len(todo))

        def on_start(job):
            starts[job.cell] = time.perf_counter()
            progress.update(task, description=f"running {job.label} ({job.cell})")

        def on_done(job, record):
            nonlocal failed
            took = record.get("duration_s") or (time.perf_counter() - starts.get(job.cell, time.perf_counter()))
            if record["status"] == "ok":
                progress.console.print(Text.assemble(("ok", "green"), f"     {job.cell}  {job.label}  {took:.1f}s"),
                                       soft_wrap=True)
            else:
                failed += 1
                progress.console.print(Text.assemble(("failed", "red"),
                                                     f" {job.cell}  {job.label}  {took:.1f}s: {record['error']}"),
                                       soft_wrap=True)
            progress.advance(task)

        def on_skip(job, why, done):
            if not done:
                elsewhere.add(job.cell)
            progress.console.print(Text.assemble(("done" if done else "skip", "green" if done else "yellow"),
                                                 f"   {job.cell}  {job.label}: {why}"), soft_wrap=True)
            progress.advance(task)

        run_jobs(todo, executor, on_start=on_start, on_done=on_done, on_skip=on_skip, rerun=rerun)
        progress.update(task, description="cells")
    return failed, elsewhere


# -- ls / plugins --------------------------------------------------------------------------
def _listable() -> dict[str, str]:
    """Kinds ``harness ls`` lists -> the hook that declares them."""
    from .plugins import KINDS, OTHER_KINDS

    return {**KINDS, **OTHER_KINDS}


def _describe(entry) -> str:
    """An entry's one line, imported only when its declaration gives no description."""
    from .plugins import summary

    static = entry.static_description()
    if static is not None:
        return static
    try:
        obj = entry.resolve()
    except PluginError as exc:
        from .plugins import _report

        _report(str(exc))
        return "(cannot be imported: see the warning above)"
    if entry.kind == "stage":
        return getattr(obj, "description", "") or ""
    if entry.kind == "command":
        return getattr(obj, "help", "") or ""
    import inspect

    return summary(inspect.getdoc(obj))


def _check_listable(kind: str) -> None:
    listable = _listable()
    if kind not in listable:
        from .errors import suggest
        from .plugins import registry

        owners = [k for k in listable if kind in registry().declared(k)]  # `harness ls dit`: a name, not a kind
        if owners:
            raise UserError(f"unknown kind {kind!r}; {kind!r} is a {owners[0]}: harness ls {owners[0]} {kind}")
        raise UserError(f"unknown kind {kind!r}{suggest(kind, listable)}")


def cmd_ls(args) -> int:
    from .plugins import registry

    if args.kind:
        _check_listable(args.kind)
    if args.name:
        return _ls_one(args.kind, args.name, args.json)
    reg = registry()
    kinds = [args.kind] if args.kind else list(_listable())
    rows = [{"kind": k, "name": n, "plugin": e.plugin, "description": _describe(e)}
            for k in kinds for n, e in reg.declared(k).items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_listing(rows)
    return 0


def plain(text: str) -> str:
    """A docstring as a terminal shows it: reST roles and literals (``:func:`x```, ````x````,
    ```x```) as their bare text."""
    text = re.sub(r":[\w:.-]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text)


def _print_listing(rows: list[dict]) -> None:
    """One line per component under a heading per kind: each name whole, the description cut
    to the width that is left (``harness ls KIND NAME`` shows the whole of it)."""
    console = _console()
    print("\n".join(listing_lines(rows, console.width)))
    console.print(_styled(("harness ls KIND NAME", "bold"), ": a component's whole description and its options"))


def listing_lines(rows: list[dict], width: int) -> list[str]:
    """The lines of :func:`_print_listing` for a terminal ``width`` columns wide."""
    name_width = max((len(r["name"]) for r in rows), default=0)
    plugin_width = max((len(r["plugin"]) for r in rows), default=0)
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        lines.append(kind)
        for r in rows:
            if r["kind"] != kind:
                continue
            line = f"  {r['name']:<{name_width}}  {r['plugin']:<{plugin_width}}  "
            room = max(width - len(line), 12)
            text = " ".join(plain(r["description"]).split())
            lines.append(line + (text if len(text) <= room else text[:room - 1].rstrip() + "…"))
    return lines


def _ls_one(kind: str, name: str, as_json: bool) -> int:
    """``harness ls KIND NAME``: where a component comes from, its description and its options."""
    import inspect

    from .errors import suggest
    from .plugins import KINDS, OTHER_KINDS, registry

    reg = registry()
    if kind in KINDS:
        entry = reg.get(kind, name)
    else:
        declared = reg.declared(kind)
        if name not in declared:
            raise UserError(f"unknown {kind} {name!r}{suggest(name, declared)}{reg.broken_note()}")
        entry = declared[name]
    if kind in OTHER_KINDS:  # a reference must lead to a Stage or a Command that keeps its contract
        from .commands import Command
        from .stages import Stage

        obj = reg.checked_object(entry, Stage if kind == "stage" else Command)
    else:
        obj = entry.resolve()
    info = {"kind": kind, "name": name, "plugin": entry.plugin, "distribution": entry.distribution,
            "target": entry.declared.target if entry.lazy else _qualname(obj)}
    usage = None
    if kind in KINDS:
        info["description"] = inspect.getdoc(obj) or ""
        info["options"] = entry.options()
    elif kind == "stage":
        info["description"] = obj.description or _summary_of(obj.schema)
        info["options"] = _schema_options(obj.schema)
        info["after"], info["replaces"] = list(obj.after), list(obj.replaces)
    else:  # a command: its own --help says it all
        parser = argparse.ArgumentParser(prog=f"harness {name}", description=obj.description)
        obj.arguments(parser)
        info["description"] = obj.help
        info["options"] = []
        usage = parser.format_help()
        info["usage"] = usage
    if as_json:
        print(json.dumps(info, indent=2, default=repr))
        return 0
    console = _console()
    console.print(_styled((f"{kind} {name}", "bold"), f"  from {entry.origin}: {info['target']}"), soft_wrap=True)
    if info["description"]:
        console.print()
        console.print(plain(info["description"]), soft_wrap=True)
    if kind == "stage" and (info["after"] or info["replaces"]):
        console.print()
        console.print(f"runs after: {', '.join(info['after']) or '-'}; replaces: {', '.join(info['replaces']) or '-'}")
    if usage is not None:
        console.print()
        console.print(usage, soft_wrap=True)
        return 0
    console.print()
    if not info["options"]:
        console.print("options: none")
        return 0
    from rich.table import Table

    title = f"keys of the {name}: block" if kind == "stage" else "options"
    table = Table("option", "default", "type", box=None, title=title, title_justify="left")
    for o in info["options"]:
        table.add_row(o["name"], repr(o["default"]) if "default" in o else "(required)", o.get("annotation", ""))
    console.print(table)
    return 0


def _summary_of(obj) -> str:
    import inspect

    from .plugins import summary

    return summary(inspect.getdoc(obj))


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _schema_options(schema) -> list[dict]:
    """A stage block's keys from its pydantic schema, in declaration order."""
    rows = []
    for key, f in schema.model_fields.items():
        row: dict = {"name": f.alias or key}
        if f.default_factory is not None:
            row["default"] = f.default_factory()
        elif not f.is_required():
            row["default"] = f.default
        if f.annotation is not None:
            row["annotation"] = _annotation(f.annotation)
        rows.append(row)
    return rows


def _annotation(tp) -> str:
    import inspect

    import re

    text = inspect.formatannotation(tp).replace("NoneType", "None")
    return re.sub(r"\b(?:[a-z_]\w*\.)+(?=[A-Za-z_])", "", text)  # typing.Optional, harness.suite.ComponentSpec


def cmd_plugins(args) -> int:
    from .plugins import registry

    reg = registry()
    by_plugin: dict[str, list[str]] = {}
    for kind in _listable():
        for name, entry in reg.declared(kind).items():
            by_plugin.setdefault(entry.plugin, []).append(f"{kind}:{name}")
    rows = [{"name": p.name, "distribution": p.distribution, "version": p.version, "hooks": list(p.hooks),
             "components": by_plugin.get(p.name, [])} for p in reg.plugins()]
    rows += [{"name": name, "distribution": reg.distribution(name), "version": None, "hooks": [], "components": [],
              "error": why} for name, why in reg.broken.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("\n".join(plugin_lines(rows, _console().width)))
    return 0


def plugin_lines(rows: list[dict], width: int) -> list[str]:
    """Each plugin as a heading (name, distribution, version) and its components by kind,
    wrapped between names, never inside one: a suite needs them spelled in full."""
    def wrap(label: str, items: list[str]) -> list[str]:
        return textwrap.wrap(f"{label}: " + ", ".join(items), width, initial_indent="  ", subsequent_indent="    ",
                             break_long_words=False, break_on_hyphens=False)

    lines = []
    for r in rows:
        lines.append(" ".join([r["name"], f"({r['distribution'] or '-'} {r['version'] or '-'})"]))
        if "error" in r:
            lines.extend(wrap("not loaded", [r["error"]]))
            continue
        by_kind: dict[str, list[str]] = {}
        for component in r["components"]:
            kind, _, name = component.partition(":")
            by_kind.setdefault(kind, []).append(name)
        for kind, names in by_kind.items():
            lines.extend(wrap(kind, names))
        if r["hooks"]:
            lines.extend(wrap("hooks", list(r["hooks"])))
    return lines


# -- table ---------------------------------------------------------------------------------
def cmd_table(args) -> int:
    from .records import load_records
    from .table import render, terminal_width

    records = load_records(args.results_dir)
    if not records:
        raise UserError(f"{args.results_dir}: no records found")
    fmt = "json" if args.json else args.format
    print(render(records, fmt, args.columns, width=terminal_width()))
    return 0


# -- leaderboard / plot --------------------------------------------------------------------
def cmd_leaderboard(args) -> int:
    from .leaderboard import render
    from .records import load_records

    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out_file(out)
    records = load_records(args.results_dir)
    if not records:
        raise UserError(f"{args.results_dir}: no records found")
    # links to records are relative to where the table ends up, so the page works when moved with them
    text = render(records, args.format, args.metric, link_base=out.parent if out else None,
                  title=f"Leaderboard: {args.results_dir}")
    if out is None:
        print(text)
        return 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    _console().print(f"wrote {out} ({len(records)} record(s))")
    return 0


def _check_out_file(out: Path) -> None:
    """--out names a file to (over)write: not a directory, and not below a file."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory, expected a file name")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is not a directory, expected a folder to write into")
            return


def cmd_plot(args) -> int:
    from .plot import pareto_plot, scaling_plot
    from .records import load_records

    records = load_records(args.results_dir)
    if not records:
        raise UserError(f"{args.results_dir}: no records found")
    if args.scaling and args.published:
        raise UserError("--published marks published figures on the Pareto plot; it does not go with --scaling")
    x, y = _plot_axes(records, args.x, args.y, args.scaling)
    if args.scaling:
        path = scaling_plot(records, y, args.out or Path(args.results_dir) / "plots" / f"scaling-{y}.png")
    else:
        name = f"pareto-{x}-{y}{'-published' if args.published else ''}.png"
        path = pareto_plot(records, x, y, args.out or Path(args.results_dir) / "plots" / name, args.published)
    _console().print(f"wrote {path}")
    return 0


def _plot_axes(records, x, y, scaling: bool) -> tuple[str | None, str]:
    """Defaults read from the records: cost on x (GFLOPs when recorded), the first quality
    metric with a direction on y; ``--scaling`` puts the cost on y."""
    from .leaderboard import metric_roles

    roles = metric_roles(records)
    directed = [m for m in roles if any((r.get("metrics", {}).get(m) or {}).get("direction")
                                        for r in records if isinstance(r.get("metrics", {}).get(m), dict))]
    costs = [m for m in directed if roles[m] == "cost"]
    cost = "gflops" if "gflops" in costs else (costs[0] if costs else "gflops")
    if scaling:
        return None, y or cost
    quality = next((m for m in directed if roles[m] == "quality"), "val_loss")
    return x or cost, y or quality


# -- flops ---------------------------------------------------------------------------------
def cmd_flops(args, extra: list[str]) -> int:
    import torch

    from .commands import backbone_context, parse_options
    from .flops import CONVENTIONS, AbstractCountError, check_convention, count_flops
    from .plugins import registry
    from .stages import split_applications

    convention = check_convention(args.convention)
    # `--STAGE VALUE` for a stage that applies its result outside a suite (`--prune PLAN`); the
    # core knows no stage by name, so which options these are is the registry's to say. Only
    # the stages named on the line are imported: a broken one elsewhere stays out of the way.
    stages = registry().stages()
    named = {a[2:].partition("=")[0] for a in extra if a.startswith("--")}
    applicable = {n: stages[n] for n in sorted(named) if n in stages and stages[n].apply is not None}
    applications, extra = split_applications(extra, applicable)
    options = parse_options(extra)
    ctx = backbone_context(args.backbone, options)
    reg = ctx.registry
    applied: dict[str, dict] = {}

    def build(device):  # counting needs shapes only: the meta device holds no weights
        model = ctx.build_backbone(device=device).eval()
        unpruned = sum(p.numel() for p in model.parameters())
        applied.clear()
        for name, value in applications.items():
            applied[name] = stages[name].apply(model, value) or {}
        ctx.model = model  # its input shape is read from it
        return model, unpruned

    with torch.no_grad():
        try:
            model, unpruned = build("meta")
            inputs = ctx.example_inputs(1, model=model, generator=torch.Generator().manual_seed(0))
            fc = count_flops(model, inputs, reg.flop_handles(), convention=convention)
        except UserError:
            raise
        except Exception as exc:  # a factory that loads weights, or data-dependent shapes: count it for real
            reason = str(exc) if isinstance(exc, AbstractCountError) else f"{type(exc).__name__}: {exc}"
            model, unpruned = build("cpu")
            fc = count_flops(model, ctx.example_inputs(1, model=model, generator=torch.Generator().manual_seed(0)),
                             reg.flop_handles(), abstract=False, convention=convention)
            fc.fallback_reason = reason.strip().splitlines()[0] if reason.strip() else reason
        params = sum(p.numel() for p in model.parameters())
    result = {"backbone": args.backbone, "options": options, "input": ctx.input_spec, "params": params,
              "gflops": fc.total / 1e9, "batch_size": 1, "convention": CONVENTIONS[convention],
              **fc.record()}
    summaries = {name: info.pop("summary", None) for name, info in applied.items()}  # lines for people
    for name, value in applications.items():
        result[name] = {"plan": value, "params_before": unpruned, "removed_ratio": 1 - params / unpruned,
                        **applied[name]}
    if args.by_module:
        result["by_module"] = {k: {"params": fc.params_by_module[k], "gflops": v / 1e9}
                               for k, v in fc.by_module.items()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = _console()
    console.print(f"{args.backbone} {options or ''} input {ctx.input_spec}")
    console.print(f"params  {params:,} ({params / 1e6:.2f}M)")
    if convention == "fvcore":
        console.print(f"GFLOPs  {fc.total / 1e9:.2f}  (batch 1, 1 multiply-add = 1 FLOP)")
    else:  # what thop counts is multiply-adds, and papers that use it say MACs
        console.print(f"GMACs   {fc.total / 1e9:.2f}  (batch 1, {CONVENTIONS[convention]})")
        if fc.no_rule_modules:
            console.print(f"counted zero (thop has no rule for them): {', '.join(fc.no_rule_modules)}")
    for name, value in applications.items():
        if params == unpruned:  # a stage that changes how a step is computed (DeepCache, ToMe), not the weights
            console.print(f"{name}  {value}: applied; parameters unchanged ({unpruned:,})")
        else:
            console.print(f"{name}  {value}: {result[name]['removed_ratio']:.1%} of {unpruned:,} parameters removed")
        if summaries[name]:  # what the stage adds (BK-SDM: the published size it matches)
            console.print(summaries[name])
    if fc.method != "meta":
        console.print(f"counted by tracing real tensors: {fc.fallback_reason}")
    if fc.uncounted_ops:
        console.print(f"not counted (no FLOP handle): {', '.join(sorted(fc.uncounted_ops))}")
    if fc.zero_modules:
        console.print(f"[yellow]warning[/]: count zero FLOPs although they have parameters or reduce their input: "
                      f"{', '.join(fc.zero_modules)}")
    if args.by_module:
        from rich.table import Table

        table = Table("module", "params", "GFLOPs", box=None)
        for k, v in result["by_module"].items():
            table.add_row(k, f"{v['params']:,}", f"{v['gflops']:.3f}")
        console.print(table)
    return 0


# -- entry point ---------------------------------------------------------------------------
LS_HELP = """\
List the installed components, or show one: `harness ls mixer`, `harness ls backbone dit`.

Kinds, and the hook (harness.hookspecs) that declares each:
  backbone   harness_backbones         denoising networks
  mixer      harness_mixers            token mixers of transformer-style backbones
  metric     harness_metrics           measurements of a cell
  dataset    harness_datasets          data sets (a cell's data:)
  criterion  harness_pruning_criteria  layer-pruning criteria (prune: {criterion: ...})
  loss       harness_distill_losses    distillation losses (distill: {losses: ...})
  executor   harness_executors         where cells run
  stage      harness_stages            methods applied to a cell's model (train:, prune:, ...)
  command    harness_commands          subcommands of `harness`
"""
MAX_CELLS_HELP = "refuse a suite of more cells than this (default: $HARNESS_MAX_CELLS, else 10000)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark efficient diffusion models from YAML suites.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__import__('harness').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a suite (skips cells already done)")
    r.add_argument("suite")
    r.add_argument("--results", default="results", help="results root; records go to RESULTS/<suite>/")
    r.add_argument("--only", metavar="GLOB", help="cells whose id or label matches")
    r.add_argument("--dry-run", action="store_true", help="list the cells and their configs, run nothing")
    r.add_argument("--rerun", action="store_true", help="run cells again even if their record is ok")
    r.add_argument("--executor", help="executor name (default: the suite's, else local)")
    r.add_argument("--jobs", type=int, help="parallel jobs, for executors that take them")
    r.add_argument("--seed", type=int, help="replace the suite's seed (a replicate run; cell ids change with it)")
    r.add_argument("--max-cells", type=int, metavar="N", help=MAX_CELLS_HELP)
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a suite without running it")
    v.add_argument("suite")
    v.add_argument("--results", default="results", help=argparse.SUPPRESS)
    v.add_argument("--max-cells", type=int, metavar="N", help=MAX_CELLS_HELP)
    v.add_argument("--costs", action="store_true",
                   help="print each cell's parameters and GFLOPs (batch 1, counted on the meta device)")
    v.set_defaults(func=cmd_validate)

    ls = sub.add_parser("ls", help="list components, or show one's options", description=LS_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("kind", nargs="?", metavar="KIND", help="list only this kind (below)")
    ls.add_argument("name", nargs="?", metavar="NAME", help="show this component's description and options")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    pl = sub.add_parser("plugins", help="list loaded plugins")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    from . import scaffold  # no torch: the templates are text

    np_ = sub.add_parser("new-plugin", help="write a new plugin package with one component of each kind",
                         description=scaffold.DESCRIPTION)
    scaffold.arguments(np_)
    np_.set_defaults(func=scaffold.run)

    t = sub.add_parser("table", help="table of the records under a folder")
    t.add_argument("results_dir")
    t.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "html"])
    t.add_argument("--columns", nargs="+", metavar="COLUMN")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_table)

    lb = sub.add_parser("leaderboard", help="ranked table of every record under a folder, best values marked")
    lb.add_argument("results_dir")
    lb.add_argument("--metric", help="rank by this metric (default: the first quality metric)")
    lb.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv", "html"])
    lb.add_argument("--out", metavar="FILE", help="write here (row links become relative to it); default stdout")
    lb.set_defaults(func=cmd_leaderboard)

    pt = sub.add_parser("plot", help="Pareto front of quality vs cost, or --scaling of cost vs tokens")
    pt.add_argument("results_dir")
    pt.add_argument("--x", help="cost metric of the Pareto plot (default: gflops when recorded, else the first "
                                "cost metric)")
    pt.add_argument("--y", help="quality metric (default: the first quality metric recorded), or with --scaling "
                                "the cost (default as --x)")
    pt.add_argument("--scaling", action="store_true", help="y against tokens, one line per mixer")
    pt.add_argument("--published", action="store_true",
                    help="mark the published figures (a cell's published: block) beside ours, each joined to its cell")
    pt.add_argument("--out", metavar="FILE", help="FILE.png, .svg or .pdf (default RESULTS_DIR/plots/...)")
    pt.set_defaults(func=cmd_plot)

    f = sub.add_parser("flops", help="params and GFLOPs of one backbone configuration",
                       description="Options after the backbone name are passed to its factory, "
                                   "e.g. harness flops dit --size XL --patch 2 --input-size 32. A stage that "
                                   "can apply its result outside a suite takes it as --STAGE VALUE: "
                                   "--prune bk-sdm-small (a BK-SDM preset) or --prune RUN/pruned/plan.json")
    f.add_argument("backbone")
    f.add_argument("--by-module", action="store_true")
    f.add_argument("--json", action="store_true")
    # not argparse choices: a wrong name gets the one-line error with a suggestion
    f.add_argument("--convention", default="fvcore", metavar="fvcore|thop",
                   help="fvcore (default): every multiply-add of the graph, attention products included (DiT, "
                        "LaMamba-Diff); thop: thop's module rules, conv/linear/norm layers only (BK-SDM's MACs)")
    f.set_defaults(func=cmd_flops, takes_extra=True)

    return p


def add_plugin_commands(p: argparse.ArgumentParser, invoked: str | None = None) -> None:
    """Subcommands registered by plugins (harness.hookspecs.harness_commands), listed from their
    declarations; only the ``invoked`` one is imported, to add its arguments."""
    from .plugins import _report, registry

    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    core = set(sub.choices)
    for name, entry in registry().declared("command").items():
        if name in core:
            _report(f"{entry.origin} declares command {name!r}, which the harness already has; it is not added")
            continue
        if name != invoked:  # listed in --help, never parsed: its module stays unimported
            sub.add_parser(name, help=f"{_describe(entry)} [{entry.plugin}]")
            continue
        from .commands import Command

        command = registry().checked_object(entry, Command)
        c = sub.add_parser(name, help=f"{command.help} [{entry.plugin}]", description=command.description)
        command.arguments(c)
        c.set_defaults(func=_plugin_command(command), takes_extra=command.backbone_options)


def _plugin_command(command):
    def run(args, extra=None):
        if command.backbone_options:
            from .commands import parse_options

            args.options = parse_options(extra or [])
        return command.run(args)

    return run


def _warn(message: str) -> None:
    print(f"harness: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from . import plugins

    previous, plugins.on_problem = plugins.on_problem, _warn  # plugin problems: one line each, on stderr
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    finally:
        plugins.on_problem = previous


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        # The core's own commands answer without loading plugins (a bad suite is refused at
        # once); anything else, --help included, may be a plugin's command.
        first = next((a for a in argv if not a.startswith("-")), None)
        core = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if first not in core:
            add_plugin_commands(parser, first)
    except UserError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_extra", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except UserError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        print(f"harness: {what}; finished cells are kept, rerun to finish the rest", file=sys.stderr)
        return code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
