"""Subcommands that plugins add to the ``harness`` command line, and what they share with
the core's own (one backbone configuration given as ``--name value`` pairs).

See :func:`harness.hookspecs.harness_commands`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from .errors import UserError


@dataclass(frozen=True)
class Command:
    """A ``harness`` subcommand a plugin provides."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    backbone_options: bool = False  # `--name value` pairs after the arguments become args.options
    description: str | None = None


def parse_options(extra: list[str]) -> dict:
    """``--depth 2 --mixer=window-attention --flag`` as ``{"depth": 2, ...}``, values read as YAML
    scalars (safe loader)."""
    import yaml

    options, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise UserError(f"unexpected argument {arg!r}; options are given as --name value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            raw = extra[i + 1]
            i += 2
        else:
            raw, i = "true", i + 1
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        options[key.replace("-", "_")] = value
    return options


def backbone_context(backbone: str, options: dict):
    """A CPU :class:`harness.context.CellContext` for one backbone configuration, outside any suite."""
    from .context import CellContext
    from .plugins import registry
    from .suite import CellConfig

    reg = registry()
    reg.get("backbone", backbone).check_options(options)
    config = CellConfig.model_validate({"backbone": {"name": backbone, **options}, "metrics": ["params"],
                                        "device": "cpu"})
    return CellContext(backbone, "cli", 0, config, reg=reg)
