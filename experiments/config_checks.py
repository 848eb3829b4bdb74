"""Checks of experiment configs, run before any stage so a typo fails in seconds, not minutes.

Each check reads one field by its dotted name (``"methods.kfac.strategy"``) and raises
``ValueError`` naming the field, its value and what it must be.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _mapping(value: Any) -> Mapping | None:
    if hasattr(value, "to_dict"):
        return value
    return value if isinstance(value, Mapping) else None


def get(config: Any, field: str) -> Any:
    """The value of the dotted ``field`` of ``config``; raises naming it when missing."""
    value = config
    for i, part in enumerate(field.split(".")):
        mapping = _mapping(value)
        if mapping is None or part not in mapping:
            parent = ".".join(field.split(".")[:i]) or "<root>"
            raise ValueError(f"config.{field} is missing (config.{parent} has no {part!r}).")
        value = mapping[part]
    return value


def fail(field: str, value: Any, requirement: str) -> None:
    """Raises ``ValueError``: ``config.<field> = <value>`` and what it must be."""
    raise ValueError(f"config.{field} = {value!r} is invalid: {requirement}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(config: Any, field: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """An int (not a bool) in ``[minimum, maximum]`` (bounds optional)."""
    value = get(config, field)
    low = "" if minimum is None else f" >= {minimum}"
    high = "" if maximum is None else f" <= {maximum}"
    if not _is_int(value) or (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        fail(field, value, f"it must be an integer{low}{' and' if low and high else ''}{high}")
    return value


def positive_int(config: Any, field: str) -> int:
    """An int ``>= 1``."""
    return integer(config, field, minimum=1)


def real(config: Any, field: str, minimum: float | None = None, strict: bool = False,
         allow_none: bool = False) -> float | None:
    """A finite number, ``> minimum`` (``strict``) or ``>= minimum``; ``None`` if allowed."""
    value = get(config, field)
    if value is None and allow_none:
        return None
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    options = " (or None)" if allow_none else ""
    if not _is_real(value) or not math.isfinite(value) or (minimum is not None and (
            value < minimum or (strict and value == minimum))):
        fail(field, value, f"it must be a finite number{bound}{options}")
    return float(value)


def fraction(config: Any, field: str) -> float:
    """A number strictly between 0 and 1."""
    value = get(config, field)
    if not _is_real(value) or not 0.0 < value < 1.0:
        fail(field, value, "it must be a number strictly between 0 and 1")
    return float(value)


def boolean(config: Any, field: str) -> bool:
    value = get(config, field)
    if not isinstance(value, bool):
        fail(field, value, "it must be True or False")
    return value


def choice(config: Any, field: str, options: Iterable[str]) -> str:
    """One of ``options`` (names the known ones)."""
    value = get(config, field)
    options = tuple(options)
    if value not in options:
        fail(field, value, f"it must be one of {options}")
    return value


def int_sequence(config: Any, field: str, allow_empty: bool = True) -> tuple[int, ...]:
    """A list or tuple of ints ``>= 1`` (non-empty unless ``allow_empty``)."""
    value = get(config, field)
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(
            _is_int(v) and v >= 1 for v in value) or (not value and not allow_empty):
        fail(field, value, "it must be a " + ("" if allow_empty else "non-empty ")
             + "list of positive integers")
    return tuple(value)


def known_fields(config: Any, field: str, allowed: Iterable[str],
                 optional: Iterable[str] = ()) -> None:
    """The mapping at ``field`` (``""``: the root) has every field of ``allowed`` and no others
    than ``allowed`` and ``optional`` (a misspelled name would otherwise be ignored)."""
    mapping = config if not field else get(config, field)
    prefix = f"config.{field}" if field else "config"
    if _mapping(mapping) is None:
        raise ValueError(f"{prefix} must be a ConfigDict, got {mapping!r}.")
    allowed, optional = set(allowed), set(optional)
    unknown = sorted(set(mapping.keys()) - allowed - optional)
    if unknown:
        raise ValueError(f"{prefix} has unknown field(s) {unknown}; the known ones are "
                         f"{sorted(allowed | optional)}.")
    missing = sorted(allowed - set(mapping.keys()))
    if missing:
        raise ValueError(f"{prefix} lacks the field(s) {missing}.")
