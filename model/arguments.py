"""argparse value types shared by train.py and the benchmark scripts (stdlib only, so an
entry point can parse its flags before keras is imported). Each raises
argparse.ArgumentTypeError, which argparse turns into a one-line usage error, exit 2."""

from __future__ import annotations

import argparse
import math

_NOUNS = {int: "integers", float: "numbers"}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_in_range(low: int, high: int):
    """A type for an integer from low to high, both included."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def accuracy_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an accuracy between 0 and 1, e.g. 0.99, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy between 0 and 1, e.g. 0.99, got {text}")
    return value


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
