"""The one validator of numeric options, used by every config and public function.

Each option is checked for its type (a real number, or a whole number), NaN, infinity, values
that float32 (the precision models compute in) cannot hold, and its range. Errors are
:class:`~genailab.errors.ConfigError` carrying the argument's name, so the command line can
report its own option instead.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from genailab.errors import ConfigError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4e38


def check_number(
    name: str,
    value,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> int | float | None:
    """``value`` as a Python int (``integer``) or float once it is a valid number for ``name``.

    Parameters
    ----------
    name
        The argument's Python name, used in the message and carried by the error.
    ge, gt, le, lt
        Bounds: greater or equal, greater than, less or equal, less than.
    integer
        Only whole numbers (int or NumPy integer; not bool, not 2.0) are accepted.
    allow_none
        None is accepted (and returned), e.g. an option that None disables.
    hint
        Appended to every message, e.g. ``"None disables early stopping."``.

    Raises
    ------
    ConfigError
        For a wrong type, NaN, infinity, a float beyond float32's range, or a value out of range.

    Examples
    --------
    >>> check_number("dropout", 0.1, ge=0, lt=1)
    0.1
    """
    wanted = _wanted(integer, ge, gt, le, lt)
    tail = f" {hint}" if hint else ""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__}).{tail}", argument=name)
    if integer and not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be {wanted}, got {value!r}.{tail}", argument=name)
    value = int(value) if integer else float(value)
    if not integer:
        if math.isnan(value):
            raise ConfigError(f"{name} is NaN; give {wanted}.{tail}", argument=name)
        if math.isinf(value):
            raise ConfigError(f"{name} must be {_wanted(integer, ge, gt, le, lt, finite=True)}, got {value}.{tail}", argument=name)
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(
                f"{name}={value:g} overflows float32, the precision models compute in (largest {FLOAT32_MAX:.3g}); "
                f"give {wanted} that float32 can hold.{tail}",
                argument=name,
            )
    outside = (
        (ge is not None and not value >= ge)
        or (gt is not None and not value > gt)
        or (le is not None and not value <= le)
        or (lt is not None and not value < lt)
    )
    if outside:
        raise ConfigError(f"{name} must be {wanted}, got {_show(value)}.{tail}", argument=name)
    return value


def check_sizes(name: str, values, *, ge: int = 1, allow_empty: bool = False) -> tuple[int, ...]:
    """A sequence of whole numbers >= ``ge`` (layer sizes, category counts) as a tuple of ints."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name} must be a list of whole numbers like [128, 128], got {values!r}.", argument=name)
    values = list(values)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < ge:
            raise ConfigError(f"{name} must be a list of whole numbers >= {ge}; item {i} is {v!r}.", argument=name)
    sizes = tuple(int(v) for v in values)
    if not sizes and not allow_empty:
        raise ConfigError(f"{name} must hold at least one size, got an empty list.", argument=name)
    return sizes


def _wanted(integer: bool, ge, gt, le, lt, *, finite: bool = False) -> str:
    """What a valid value is, in words: "a positive finite number", "a whole number in [0, 10]"."""
    noun = ("finite " if finite else "") + ("whole number" if integer else "number")
    if le is None and lt is None and (gt == 0 or ge == 0) and (ge is None or gt is None):
        return f"a {'positive' if gt == 0 else 'non-negative'} {noun}"
    return f"a {noun}{_range_text(ge, gt, le, lt)}"


def _range_text(ge, gt, le, lt) -> str:
    low = f"[{_show(ge)}" if ge is not None else (f"({_show(gt)}" if gt is not None else None)
    high = f"{_show(le)}]" if le is not None else (f"{_show(lt)})" if lt is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {_show(ge)}" if ge is not None else f" > {_show(gt)}"
    if high:
        return f" <= {_show(le)}" if le is not None else f" < {_show(lt)}"
    return ""


def _show(number: float) -> str:
    return str(number) if isinstance(number, numbers.Integral) else f"{number:g}"


def check_library_size(value, *, observed: bool = False, allow_none: bool = False) -> float | str | None:
    """A total count per cell: a positive float32-sized number, ``"observed"`` (each cell's own
    total) when ``observed``, or None (the default total) when ``allow_none``."""
    if observed and isinstance(value, str) and value == "observed":
        return value
    choices = " or 'observed' (each cell's own total)" if observed else ""
    choices += " or None (the default)" if allow_none else ""
    if isinstance(value, str):
        raise ConfigError(f"library_size must be a positive number{choices}, got {value!r}.", argument="library_size")
    return check_number("library_size", value, gt=0, allow_none=allow_none, hint=f"Give a total count{choices}." if choices else "")
