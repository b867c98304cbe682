"""Command-line options of the sink settings, generated from `analyses.SinkConfig`'s fields.

`sink_options` adds one option per `SinkConfig` field to a typer command (``--sink-dims``,
``--tau``, ``--k-divide``, ``--k``, ``--split-rule``, ``--criterion``): the help text is the
field's (its ``metadata``) and the default shown is the command's base config's (`SinkConfig()`
for causal tracing, `ASD_SINKS` for ASD, with the reason they differ), so no default is
written twice. The command gets a `SinkOptions`: the effective config and the options given.
Each value is parsed and checked before the command body runs (so before any model loads);
a bad one is an `InputError` that names the option.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager, Mapping, Optional

import typer

from analyses.sink_config import SinkConfig
from nnsight_av.errors import InputError

__all__ = ["SinkOptions", "sink_options", "option_name", "parse_sink_options"]

#: Option names that are not ``--<field>``: "--dims" alone would not say whose dims.
_NAMES = {"dims": "--sink-dims"}


def option_name(name: str) -> str:
    """The command-line option of a `SinkConfig` field.

    >>> option_name("k_divide"), option_name("dims")
    ('--k-divide', '--sink-dims')
    """
    return _NAMES.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class SinkOptions:
    """What the sink options of one command line say: ``config`` (the base with the options given
    applied) and ``given`` (only the fields given, for layering onto another config)."""

    config: SinkConfig
    given: dict[str, Any]


def _kind(name: str) -> type:
    """The scalar type of a field (``tuple[int, ...]`` for dims), ``None`` stripped."""
    hint = typing.get_type_hints(SinkConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return typing.get_origin(args[0]) or args[0]


def _parse(name: str, text: str) -> Any:
    option, kind = option_name(name), _kind(name)
    try:
        if kind is tuple:
            return tuple(int(v) for v in text.split(",") if v.strip())
        return kind(text) if kind is not str else text
    except ValueError:
        what = {tuple: "comma-separated ints", int: "an int", float: "a number"}[kind]
        raise InputError(f"{option} must be {what}, got {text!r}") from None


def parse_sink_options(texts: Mapping[str, Optional[str]], base: SinkConfig = SinkConfig()) -> SinkOptions:
    """Parse option texts by field name (``None``: not given) onto ``base``; an `InputError` names a bad option.

    >>> parse_sink_options({"k_divide": "3", "tau": None}).config.k_divide
    3.0
    >>> parse_sink_options({"split_rule": "halves"})
    Traceback (most recent call last):
    ...
    nnsight_av.errors.InputError: --split-rule: SinkConfig.split_rule must be one of ('rank', 'sign'), got 'halves'
    """
    given = {}
    for name, text in texts.items():
        if text is None:
            continue
        value = _parse(name, text)
        try:
            SinkConfig(**{name: value})                     # each field alone, so the error names its option
        except InputError as error:
            raise InputError(f"{option_name(name)}: {error}") from None
        given[name] = value
    if "dims" in given and not given["dims"]:
        given["dims"] = None                                # "--sink-dims ''": the adapter's
    return SinkOptions(base.with_(**given), given)


def _shown(value: Any, unset: str) -> str:
    if value is None:
        return unset
    return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def sink_options(base: SinkConfig = SinkConfig(), why: str = "",
                 errors: Callable[[bool], ContextManager[Any]] | None = None) -> Callable[[Callable], Callable]:
    """Decorator of a typer command: adds the sink options and passes ``sinks=SinkOptions(...)``.

    ``base``: the command's defaults (shown in ``--help``); ``why``: why they differ from
    `SinkConfig()` (added to the help of the options that differ). ``errors(debug)``: the
    command line's error handler, around the parsing (it reads the command's ``debug``).
    """
    reference = SinkConfig()

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        added = []
        for f in fields(SinkConfig):
            default = getattr(base, f.name)
            text = f.metadata["help"]
            if why and default != getattr(reference, f.name):
                text += f" ({why})"
            metavar = {tuple: "INTS", int: "INT", float: "FLOAT"}.get(_kind(f.name), "TEXT")
            option = typer.Option(None, option_name(f.name), help=text, metavar=metavar,
                                  show_default=_shown(default, f.metadata.get("unset", "")))
            added.append(inspect.Parameter(f"sink_{f.name}", inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[str]))
        kept = [p for p in signature.parameters.values() if p.name != "sinks"]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            texts = {f.name: kwargs.pop(f"sink_{f.name}", None) for f in fields(SinkConfig)}
            guard = errors(bool(kwargs.get("debug", False))) if errors is not None else contextlib.nullcontext()
            with guard:
                sinks = parse_sink_options(texts, base)
            return command(*args, sinks=sinks, **kwargs)

        run.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in kept + added if p.annotation is not p.empty}
        del run.__wrapped__                                  # typer reads __signature__, not the command's
        return run

    return decorate
