"""Hyperparameter checks run by `prefjax.losses.get` before any step, naming loss, field, value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def _fail(loss: str, field: str, value: Any, expected: str) -> None:
    raise ValueError(
        f"loss {loss!r}: hyperparameter {field}={value!r} is invalid; expected {expected}")


def number(loss: str, field: str, value: Any) -> float:
    """A finite real number (bools are rejected: `beta=True` is a typo, not 1.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(loss, field, value, "a finite real number")
    return float(value)


def positive(loss: str, field: str, value: Any) -> None:
    if number(loss, field, value) <= 0:
        _fail(loss, field, value, "a number > 0")


def non_negative(loss: str, field: str, value: Any) -> None:
    if number(loss, field, value) < 0:
        _fail(loss, field, value, "a number >= 0")


def half_open(loss: str, field: str, value: Any, lo: float, hi: float) -> None:
    """lo <= value < hi."""
    if not lo <= number(loss, field, value) < hi:
        _fail(loss, field, value, f"a number in [{lo}, {hi})")


def open_interval(loss: str, field: str, value: Any, lo: float, hi: float) -> None:
    """lo < value < hi."""
    if not lo < number(loss, field, value) < hi:
        _fail(loss, field, value, f"a number in ({lo}, {hi})")


def flag(loss: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(loss, field, value, "True or False")


def one_of(loss: str, field: str, value: Any, options: Iterable[str]) -> None:
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        _fail(loss, field, value, f"one of {', '.join(options)}")
