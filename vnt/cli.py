"""Command lines derived from the config dataclasses, shared by ``vnt.train``, ``vnt.data``,
``vnt.evaluate`` and ``vnt.denoise``.

Each dataclass field becomes one option, typed by its annotation (int, float, bool, str, ``X | None``,
tuples, ``Literal`` choices), with its help text from the comment on the field's line, its default,
and its choices. Options are never abbreviated, and every bad value is a usage error: one line, exit
status 2, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from typing import Any, Literal

BOOLS = {"true": True, "false": False, "1": True, "0": False}


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching, whose errors are one line (and a pointer to --help)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0] if message else message} (see --help)\n")


def field_comments(cls) -> dict[str, str]:
    """field name -> the comment on its line in the class body (``name: type = default  # comment``)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            match = re.match(r"\s*(\w+)\s*:", lines[tok.start[0] - 1])
            if match:
                comments[match.group(1)] = tok.string.lstrip("#").strip()
    return comments


def _converter(annotation, name: str):
    """(parse function, choices or None, metavar) for a field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        parse, choices, metavar = _converter(inner[0] if len(inner) == 1 else str, name)

        def optional(text: str):
            return None if text.lower() == "none" else parse(text)
        return optional, choices, metavar + "|none"
    if origin is Literal:
        kinds = {type(a) for a in args}
        base = kinds.pop() if len(kinds) == 1 else str
        parse = _converter(base, name)[0]

        def literal(text: str):
            value = parse(text)
            if value not in args:
                raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, args))}")
            return value
        return literal, args, "{" + ",".join(map(str, args)) + "}"
    if origin is tuple:
        item = _converter(args[0] if args else str, name)[0]
        length = None if len(args) == 2 and args[1] is Ellipsis else len(args)

        def tuple_(text: str):
            values = tuple(item(t) for t in text.split(",") if t != "")
            if length is not None and len(values) != length:
                raise argparse.ArgumentTypeError(f"expected {length} comma-separated values, got {text!r}")
            return values
        return tuple_, None, "A,B,..."
    if annotation is bool:
        def bool_(text: str):
            if text.lower() not in BOOLS:
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return BOOLS[text.lower()]
        return bool_, None, "true|false"
    if annotation in (int, float, str):
        def scalar(text: str):
            try:
                return annotation(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {annotation.__name__}, got {text!r}") from None
        return scalar, None, {int: "N", float: "X", str: "S"}[annotation]
    raise TypeError(f"{name}: no command-line form for the annotation {annotation!r}")


def add_options(parser: argparse.ArgumentParser, cls, defaults, *, prefix: str = "",
                flags: dict[str, list[str]] | None = None, title: str | None = None) -> dict[str, str]:
    """Options ``--{prefix}{field}`` for every field of dataclass ``cls``; returns dest -> field name.
    ``flags``: field -> the option names to use instead (e.g. a shortcut, then the prefixed form)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    group = parser.add_argument_group(title or cls.__name__)
    dests = {}
    for f in dataclasses.fields(cls):
        parse, choices, metavar = _converter(hints[f.name], f.name)
        parse.__name__ = f.name  # argparse names the type in its messages
        names = (flags or {}).get(f.name) or [f"--{prefix}{f.name.replace('_', '-')}"]
        default = getattr(defaults, f.name)
        help_ = comments.get(f.name, "")
        help_ = f"{help_} (default: {default!r})" if help_ else f"(default: {default!r})"
        dest = f"{prefix}{f.name}"
        help_ += f"; one of {', '.join(map(str, choices))}" if choices else ""
        group.add_argument(*names, dest=dest, type=parse, metavar=metavar, default=argparse.SUPPRESS,
                           help=help_.replace("%", "%%"))  # argparse formats help strings
        dests[dest] = f.name
    return dests


def add_renamed(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Options that no longer exist: using one is a usage error naming what replaced it."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} was replaced: use {renamed[option_string]}")

    for old in renamed:
        parser.add_argument(old, action=Renamed, nargs="?", help=argparse.SUPPRESS)


def given(namespace: argparse.Namespace, dests: dict[str, str]) -> dict[str, Any]:
    """field -> value for the options of one dataclass that were given on the command line."""
    return {field: getattr(namespace, dest) for dest, field in dests.items() if hasattr(namespace, dest)}


def fail(parser: argparse.ArgumentParser, err: BaseException) -> typing.NoReturn:
    """A construction or input error as a usage error (one line, exit 2)."""
    parser.error(str(err) or type(err).__name__)
    sys.exit(2)  # not reached: error() exits
