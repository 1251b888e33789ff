"""Config fields that are also command-line options: each declared once, on its dataclass.

A field made with `option(default, help)` carries its help text, and where the command line spells it
differently, its flag names and a parser from the typed string. `cli_options(Config)` turns such a dataclass
into a typer command's options (names, defaults and help read from the fields, nested dataclass fields
flattened), so a command never lists its config's fields again:

    @app.command()
    @cli_options(TraceConfig)
    def trace(options: dict, quiet: bool = typer.Option(False)) -> None:
        cfg = build(TraceConfig, options)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

import typer

from entropylens.errors import UserError


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           parse: Callable[[str], Any] | None = None, shown: str | None = None, cli: bool = True) -> Any:
    """A dataclass field that is also an option. `parse` reads the option's string (shown as `shown`, default
    `str(default)`) into the field's value; `flags` replace the name-derived `--flag`; `cli=False` keeps
    the field off the command line (provenance filled in by code)."""
    meta = {"help": help, "flags": flags, "parse": parse, "shown": shown, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls: type, defaults: Any = None) -> list[tuple[dataclasses.Field, type, Any]]:
    """(field, resolved type, default) of every command-line field, nested dataclasses flattened in order.
    A nested field's default is read from the instance its parent holds by default (`defaults`), so a command
    can embed a config with its own defaults."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], default)
        elif f.metadata.get("cli", False):
            out.append((f, hints[f.name], default))
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _parameter(f: dataclasses.Field, hint: type, default: Any) -> inspect.Parameter:
    meta = f.metadata
    if meta["parse"] is not None:  # typed as a string on the command line, parsed into the field
        hint, default = str, meta["shown"] if meta["shown"] is not None else default
        default = None if default is None else str(default)
    names = list(meta["flags"])
    if hint is bool and not names:
        names = [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"]
    info = typer.Option(default, *names, help=meta["help"], show_default=True)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint)


def cli_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command `fn(options, **own)`: typer sees `cls`'s fields as options next to fn's own
    parameters; fn receives the fields' parsed values in `options` (a dict for `build`)."""
    fields = _fields(cls)
    names = {f.name for f, _, _ in fields}
    if len(names) < len(fields):
        raise TypeError(f"{cls.__name__}: two command-line fields share a name")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn).parameters.values())[1:]
        own_hints = typing.get_type_hints(fn)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            options = {}
            for f, _, _ in fields:
                value, parse = kwargs.pop(f.name), f.metadata["parse"]
                options[f.name] = parse(value) if parse is not None and value is not None else value
            return fn(options, **kwargs)

        params = [_parameter(f, hint, default) for f, hint, default in fields]
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints[p.name]) for p in own]
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__}: parameters {clash} shadow fields of {cls.__name__}")
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the signature above, not fn's
        return command

    return decorate


def build(cls: type, options: dict[str, Any], defaults: Any = None) -> Any:
    """The config `cls` from flat values (missing ones keep their defaults). A nested dataclass field is its
    default instance with the *options* it declares replaced: its other fields are set by code, and a value
    in `options` under the same name belongs to the outer config (e.g. the bupo command's `internal_steps`)."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            inner = _default(f) if defaults is None else getattr(defaults, f.name)
            kw[f.name] = build(hints[f.name], options, inner)
        elif f.name in options and (defaults is None or f.metadata.get("cli", False)):
            kw[f.name] = options[f.name]
    return cls(**kw) if defaults is None else dataclasses.replace(defaults, **kw)


def restore(cls: type, stored: dict[str, Any], **override: Any) -> Any:
    """The config `cls` from what a run stored as JSON, `override` on top: the one resume format of every
    command (JSON hands tuples back as lists; keys that are no field of `cls` are ignored)."""
    tuples = _tuple_fields(cls)
    values = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in (stored | override).items()}
    return build(cls, values)


def _tuple_fields(cls: type) -> set[str]:
    out = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out |= _tuple_fields(hint)
        elif typing.get_origin(hint) is tuple:
            out.add(name)
    return out


def flatten(config: Any) -> dict[str, Any]:
    """The option values that `build` turns back into `config` (e.g. to store what a run was started with)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= flatten(value)
        elif f.metadata.get("cli", False):
            out[f.name] = value
    return out


def count_or_all(flag: str) -> Callable[[str], int | None]:
    """A parser for `flag`: a positive count, or 'all' (None)."""

    def parse(text: str) -> int | None:
        if text == "all":
            return None
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{flag} takes a positive integer or 'all', got {text!r}") from None
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer (or 'all'), got {value}")
        return value

    return parse


parse_limit = count_or_all("--limit")


def ints(flag: str) -> Callable[[str], tuple[int, ...]]:
    """A parser for `flag`: comma-separated integers, e.g. K values `1,4`."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(k) for k in text.split(",") if k.strip())
        except ValueError:
            raise UserError(f"{flag} takes comma-separated integers like 1,4, got {text!r}") from None

    return parse


def parse_csv(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
