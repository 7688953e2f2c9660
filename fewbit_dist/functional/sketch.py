"""Random sketches S (B x k, E[S S^T] = I_B) for the weight gradient of a linear layer.

RandomizedLinear saves S^T x (k rows) instead of x (B rows) and computes grad_W ~ (S^T g)^T (S^T x) =
g^T S S^T x, an unbiased estimate of g^T x because E[S S^T] = I. A sketch is regenerated in backward from a
seed, so only the seed is kept (row sampling also keeps its k row indices and weights: O(k)).

| name          | S                                                    | cost of S^T x    | scaling                  |
|---------------|------------------------------------------------------|------------------|--------------------------|
| gaussian      | i.i.d. N(0, 1/k) entries (dense, as in the paper)     | O(k B n)         | 1/sqrt(k): E[SS^T] = I   |
| rademacher    | i.i.d. +-1/sqrt(k) entries (dense)                    | O(k B n)         | 1/sqrt(k)                |
| count         | one +-1 per row of S at a uniform column (CountSketch) | O(B n)           | none: E[s_i s_j [h_i=h_j]] = [i=j] |
| rownorm       | k rows of x sampled i.i.d. with p_i ~ ||x_i||, each   | O(B n) (norms)   | 1/sqrt(k p_i): sum_i p_i e_i e_i^T/p_i = I |
|               | scaled (importance sampling with replacement)         |                  |                          |

All are unbiased for any x and g (tested over seeds). `count` is the default: measured on the benchmark
shapes it has the lowest grad-W error per saved byte among the cheap sketches and matches the dense ones
(launch/bench_linear.py, BENCHMARKS.md).

Each sketch works on 2-D tensors (B x n) in the input's dtype; index_add in fp16/bf16 sums a handful of rows
per bucket, well within their precision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["SKETCHES", "DEFAULT_SKETCH", "Sketch", "sketch_for"]

DEFAULT_SKETCH = "count"


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Sketch:
    """Interface: `compress(x, k, seed) -> (x_s, extra)`; `compress_like(g, k, seed, extra, rows) -> g_s`.

    `extra` holds what must be saved besides x_s (None, or small tensors of size O(k)); `compress_like`
    applies the same S to another (B x m) tensor.
    """

    name: str

    def compress(self, x: torch.Tensor, k: int, seed: int):
        raise NotImplementedError

    def compress_like(self, g: torch.Tensor, k: int, seed: int, extra) -> torch.Tensor:
        raise NotImplementedError


class _Dense(Sketch):
    def matrix(self, b: int, k: int, seed: int, device, dtype) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, x, k, seed):
        s = self.matrix(x.shape[0], k, seed, x.device, x.dtype)
        return s.t() @ x, None

    def compress_like(self, g, k, seed, extra):
        return self.matrix(g.shape[0], k, seed, g.device, g.dtype).t() @ g


class GaussianSketch(_Dense):
    name = "gaussian"

    def matrix(self, b, k, seed, device, dtype):
        # Drawn in fp32 (randn has no fp16 kernel on some devices), then cast: the same S in fwd and bwd.
        s = torch.randn(b, k, generator=_generator(seed, device), device=device, dtype=torch.float32)
        return s.mul_(1.0 / math.sqrt(k)).to(dtype)


class RademacherSketch(_Dense):
    name = "rademacher"

    def matrix(self, b, k, seed, device, dtype):
        s = torch.randint(0, 2, (b, k), generator=_generator(seed, device), device=device, dtype=torch.int8)
        return (s.to(torch.float32).mul_(2.0).sub_(1.0).mul_(1.0 / math.sqrt(k))).to(dtype)


class CountSketch(Sketch):
    name = "count"

    @staticmethod
    def _hash(b, k, seed, device):
        g = _generator(seed, device)
        bucket = torch.randint(0, k, (b,), generator=g, device=device)
        sign = torch.randint(0, 2, (b,), generator=g, device=device, dtype=torch.int8)
        return bucket, sign

    def _apply(self, t, k, seed):
        bucket, sign = self._hash(t.shape[0], k, seed, t.device)
        signed = torch.where(sign[:, None].bool(), t, -t)
        return torch.zeros(k, t.shape[1], dtype=t.dtype, device=t.device).index_add_(0, bucket, signed)

    def compress(self, x, k, seed):
        return self._apply(x, k, seed), None

    def compress_like(self, g, k, seed, extra):
        return self._apply(g, k, seed)


class RowNormSampling(Sketch):
    name = "rownorm"

    def compress(self, x, k, seed):
        norms = torch.linalg.vector_norm(x.float(), dim=1)
        total = norms.sum()
        if not torch.isfinite(total) or total <= 0:  # all-zero (or non-finite) input: sample uniformly
            norms = torch.ones_like(norms)
            total = norms.sum()
        p = norms / total
        idx = torch.multinomial(p, k, replacement=True, generator=_generator(seed, x.device))
        scale = (k * p[idx]).rsqrt()
        x_s = x.index_select(0, idx) * scale[:, None].to(x.dtype)
        return x_s, (idx.to(torch.int32), scale)

    def compress_like(self, g, k, seed, extra):
        idx, scale = extra
        return g.index_select(0, idx) * scale[:, None].to(g.dtype)


SKETCHES = {s.name: s for s in (GaussianSketch(), RademacherSketch(), CountSketch(), RowNormSampling())}


def sketch_for(name: Optional[str]) -> Sketch:
    name = DEFAULT_SKETCH if name is None else name
    try:
        return SKETCHES[name]
    except (KeyError, TypeError):
        raise ValueError(f"sketch must be one of {', '.join(sorted(SKETCHES))}, got {name!r}") from None
