"""Suites: YAML files of a base configuration and a matrix of overrides.

Loading is strict: safe YAML only, no duplicate keys, unknown keys rejected by pydantic, and
every error names the file, the line, the key and what was expected.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError, suggest
from .published import PublishedSpec, check as check_published

Path_ = tuple  # a path into the document: ("base", "backbone", "mixer")


# -- schema ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """``{name: ..., **options}``; options are checked against the factory's signature."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CellConfig(BaseModel):
    """One cell: the core keys below, plus one block per stage it uses (``train:``,
    ``prune:``...), each validated by the schema of the plugin that registers the stage
    (see :func:`stage_specs`)."""

    model_config = ConfigDict(extra="allow")
    backbone: ComponentSpec
    data: Optional[ComponentSpec] = None
    metrics: list[Union[str, ComponentSpec]] = Field(min_length=1)
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads: Optional[int] = Field(None, gt=0)
    # the figures a paper prints for this cell (harness.published): beside ours in records and tables
    published: Optional[PublishedSpec] = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("expected 'auto', 'cpu' or 'cuda[:N]'")
        return v

    def metric_specs(self) -> list[ComponentSpec]:
        return [ComponentSpec(name=m) if isinstance(m, str) else m for m in self.metrics]

    @property
    def blocks(self) -> dict[str, Any]:
        """The stage blocks as written, by name; a block given as null is absent, so a matrix
        can put a cell with a stage beside one without (``prune: [null, {ratio: 0.3}]``)."""
        return {k: v for k, v in (self.model_extra or {}).items() if v is not None}


CORE_KEYS = tuple(CellConfig.model_fields)


def stage_specs(config: CellConfig, stages: dict) -> dict[str, BaseModel]:
    """Each stage block validated by its stage's schema. Raises UserError for a block no
    installed stage owns, and pydantic's ValidationError (locations relative to the block)."""
    out = {}
    for name, block in config.blocks.items():
        if name not in stages:
            raise UserError(f"{name}: unknown key{suggest(name, list(CORE_KEYS) + list(stages))}")
        out[name] = stages[name].schema.model_validate(block)
    return out


# The suite names a folder, results/<suite>/: well under a file name's 255 bytes.
MAX_SUITE_NAME = 100


class SuiteSpec(_Strict):
    suite: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_SUITE_NAME)
    seed: int = Field(0, ge=0)
    description: str = ""
    executor: Optional[ComponentSpec] = None
    base: dict[str, Any]
    matrix: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)


# -- YAML with line numbers ----------------------------------------------------------------
# libyaml's parser where installed (PyYAML's own is pure Python); the constructors are the safe ones.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A real suite is a few hundred nodes; these bound what aliases ("billion laughs") and deep
# nesting can make every later step (validation, copies, hashing) walk.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


class _Walk:
    """Line numbers by document path and duplicate keys, over the node graph as aliases expand it."""

    def __init__(self, source: str):
        self.source, self.lines, self.count, self.seen, self.aliased = source, {}, 0, set(), False
        self.open: set[int] = set()  # nodes on the current path: one seen again is a recursive alias

    def __call__(self, node: yaml.Node, path: Path_) -> None:
        self.count += 1
        self.aliased |= id(node) in self.seen
        self.seen.add(id(node))
        if self.count > MAX_YAML_NODES:
            what = "YAML aliases expand to" if self.aliased else "the YAML has"
            raise UserError(f"{self.source}: {what} more than {MAX_YAML_NODES:,} nodes; a suite is refused "
                            f"beyond that")
        if id(node) in self.open:
            raise UserError(f"{self.source}:{node.start_mark.line + 1}: a YAML alias refers to a value that "
                            f"contains it; suites are plain data")
        if len(path) > MAX_YAML_DEPTH:
            raise UserError(f"{self.source}:{node.start_mark.line + 1}: YAML nested more than {MAX_YAML_DEPTH} "
                            f"levels deep")
        self.lines[path] = node.start_mark.line + 1
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for knode, vnode in node.value:
                line = knode.start_mark.line + 1
                if not isinstance(knode, yaml.ScalarNode):
                    raise UserError(f"{self.source}:{line}: a key must be a plain name or number, "
                                    f"not a list or mapping")
                key = knode.value
                if key in first:
                    raise UserError(f"{self.source}:{line}: duplicate key {key!r} (first on line {first[key]})")
                first[key] = line
                self(vnode, path + (key,))
                self.lines[path + (key,)] = line
        else:
            for i, item in enumerate(node.value):
                self(item, path + (i,))
        self.open.discard(id(node))


def load_yaml(text: str, source: str) -> tuple[Any, dict]:
    """Parse once, safely; return the data and a map from document path to line number.

    The node graph is walked (and bounded) before any Python object is built from it."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        walk = _Walk(source)
        if node is not None:
            walk(node, ())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        what = exc.problem or str(exc)
        if "could not determine a constructor" in str(exc):
            what = f"YAML tag not allowed ({exc.problem.split('tag')[-1].strip()}): suites are plain data"
        raise UserError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:  # the pure-Python composer recurses per level of nesting
        raise UserError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return data, walk.lines


# -- cells -----------------------------------------------------------------------------------
@dataclass
class Cell:
    suite: str
    seed: int
    config: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    origin: dict[Path_, Path_] = field(default_factory=dict)  # config path -> document path

    @property
    def id(self) -> str:
        # published figures annotate a cell, they do not configure it: correcting one must not
        # make a finished cell run again (harness.published.refresh re-annotates its record)
        config = {k: v for k, v in self.config.items() if k != "published"}
        blob = json.dumps({"config": config, "seed": self.seed}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.overrides.items() if k != "published"}  # figures, not configuration
        if not shown:
            return "base"
        return ",".join(f"{k}={_short(v)}" for k, v in shown.items())

    def parsed(self) -> CellConfig:
        return CellConfig.model_validate(self.config)


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("name", json.dumps(v, sort_keys=True)) if "name" in v else json.dumps(v, sort_keys=True)
    return str(v)


def _set(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise KeyError(dotted)
        node = nxt
    node[keys[-1]] = copy.deepcopy(value)


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return _MISSING
        node = node[k]
    return node


_MISSING = object()

# Cells a suite may expand to unless raised with --max-cells or HARNESS_MAX_CELLS: each cell
# is at least one model build, so a suite far beyond this is a typo in the matrix.
DEFAULT_MAX_CELLS = 10_000


def max_cells_from_env() -> int:
    raw = os.environ.get("HARNESS_MAX_CELLS")
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_CELLS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"HARNESS_MAX_CELLS={raw!r}: expected an integer >= 1")
    return n


@dataclass
class Suite:
    spec: SuiteSpec
    source: str
    lines: dict
    max_cells: Optional[int] = None  # None: HARNESS_MAX_CELLS, else DEFAULT_MAX_CELLS

    @property
    def name(self) -> str:
        return self.spec.suite

    def line(self, doc_path: Path_) -> int | None:
        """Line of the deepest part of ``doc_path`` present in the file (a missing key: its parent)."""
        for n in range(len(doc_path), -1, -1):
            if doc_path[:n] in self.lines:
                return self.lines[doc_path[:n]]
        return None

    def where(self, doc_path: Path_) -> str:
        line = self.line(doc_path)
        return f"{self.source}:{line}" if line else self.source

    def check_size(self) -> None:
        """Refuse a suite whose matrix and includes give more cells than the limit, before expanding."""
        limit = self.max_cells or max_cells_from_env()
        sizes = [len(v) for v in self.spec.matrix.values()]
        n = math.prod(sizes) + len(self.spec.include)  # before excludes: what expanding would build
        if n <= limit:
            return
        shape = " x ".join(str(k) for k in sizes) or "1"
        extra = f" + {len(self.spec.include)} included" if self.spec.include else ""
        raise UserError(f"{self.where(('matrix',))}: matrix: {shape}{extra} = {n:,} cells, more than the limit of "
                        f"{limit:,}; raise it with --max-cells N or HARNESS_MAX_CELLS=N")

    def cells(self) -> list[Cell]:
        self.check_size()
        axes = list(self.spec.matrix.items())
        combos = itertools.product(*[range(len(v)) for _, v in axes]) if axes else [()]
        cells: list[Cell] = []
        for combo in combos:
            overrides = {axis: values[i] for (axis, values), i in zip(axes, combo)}
            origin = {tuple(axis.split(".")): ("matrix", axis, i) for (axis, _), i in zip(axes, combo)}
            cells.append(self._cell(overrides, origin))
        for n, extra in enumerate(self.spec.include):
            origin = {tuple(k.split(".")): ("include", n, k) for k in extra}
            cells.append(self._cell(dict(extra), origin))
        out, ids = [], {}
        for cell in cells:
            if any(all(_get(cell.config, k) == v for k, v in ex.items()) for ex in self.spec.exclude):
                continue
            if cell.id not in ids:  # an include may repeat a matrix cell
                ids[cell.id] = cell
                out.append(cell)
            elif "published" in cell.config:  # ... to give it the paper's figures (no part of its id)
                kept = ids[cell.id]
                kept.config["published"] = cell.config["published"]
                kept.origin.update({k: v for k, v in cell.origin.items() if k[:1] == ("published",)})
        if not out:
            raise UserError(f"{self.source}: the matrix, includes and excludes leave no cell to run")
        return out

    def _cell(self, overrides: dict, origin: dict) -> Cell:
        cfg = copy.deepcopy(self.spec.base)
        for dotted, value in overrides.items():
            try:
                _set(cfg, dotted, value)
            except KeyError:
                doc = origin[tuple(dotted.split("."))][:2]
                raise UserError(
                    f"{self.where(doc)}: cannot set {dotted!r}: a parent key in base is not a mapping"
                ) from None
        return Cell(self.name, self.spec.seed, cfg, overrides, origin)

    def locate(self, cell: Cell, loc: Path_) -> str:
        """'file:line' of the value behind a config path, following matrix overrides."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in cell.origin:  # inside a value a matrix or include sets: as deep as the file goes
                return self.where(tuple(cell.origin[loc[:n]]) + tuple(loc[n:]))
        loc = tuple(loc)
        if ("base",) + loc not in self.lines:
            # set only below this path by an override (a matrix axis `trian.steps`): the override's line
            deeper = next((origin for path, origin in cell.origin.items() if path[:len(loc)] == loc), None)
            if deeper is not None and loc:
                return self.where(deeper)
        return self.where(("base",) + loc)


def _fmt_loc(loc) -> str:
    return ".".join(str(p) for p in loc)


def _known_keys(model: Any, loc: tuple) -> list[str] | None:
    """The keys the pydantic model ``model`` accepts at ``loc`` (an unknown key's parent), or
    None where the schema cannot say (a union member chosen by the data, a mapping of anything)."""
    for part in loc:
        if isinstance(part, int):  # a list's item: the annotation's model already stands for it
            continue
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = _model_in(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or key for key, f in model.model_fields.items()]
    return None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``Optional[Spec]``, ``list[Spec]``), if one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for m in map(_model_in, get_args(annotation)) if m is not None]
    return models[0] if len(models) == 1 else None


def _pydantic_message(err: dict, model: Any = None) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    loc = tuple(err["loc"])
    if err["type"] == "too_short" and loc[:1] == ("matrix",) and len(loc) == 2:
        return f"matrix axis {loc[1]!r} is empty; give at least one value"
    if err["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1]) if model is not None and loc else None
        msg = "unknown key" + (suggest(str(loc[-1]), known) if known else "")
    elif err["type"] == "missing":
        msg = "missing required key"
    if "input" in err and err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], dict) \
            and repr(err["input"]) not in msg:
        got = repr(err["input"])
        msg += f" (got {got[:60] + '...' if len(got) > 80 else got})"  # one readable line, whatever was given
    return msg


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}")


def expand_env(data: Any, lines: dict, source: str, path: Path_ = ()) -> Any:
    """``${VAR}`` in every string of a suite, from the environment: where weights and data sit
    differs between machines, the suite does not. ``${VAR:-default}`` falls back to a default,
    ``${VAR:?what it is}`` says what to set when it is unset, ``$$`` is a literal ``$``. An unset
    variable without a default is a one-line error with the file and line."""
    if isinstance(data, dict):
        return {k: expand_env(v, lines, source, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, lines, source, path + (i,)) for i, v in enumerate(data)]
    if not isinstance(data, str) or "$" not in data:
        return data

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = os.environ.get(name)
        if value:
            return value
        if op == ":-":
            return arg
        line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        what = f": {arg.strip()}" if op == ":?" and arg.strip() else ""
        raise UserError(f"{where}: {'.'.join(map(str, path))}: environment variable {name} is not set{what}")

    return _VAR.sub(one, data)


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise UserError(f"{source}: is a directory, expected a YAML suite file")
    if not path.is_file():
        raise UserError(f"{source}: suite file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: cannot read suite: {exc}") from None
    data, lines = load_yaml(text, source)
    data = expand_env(data, lines, source)
    if not isinstance(data, dict):
        raise UserError(f"{source}:1: a suite is a mapping with keys suite, base, matrix (got {type(data).__name__})")
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        suite = Suite.__new__(Suite)
        suite.source, suite.lines = source, lines
        raise UserError(f"{suite.where(loc)}: {_fmt_loc(loc) or 'suite'}: {_pydantic_message(err, SuiteSpec)}") \
            from None
    return Suite(spec, source, lines)


def validate_cell(suite: Suite, cell: Cell) -> CellConfig:
    """Schema, stage blocks and component names/options of one cell; raises UserError with a
    location."""
    from .plugins import registry

    try:
        parsed = cell.parsed()
    except ValidationError as exc:
        raise _located(suite, cell, (), exc) from None
    reg = registry()
    stages = reg.stages()
    specs: dict[str, Any] = {}
    for name, block in parsed.blocks.items():
        if name not in stages:
            known = list(CORE_KEYS) + list(stages)
            raise UserError(f"{suite.locate(cell, (name,))}: {name}: unknown key{suggest(name, known)}"
                            + ("" if stages else " (no installed plugin registers a stage)"))
        schema = stages[name].schema
        try:
            specs[name] = schema.model_validate(block)
        except ValidationError as exc:
            raise _located(suite, cell, (name,), exc, schema) from None
    checks = [(("backbone",), "backbone", parsed.backbone)]
    if parsed.data is not None:
        checks.append((("data",), "dataset", parsed.data))
    first: dict[str, int] = {}
    for i, m in enumerate(parsed.metric_specs()):
        if m.name in first:  # a record keeps one entry per metric name: the second would replace the first
            raise UserError(f"{suite.locate(cell, ('metrics', i))}: metrics[{i}]: metric {m.name!r} is already "
                            f"metrics[{first[m.name]}]; a cell measures each metric once (one convention, one "
                            f"set of options), so put the other variant in a matrix axis")
        first[m.name] = i
        checks.append((("metrics", i), "metric", m))
    if parsed.published is not None:
        check_published(parsed.published, list(first), lambda sub: suite.locate(cell, ("published",) + sub))
    for loc, kind, spec in checks:
        try:
            comp = reg.get(kind, spec.name)
            opts = spec.options
            if kind == "backbone":
                mixer = opts.get("mixer")
                if mixer is not None:
                    mname = mixer if isinstance(mixer, str) else (mixer or {}).get("name")
                    reg.get("mixer", mname)
            comp.check_options(opts)
        except UserError as exc:
            sub = loc + (("name",) if "unknown" in str(exc) else ())
            if getattr(exc, "option", None) is not None:  # an option the factory does not take: its own line
                sub = loc + (exc.option,)
            if "mixer" in str(exc) and kind == "backbone":
                sub = loc + ("mixer",)
            raise UserError(f"{suite.locate(cell, sub)}: {_fmt_loc(loc)}: {exc}") from None
        # Files a metric reads (prompt sets, reference images or batches) must exist now, not
        # after hours of work; the metric names which of its options are paths.
        for key, what in (getattr(comp.factory, "path_options", None) or {}).items():
            path = spec.options.get(key)
            if isinstance(path, str) and not Path(path).exists():
                raise UserError(f"{suite.locate(cell, loc + (key,))}: {_fmt_loc(loc + (key,))}: {what} {path!r} "
                                f"not found (paths are relative to the directory harness runs in)")
    # Whether each method applies to this cell (a U-Net-only stage on a DiT), now and not after hours of work.
    for name, spec in specs.items():
        check = stages[name].check
        if check is None:
            continue
        try:
            check(parsed, spec)
        except (UserError, ValueError) as exc:
            option = getattr(exc, "option", None)
            loc = (name,) + ((option,) if isinstance(option, str) else tuple(option or ()))
            raise UserError(f"{suite.locate(cell, loc)}: {_fmt_loc(loc)}: {exc}") from None
    return parsed


def _located(suite: Suite, cell: Cell, prefix: tuple, exc: ValidationError, schema: Any = None) -> UserError:
    """``schema``: the model that raised, so that an unknown key is told the closest it accepts."""
    err = exc.errors()[0]
    loc = prefix + tuple(err["loc"])
    return UserError(f"{suite.locate(cell, loc)}: {_fmt_loc(loc)}: {_pydantic_message(err, schema)}")


def select(cells: list[Cell], pattern: str | None, source: str) -> list[Cell]:
    if not pattern:
        return cells
    chosen = [c for c in cells if fnmatch.fnmatch(c.id, pattern) or fnmatch.fnmatch(c.label, pattern)]
    if not chosen:
        labels = ", ".join(c.label for c in cells[:6])
        raise UserError(f"{source}: --only {pattern!r} matches no cell (ids or labels such as: {labels})")
    return chosen
