"""A valid RunConfig that differs from the defaults in every field it can.

Built from ``dataclasses.fields(RunConfig)`` and the declared choices, so a
new run option is covered without editing this file: each field in turn
takes the first candidate value that keeps the configuration valid.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from fl.config import TUNED, RunConfig, flag, run_option


def _candidates(name: str, default: Any) -> list[Any]:
    kind = typing.get_type_hints(RunConfig)[name]
    if name in TUNED:  # its default is the mechanism's; take the default run's
        default = getattr(RunConfig(), name)
    spec = run_option(next(f for f in fields(RunConfig) if f.name == name))
    if spec.choices is not None:
        return [c for c in spec.choices if c != default]
    if kind is bool:
        return [not default]
    if default is None:
        args = typing.get_args(kind)
        return {int: [2], float: [2.5], str: ["elsewhere"]}[args[0]]
    if kind is int:
        return [max(1, default // 2), default + 1, default * 2 + 2]
    if kind is float:
        return [default / 2 if default else 0.25, default * 2, default + 1.5, 0.5]
    if kind is str:
        return [default + "-x"]
    raise AssertionError(f"no candidate values for {name}: {kind}")


def changed_config(**fixed: Any) -> RunConfig:
    """Every field (but those in ``fixed``) off its default, as far as validity allows."""
    values = dict(fixed)
    for f in fields(RunConfig):
        if f.name in values:
            continue
        default = getattr(RunConfig(), f.name)
        for candidate in (c for c in _candidates(f.name, f.default) if c != default):
            try:
                RunConfig(**{**values, f.name: candidate})
            except ValueError:
                continue
            values[f.name] = candidate
            break
    return RunConfig(**values)


def cli_args(config: RunConfig) -> list[str]:
    """The command-line arguments that give ``config`` (every field spelled out)."""
    args: list[str] = []
    for f in fields(RunConfig):
        value = getattr(config, f.name)
        name = flag(f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            if run_option(f).negatable:
                args.append(name if value else f"--no-{name[2:]}")
            elif value:
                args.append(name)
        else:
            args += [name, str(value)]
    return args
