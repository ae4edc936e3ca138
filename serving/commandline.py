"""What the commands share on the command line: one help style, and flags derived from config dataclasses.

A config dataclass declares each flag on its field, `field(default=..., metadata=flag("help text"))`, and
checks its own values in `__post_init__`, raising ValueError with the flag's name. `add_flags` turns the
fields into argparse options with those defaults, `from_flags` builds the dataclass back from the parsed
namespace, and `build_config` reports a ValueError as the command's one-line usage error. Nested config
dataclasses (the runtime options inside the server config) contribute their flags too. A flag may name the
help section it is listed under (`group`); flags without one are listed with the parser's own options.
"""

import argparse
import dataclasses
import math
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown, except where it says nothing (unset, off). Description and epilog are
    wrapped paragraph by paragraph; a paragraph with indented lines (an example) is kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in textwrap.dedent(text).strip().split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(
                    textwrap.fill(
                        " ".join(paragraph.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never inside a flag: "--weight-decay" split at its hyphen could not be copied from the help.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        unset = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if unset or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def flag(
    help: str, *, name: str | None = None, metavar: str | None = None, choices=None, group: str | None = None
) -> dict[str, Any]:
    """Field metadata that makes a config field a command-line flag (--field-name unless `name` is given),
    listed in `--help` under the section titled `group` if one is given."""
    return {"help": help, "flag": name, "metavar": metavar, "choices": choices, "group": group}


def flag_name(cls: type, field_name: str) -> str:
    """The command-line spelling of a config field, for error messages."""
    for f in dataclasses.fields(cls):
        if f.name == field_name:
            return f.metadata.get("flag") or "--" + field_name.replace("_", "-")
    raise KeyError(field_name)


def number(kind: type) -> typing.Callable[[str], Any]:
    """argparse type: an int or a finite float; anything else is a usage error naming what was given."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None  # fmt: skip
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def bounded(kind: type, low: float, high: float) -> typing.Callable[[str], Any]:
    """argparse type: a number within low..high (both included)."""
    one = number(kind)

    def parse(text: str) -> Any:
        value = one(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be within {low:g}..{high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def bounded_list(kind: type, low: float, high: float) -> typing.Callable[[str], tuple]:
    """argparse type: comma-separated numbers, each within low..high."""
    return _list_of(bounded(kind, low, high))


def number_list(kind: type) -> typing.Callable[[str], tuple]:
    """argparse type: comma-separated numbers, e.g. 1,8,64."""
    return _list_of(number(kind))


def _list_of(one: typing.Callable[[str], Any]) -> typing.Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return tuple(one(item) for item in items)

    parse.__name__ = f"{one.__name__} list"
    return parse


def require(ok: bool, cls: type, field_name: str, requirement: str, value: Any) -> None:
    """For __post_init__: raise ValueError('--flag must be <requirement>, got <value>') unless ok."""
    if not ok:
        raise ValueError(f"{flag_name(cls, field_name)} must be {requirement}, got {value!r}")


def within(value: float | None, low: float, high: float) -> bool:
    return value is not None and math.isfinite(value) and low <= value <= high


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, defaults=None) -> None:
    """One argparse option per flagged field of `cls` (recursing into nested config dataclasses)."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            add_flags(parser, type(value), value)
            continue
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        target = _group(parser, meta.get("group"))
        name = meta["flag"] or "--" + f.name.replace("_", "-")
        kind = _unwrap(hints[f.name])
        common = {"dest": f.name, "default": value, "help": meta["help"]}
        if kind is bool:
            target.add_argument(name, action=argparse.BooleanOptionalAction, **common)
            continue
        if typing.get_origin(kind) is tuple:
            parse = number_list(typing.get_args(kind)[0])
        elif kind in (int, float):
            parse = number(kind)
        else:
            parse = kind
        target.add_argument(name, type=parse, metavar=meta["metavar"], choices=meta["choices"], **common)


def _group(parser: argparse.ArgumentParser | argparse._ArgumentGroup, title: str | None):
    """The parser's help section titled `title`, created on first use; the parser itself without a title."""
    if title is None or not isinstance(parser, argparse.ArgumentParser):
        return parser
    existing = next((g for g in parser._action_groups if g.title == title), None)
    return existing or parser.add_argument_group(title)


def from_flags(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build `cls` from parsed flags; nested config dataclasses are built the same way."""
    values = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[f.name] = from_flags(type(default), namespace)
        elif hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    return cls(**values)


def build_config(parser: argparse.ArgumentParser, cls: type[T], namespace: argparse.Namespace) -> T:
    """`from_flags`, with a value the config refuses reported as the command's usage error (exit 2)."""
    try:
        return from_flags(cls, namespace)
    except ValueError as e:
        parser.error(str(e))


def _unwrap(hint: Any) -> Any:
    """The type of a field annotation, without its `| None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_former_name(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, dest: str, kind: type = str
) -> None:
    """Keep a renamed flag working for existing scripts, unlisted in --help: `name` sets `dest` as the
    current flag does."""
    parser.add_argument(name, dest=dest, type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
