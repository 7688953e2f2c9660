"""Argument validators shared by the whole package, with one rule for the exception type:

- the wrong type (not an int, a bool where an int is wanted, not a number, not a tensor, not callable, a
  choice of the wrong kind) raises TypeError;
- the right type with a value outside what is allowed (a range, an unknown choice, an inconsistent
  combination) raises ValueError.

Every message names the argument as the caller calls it (`name`), says what is allowed and shows what was
given: ``bits must be an int in 2..8, got float 4.0``; ``bits must be an int in 2..8, got 9``. A bool is
never taken for an int or a number (``True`` is an int to Python, but never what a user meant by bits=True).
Each validator returns the value it accepted (a real number as a float), so callers can write
``p = check_real(p, "p", 0, 1)``. This module imports nothing from the package (ops use it too).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["check_int", "check_optional_int", "check_real", "check_bool", "check_choice", "check_bits",
           "check_optional_bits", "check_callable", "check_tensor", "check_generator"]


def _given(value) -> str:
    """What was given, for a TypeError: its type and its value (``float 4.0``, ``str '3'``)."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _int_kind(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is not None and hi is not None:
        return f"an int in {lo}..{hi}"
    if lo == 1:
        return "a positive int"
    if lo is not None:
        return f"an int >= {lo}"
    if hi is not None:
        return f"an int <= {hi}"
    return "an int"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """`value` as an int in [lo, hi] (either bound may be None: unbounded). Python and numpy ints pass,
    bools and floats (even 4.0) do not."""
    if not _is_int(value):
        raise TypeError(f"{name} must be {_int_kind(lo, hi)}, got {_given(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_int_kind(lo, hi)}, got {value!r}")
    return int(value)


def check_optional_int(value, name: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
    """None, or `value` as check_int checks it."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{name} must be {_int_kind(lo, hi)} or None, got {_given(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {_int_kind(lo, hi)} or None, got {value!r}")
    return int(value)


def check_bits(value, name: str = "bits", lo: int = 1, hi: int = 8) -> int:
    """A bit-width: an int in lo..hi (1..8 for activation codes and packing, 2..8 for quantized inputs)."""
    return check_int(value, name, lo, hi)


def check_optional_bits(value, name: str = "bits", lo: int = 1, hi: int = 8) -> Optional[int]:
    """None (the feature is off), or a bit-width as check_bits checks it."""
    return check_optional_int(value, name, lo, hi)


def _real_kind(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {hi}"
    return "a finite number"


def check_real(value, name: str, lo: Optional[float] = None, hi: Optional[float] = None, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float within the bounds (closed unless `lo_open` / `hi_open`; None: unbounded).
    Ints and floats pass (numpy's too), bools and strings do not; NaN and infinities are values out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {_real_kind(lo, hi, lo_open, hi_open)}, got {_given(value)}")
    x = float(value)
    bad = not math.isfinite(x)
    if lo is not None:
        bad = bad or (x <= lo if lo_open else x < lo)
    if hi is not None:
        bad = bad or (x >= hi if hi_open else x > hi)
    if bad:
        raise ValueError(f"{name} must be {_real_kind(lo, hi, lo_open, hi_open)}, got {value!r}")
    return x


def check_bool(value, name: str) -> bool:
    """`value` if it is a bool (True or False; not 0 or 1, not "yes")."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_given(value)}")
    return value


def check_choice(value, name: str, choices: Iterable[Any]):
    """`value` if it is one of `choices` (compared with ==). A value of none of the choices' types (an int
    where the choices are names, a bool where they are ints) is a TypeError; any other miss a ValueError."""
    choices = tuple(choices)
    if not any(isinstance(value, type(c)) and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        raise TypeError(f"{name} must be one of {choices!r}, got {_given(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices!r}, got {value!r}")
    return value


def check_callable(value, name: str) -> Callable:
    """`value` if it is callable (a function or a module)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {_given(value)}")
    return value


def check_tensor(value, name: str, *, optional: bool = False, min_dim: int = 0) -> Optional[torch.Tensor]:
    """`value` if it is a torch.Tensor with at least `min_dim` dimensions (or None, when `optional`)."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor{' or None' if optional else ''}, got {_given(value)}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_generator(value, name: str = "generator") -> Optional[torch.Generator]:
    """None (torch's default generator) or a torch.Generator."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {_given(value)}")
    return value
