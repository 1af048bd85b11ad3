"""Options shared by several commands: the run options and ``--selection-seed``.

The run options are generated from :class:`fl.config.RunConfig`'s fields
(name, type, default, and the help, short flag and choices of
:func:`fl.config.option`), so a new field is a new option of every command
that takes the run options.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from typing import Any

import click

from chain.records import SELECTION_SEEDS
from fl.config import TUNED, RunConfig, flag, run_option
from fl.privacy import LOW_BUDGET, MECHANISMS, mechanism_of
from node.genesis import ProtocolParams

_TYPES: dict[type, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _value_type(f: Field[Any]) -> type:
    """The field's type without ``| None``."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def run_click_option(f: Field[Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one :class:`RunConfig` field."""
    spec = run_option(f)
    kind = _value_type(f)
    decls = [flag(f.name)]
    settings: dict[str, Any] = {"default": f.default, "help": spec.help}
    if kind is bool:
        if spec.negatable:
            decls = [f"{flag(f.name)}/--no-{flag(f.name)[2:]}"]
        else:
            settings["is_flag"] = True
    elif spec.choices is not None:
        settings["type"] = click.Choice(spec.choices)
    elif spec.directory:
        settings["type"] = click.Path(file_okay=False)
    else:
        settings["type"] = _TYPES[kind]
    # Shown unless there is no default value or the option is a plain flag.
    if f.default is not None and "is_flag" not in settings:
        settings["show_default"] = True
    if f.name in TUNED:
        settings["help"] = f"{spec.help} [default: {tuned_default_text(f.name)}]"
    if spec.short:
        decls.append(spec.short)
    return click.option(f.name, *decls, **settings)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def tuned_default_text(name: str) -> str:
    """Option ``name``'s default per mechanism, e.g. ``none 10, gaussian 600, laplace 600``."""
    values = {repr(mechanism_of(m).tuned_options(math.inf)[name]) for m in MECHANISMS}
    lows = any(name in mechanism_of(m).tuned_low_budget for m in MECHANISMS)
    if len(values) == 1 and not lows:
        return _shown(mechanism_of(MECHANISMS[0]).tuned[name])
    parts = []
    for mech in MECHANISMS:
        mechanism = mechanism_of(mech)
        text = f"{mech} {_shown(mechanism.tuned[name])}"
        if name in mechanism.tuned_low_budget:
            low = _shown(mechanism.tuned_low_budget[name])
            text += f" ({low} below --epsilon {LOW_BUDGET:g})"
        parts.append(text)
    return "by --dp: " + ", ".join(parts)


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The federated-run options (every :class:`RunConfig` field) of ``simulate``,
    ``network init``, ``network up`` and ``privacy plan``."""
    for f in reversed(fields(RunConfig)):
        fn = run_click_option(f)(fn)
    return fn


REPRODUCIBLE_NOISE_WARNING = (
    "WARNING: --reproducible-noise draws the DP noise from the run seed; anyone who knows "
    "the seed can remove it, so this run has NO differential privacy (tests and "
    "equivalence checks only)"
)


def run_config(kwargs: dict[str, Any]) -> RunConfig:
    try:
        config = RunConfig(**kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if config.reproducible_noise and not mechanism_of(config).is_none:
        click.echo(REPRODUCIBLE_NOISE_WARNING, err=True)
    return config


selection_seed_option = click.option(
    "--selection-seed",
    type=click.Choice(SELECTION_SEEDS),
    default="block",
    show_default=True,
    help="seed of each round's client selection: 'block' = digest of the block that closed "
    "the previous round (the one holding its summary; round 1: the last registration), "
    "as in the paper's protocol; 'run' = derived from --seed, so the selection equals "
    "simulate's (for equivalence checks)",
)


# Protocol settings that are options of `network init` and `network up`: in
# seconds on the command line, in milliseconds in the genesis' [protocol].
PROTOCOL_TIMES: tuple[tuple[str, str, str], ...] = (
    (
        "round_deadline_ms",
        "--round-deadline",
        "seconds the miners wait for the selected clients' updates once a round's selection "
        "commits (a round ends sooner when every update is in)",
    ),
    (
        "view_timeout_ms",
        "--view-timeout",
        "seconds a miner waits for a pending request to commit before it starts a PBFT view change",
    ),
    (
        "tick_ms",
        "--tick",
        "seconds per consensus tick (the miners' timers advance by ticks; the view timeout "
        "is rounded up to whole ticks)",
    ),
)
# ... and in bytes, on the command line as in the genesis.
PROTOCOL_SIZES: tuple[tuple[str, str, str], ...] = (
    ("chunk_bytes", "--chunk-bytes", "bytes per tensor-stream message (at most 1 MiB)"),
    (
        "max_stream_bytes",
        "--max-stream-bytes",
        "the largest tensor stream (an update or the model) a node accepts, in bytes",
    ),
)


def protocol_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The protocol settings of :data:`PROTOCOL_TIMES` (seconds) and
    :data:`PROTOCOL_SIZES` (bytes) as options."""
    defaults = ProtocolParams()
    for name, option_flag, text in reversed(PROTOCOL_SIZES):
        fn = click.option(
            option_flag,
            name,
            type=click.IntRange(min=1),
            default=getattr(defaults, name),
            show_default=True,
            help=text,
        )(fn)
    for name, option_flag, text in reversed(PROTOCOL_TIMES):
        fn = click.option(
            option_flag,
            name,
            type=float,
            default=getattr(defaults, name) / 1000,
            show_default=True,
            help=text,
        )(fn)
    return fn


def protocol_settings(kwargs: dict[str, Any]) -> dict[str, int]:
    """Take the :func:`protocol_options` out of ``kwargs``, in milliseconds."""
    out = {}
    for name, option_flag, _ in PROTOCOL_TIMES:
        seconds = kwargs.pop(name)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise click.UsageError(f"{option_flag} must be a positive number of seconds")
        out[name] = max(1, round(seconds * 1000))
    for name, _, _ in PROTOCOL_SIZES:
        out[name] = kwargs.pop(name)
    return out
