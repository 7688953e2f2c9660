"""Optimal step approximations ("tables") of activation derivatives.

A b-bit table is 2**b - 1 sorted borders t_1 < ... < t_{2^b-1} and 2**b levels. The code of x is the number of
borders <= x (`torch.bucketize(x, borders, right=True)`), i.e. the i with t_i <= x < t_{i+1} (t_0 = -inf,
t_{2^b} = +inf); backward multiplies the incoming gradient by levels[code].

Objective. Borders and levels minimize  E(q) = integral (f'(x) - q(x))^2 w(x) dx  over the domain. With the
borders fixed the best level of an interval is the w-weighted mean of f' on it, so only the borders are
searched, and they are found exactly: dynamic programming over a grid (see `dp.py`), then exact
coordinate descent on a grid 32 times finer.

Weight. The default is w = 1 on [-100, 100] ("uniform"), the objective of the original FewBit, so our
errors are directly comparable with its tables (and, being optimal for the same objective, never worse).
It also does not assume a scale for the pre-activations: every x counts alike, so the outer levels settle
on the asymptotic slopes (0 and 1 for GELU) and large inputs get the right gradient whatever the layer's
scale. `weight="normal"` (standard normal density) optimizes for N(0, 1) inputs instead. Each table carries
its objective value and, comparable across weights, the RMS error under x ~ N(0, 1).

Grid. x = sinh(u) with u uniform: spacing ~0.0003 near 0 growing linearly with |x| on the fine grid.
Each fine cell integrates w, w f', w f'^2 with 4-point Gauss-Legendre, so moments are exact to ~1e-12.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..validation import check_choice, check_real
from .dp import optimal_segmentation, refine_borders
from .packing import check_bits

__all__ = ["Table", "table", "SMOOTH_FUNCTIONS", "canonical_params", "function_for"]

DEFAULT_DOMAIN = (-100.0, 100.0)
WEIGHTS = ("uniform", "normal")
_FINE_CELLS = 1 << 15
_COARSE_CELLS = 1 << 10
_BUILTIN_PATH = Path(__file__).with_name("builtin_tables.json")


@dataclass(frozen=True)
class _Smooth:
    fn: Callable[..., Callable[[torch.Tensor], torch.Tensor]]  # params -> elementwise function
    defaults: Mapping[str, object] = field(default_factory=dict)


def _gelu(approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return lambda x: F.gelu(x, approximate=approximate)


def _nonzero_alpha(name):
    def make(alpha=1.0):
        if name == "celu" and alpha == 0:
            raise ValueError("alpha must be non-zero for celu")
        f = getattr(F, name)
        return lambda x: f(x, alpha=alpha)
    return make


def _softplus(beta=1.0, threshold=20.0):
    if beta == 0:
        raise ValueError("beta must be non-zero for softplus")
    return lambda x: F.softplus(x, beta=beta, threshold=threshold)


def _plain(f):
    return lambda: f


# The smooth activations, built on torch's own functions so a table approximates exactly the derivative of
# the forward that runs. Parameters and defaults are those of torch.nn.
SMOOTH_FUNCTIONS: dict[str, _Smooth] = {
    "gelu": _Smooth(_gelu, {"approximate": "none"}),
    "celu": _Smooth(_nonzero_alpha("celu"), {"alpha": 1.0}),
    "elu": _Smooth(_nonzero_alpha("elu"), {"alpha": 1.0}),
    "hardswish": _Smooth(_plain(F.hardswish)),
    "logsigmoid": _Smooth(_plain(F.logsigmoid)),
    "mish": _Smooth(_plain(F.mish)),
    "selu": _Smooth(_plain(F.selu)),
    "sigmoid": _Smooth(_plain(torch.sigmoid)),
    "silu": _Smooth(_plain(F.silu)),
    "softplus": _Smooth(_softplus, {"beta": 1.0, "threshold": 20.0}),
    "softsign": _Smooth(_plain(F.softsign)),
    "tanh": _Smooth(_plain(torch.tanh)),
    "tanhshrink": _Smooth(_plain(F.tanhshrink)),
}


def canonical_params(name: str, params: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """Fill defaults, check names, normalize numbers to float: the cache key of a named function."""
    if name not in SMOOTH_FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; valid names: {', '.join(sorted(SMOOTH_FUNCTIONS))}")
    spec = SMOOTH_FUNCTIONS[name]
    unknown = set(params) - set(spec.defaults)
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "none"
        raise TypeError(f"{name}: unknown parameter(s) {sorted(unknown)}; valid parameters: {valid}")
    out = dict(spec.defaults)
    for key, value in params.items():
        default = spec.defaults[key]
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: {key} must be a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name}: {key} must be finite, got {value}")
        out[key] = value
    return tuple(sorted(out.items()))


def function_for(name: str, **params) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise torch function `name` with `params` (validated)."""
    return SMOOTH_FUNCTIONS[name].fn(**dict(canonical_params(name, params)))


@dataclass(frozen=True)
class Table:
    """A b-bit step approximation of f': `borders` (2**b - 1) and `levels` (2**b), as float64 tuples."""

    bits: int
    borders: tuple[float, ...]
    levels: tuple[float, ...]
    error: float  # the objective: integral (f' - q)^2 w dx over the domain
    rms_normal: float  # sqrt(E[(f'(x) - q(x))^2]) for x ~ N(0, 1), comparable across weights
    weight: str = "uniform"
    domain: tuple[float, float] = DEFAULT_DOMAIN

    def borders_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.borders, dtype=dtype, device=device)

    def levels_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.levels, dtype=dtype, device=device)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "borders": list(self.borders), "levels": list(self.levels),
                "error": self.error, "rms_normal": self.rms_normal, "weight": self.weight,
                "domain": list(self.domain)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Table":
        return cls(bits=int(d["bits"]), borders=tuple(d["borders"]), levels=tuple(d["levels"]),
                   error=float(d["error"]), rms_normal=float(d["rms_normal"]), weight=d["weight"],
                   domain=tuple(d["domain"]))


# ---------------------------------------------------------------------------------------------- grid

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(4)


@functools.lru_cache(maxsize=8)
def _grid(domain: tuple[float, float], cells: int) -> np.ndarray:
    lo, hi = domain
    return np.sinh(np.linspace(math.asinh(lo), math.asinh(hi), cells + 1))


def _derivative(fn: Callable, x: np.ndarray, derivative: Callable | None) -> np.ndarray:
    xt = torch.from_numpy(x)
    if derivative is not None:
        with torch.no_grad():
            d = derivative(xt)
        return np.asarray(torch.as_tensor(d, dtype=torch.float64).detach().numpy(), dtype=np.float64)
    xt = xt.clone().requires_grad_(True)
    # An identity hook pair of our own: only the innermost saved-tensor hooks run, so a table computed
    # lazily inside a user's forward is invisible to their hooks (memory meters, offloading, ...).
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
        y = fn(xt)
    if not isinstance(y, torch.Tensor) or y.shape != xt.shape:
        raise TypeError("the function must map a float64 tensor to a tensor of the same shape (elementwise)")
    if not y.requires_grad:
        raise TypeError("the function is not differentiable by torch.autograd; pass derivative=callable")
    (g,) = torch.autograd.grad(y.sum(), xt)
    return g.detach().numpy()


def _moments(fn, domain, weight, derivative):
    """Per fine cell: integrals of w, w f', w f'^2 (4-point Gauss-Legendre), and the cell edges."""
    edges = _grid(domain, _FINE_CELLS)
    a, b = edges[:-1, None], edges[1:, None]
    half = (b - a) / 2
    x = (a + b) / 2 + half * _GL_NODES[None, :]
    g = _derivative(fn, x.reshape(-1), derivative).reshape(x.shape)
    if not np.all(np.isfinite(g)):
        raise ValueError("the derivative is not finite everywhere on the domain; choose a smaller domain")
    w = np.ones_like(x) if weight == "uniform" else np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    q = half * _GL_WEIGHTS[None, :] * w
    return edges, (q.sum(1), (q * g).sum(1), (q * g * g).sum(1)), x, g, half * _GL_WEIGHTS[None, :]


def _compute(fn, bits: int, weight: str, domain: tuple[float, float], derivative=None) -> Table:
    edges, (s0, s1, s2), x, g, qw = _moments(fn, domain, weight, derivative)
    k = 1 << bits
    group = _FINE_CELLS // _COARSE_CELLS
    coarse = [s.reshape(_COARSE_CELLS, group).sum(1) for s in (s0, s1, s2)]
    cuts, _ = optimal_segmentation(*coarse, k)
    cuts = refine_borders(s0, s1, s2, cuts * group)
    bounds = np.concatenate([[0], cuts, [_FINE_CELLS]])
    P0, P1, P2 = (np.concatenate([[0.0], np.cumsum(s)]) for s in (s0, s1, s2))
    w_tot = P0[bounds[1:]] - P0[bounds[:-1]]
    levels = (P1[bounds[1:]] - P1[bounds[:-1]]) / w_tot
    err = float(np.sum((P2[bounds[1:]] - P2[bounds[:-1]]) - levels * (P1[bounds[1:]] - P1[bounds[:-1]])))
    borders = edges[cuts]
    return Table(bits=bits, borders=tuple(float(t) for t in borders), levels=tuple(float(v) for v in levels),
                 error=max(err, 0.0), rms_normal=_rms_normal(x, g, qw, borders, levels),
                 weight=weight, domain=domain)


def _rms_normal(x, g, qw, borders, levels) -> float:
    q = levels[np.searchsorted(borders, x, side="right")]
    w = qw * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return float(math.sqrt(np.sum(w * (g - q) ** 2) / np.sum(w)))


def error_of(fn, borders, levels=None, weight="uniform", domain=DEFAULT_DOMAIN, derivative=None):
    """Objective value of given borders (with their best levels when `levels` is None) for `fn`.

    Used to compare against other tables, e.g. the original FewBit's, on the same quadrature.
    """
    _, (s0, s1, s2), x, g, qw = _moments(fn, tuple(domain), weight, derivative)
    borders = np.asarray(borders, np.float64)
    code = np.searchsorted(borders, x, side="right")
    w = qw * (np.ones_like(x) if weight == "uniform" else np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))
    if levels is None:
        num = np.bincount(code.ravel(), (w * g).ravel(), minlength=borders.size + 1)
        den = np.bincount(code.ravel(), w.ravel(), minlength=borders.size + 1)
        levels = num / np.where(den > 0, den, 1)
    levels = np.asarray(levels, np.float64)
    return float(np.sum(w * (g - levels[code]) ** 2))


# --------------------------------------------------------------------------------------------- cache

_lock = threading.Lock()
_cache: dict[tuple, Table] = {}


def _key(name, params, bits, weight, domain) -> str:
    p = ",".join(f"{k}={v}" for k, v in params)
    return f"{name}({p})|b{bits}|{weight}|{domain[0]:g},{domain[1]:g}"


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, dict]:
    if not _BUILTIN_PATH.exists():
        return {}
    with open(_BUILTIN_PATH) as fh:
        return json.load(fh)


def _check_common(bits, weight, domain):
    check_bits(bits)
    check_choice(weight, "weight", WEIGHTS)
    try:
        lo, hi = domain
    except (TypeError, ValueError):
        raise TypeError(f"domain must be a pair of numbers (lo, hi), got {domain!r}") from None
    lo, hi = check_real(lo, "domain's lo"), check_real(hi, "domain's hi")
    if not lo < 0 < hi:
        raise ValueError(f"domain must be finite with lo < 0 < hi, got {domain!r}")
    return lo, hi


def table(fn: Union[str, Callable[[torch.Tensor], torch.Tensor]], bits: int = 3, *,
          weight: str = "uniform", domain=DEFAULT_DOMAIN, derivative: Callable | None = None,
          **params) -> Table:
    """The L2-optimal `bits`-bit step approximation of the derivative of `fn`.

    `fn` is a name from SMOOTH_FUNCTIONS (with its torch.nn parameters, e.g. ``table('elu', 3, alpha=0.5)``)
    or any elementwise callable on float64 tensors that torch.autograd can differentiate (or pass
    `derivative`). Named tables are cached (the defaults ship precomputed); tables of callables are cached
    per callable object, so pass the same callable to reuse one.
    """
    domain = _check_common(bits, weight, domain)
    if isinstance(fn, str):
        cparams = canonical_params(fn, params)
        if derivative is not None:
            raise TypeError("derivative= is only for callables; named functions use torch.autograd")
        key = _key(fn, cparams, bits, weight, domain)
        func = None
    elif callable(fn):
        if params:
            raise TypeError(f"parameters {sorted(params)} are only for named functions; bind them in the callable")
        key = (fn, derivative, bits, weight, domain)
        func = fn
    else:
        raise TypeError(f"fn must be a function name or a callable, got {type(fn).__name__}")
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    if isinstance(fn, str):
        stored = _builtin().get(key)
        result = Table.from_dict(stored) if stored else _compute(SMOOTH_FUNCTIONS[fn].fn(**dict(cparams)),
                                                                 bits, weight, domain)
    else:
        result = _compute(func, bits, weight, domain, derivative)
    with _lock:
        _cache.setdefault(key, result)
        return _cache[key]


def compute_builtin() -> dict[str, dict]:
    """All default-parameter tables, bits 1..8, uniform weight: what builtin_tables.json ships."""
    out = {}
    variants = [(name, {}) for name in SMOOTH_FUNCTIONS] + [("gelu", {"approximate": "tanh"})]
    for name, params in variants:
        cparams = canonical_params(name, params)
        fn = SMOOTH_FUNCTIONS[name].fn(**dict(cparams))
        for bits in range(1, 9):
            out[_key(name, cparams, bits, "uniform", DEFAULT_DOMAIN)] = _compute(
                fn, bits, "uniform", DEFAULT_DOMAIN).to_dict()
    return out
