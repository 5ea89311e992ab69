"""argparse value types shared by train.py and the benchmark scripts (stdlib only, so an
entry point can parse its flags before keras is imported). Each raises
argparse.ArgumentTypeError, which argparse turns into a one-line usage error, exit 2."""

from __future__ import annotations

import argparse
import math

_NOUNS = {int: "integers", float: "numbers"}


def number_type(kind, accept, expected: str):
    """A type for one number: `kind(text)` for which `accept(value)` holds; otherwise
    "expected <expected>, got <text>"."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


def int_in_range(low: int, high: int):
    """A type for an integer from low to high, both included."""
    return number_type(int, lambda value: low <= value <= high, f"an integer from {low} to {high}")


positive_int = number_type(int, lambda value: value > 0, "a positive integer")
positive_float = number_type(float, lambda value: value > 0 and math.isfinite(value), "a positive finite number")
accuracy_fraction = number_type(float, lambda value: 0 < value <= 1, "an accuracy between 0 and 1, e.g. 0.99")


def comma_list(kind=str, choices=None, positive: bool = False):
    """A type for "a,b,c": a list of `kind` in the order given, duplicates dropped; each
    value must be one of `choices` when given, and > 0 when `positive`."""
    expected = f"expected {'positive ' if positive else ''}{_NOUNS.get(kind, 'values')} separated by commas"

    def parse(text: str) -> list:
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
        if not values or (positive and any(value <= 0 for value in values)):
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        if choices is not None and any(value not in choices for value in values):
            raise argparse.ArgumentTypeError(f"got {text!r}; choose from {', '.join(map(str, choices))} (comma-separated)")
        return list(dict.fromkeys(values))

    return parse


def flag_of(field) -> str | None:
    """The command-line flag that sets the dataclass field `field` (None: no flag does):
    its own `flag`, else `--field-name` when it has a help."""
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    return "--" + field.name.replace("_", "-") if field.metadata.get("help") else None


def add_config_flags(parser: argparse.ArgumentParser, config_class) -> argparse.ArgumentParser:
    """One flag per field of the dataclass `config_class` that has a help in its metadata
    (model.config.setting): `--field-name` (or the field's own flag), its type or choices,
    and a help that states the default once. A bool field is a switch (store_true);
    fields of one `group` share an argument group, in field order."""
    import dataclasses

    groups = {}
    for field in dataclasses.fields(config_class):
        help_text = field.metadata.get("help")
        if not help_text:
            continue
        options = dict(field.metadata.get("argparse", {}))
        group_name = options.pop("group", None)
        shown = options.pop("default_text", None)
        if group_name is not None and group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups.get(group_name, parser)
        flag = flag_of(field)
        if field.type in (bool, "bool"):
            options["action"] = "store_true"
            shown = shown or ("on" if field.default else "off")
        help_text = f"{help_text} (default: {field.default if shown is None else shown})"
        # argparse %-formats help strings.
        target.add_argument(flag, dest=field.name, default=field.default, help=help_text.replace("%", "%%"), **options)
    return parser
