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

All are unbiased for any x and g (tested over seeds). `rownorm` is the default, by measurement
(launch/bench_linear.py, BENCHMARKS.md): every sketch gives the same grad-W error at the same k (as theory
says for these unbiased estimators), and rownorm costs least, 0.75x nn.Linear's fwd+bwd at ratio 0.2 against
0.86-0.92x for count and 1.8-2.3x for the dense ones, for 4k + 4 bytes more than the others save.

Each sketch works on 2-D tensors (B x n) in the input's dtype; index_add in fp16/bf16 sums a handful of rows
per bucket, well within their precision.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops.reference import counter_uniforms, uniform_key

__all__ = ["SKETCHES", "DEFAULT_SKETCH", "Sketch", "sketch_for"]

DEFAULT_SKETCH = "rownorm"


def _uniforms(seed, count: int, device: torch.device, stream: int = 0) -> torch.Tensor:
    """`count` float32 uniforms in [0, 1) (24 random bits) for `seed` (a one-element int64 tensor): counters
    [stream * count, (stream + 1) * count) of the counter-based hash the low-bit quantizer uses. The same
    values on every device for the same seed; no generator object, no host read of the seed (so it traces
    under torch.compile), and forward and backward regenerate the same S."""
    seed = torch.as_tensor(seed, dtype=torch.int64)  # an int is accepted too (tests, direct use)
    return counter_uniforms(uniform_key(seed.reshape(()).to(device)), stream * count, count)


def _normals(seed: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """`count` standard normals (Box-Muller on two streams of uniforms), float32."""
    u1, u2 = _uniforms(seed, count, device, 0), _uniforms(seed, count, device, 1)
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)


class Sketch:
    """Interface: `compress(x, k, seed) -> (x_s, extra)` in forward; `weighted_product(g, x_s, extra, k,
    seed)` in backward returns the grad-W estimate (S^T g)^T (S^T x).

    `extra` holds what must be saved besides x_s (None, or small tensors of size O(k)). Sketches that apply
    S to g directly implement `compress_like(g, k, seed, extra) -> S^T g`.
    """

    name: str

    def compress(self, x: torch.Tensor, k: int, seed: torch.Tensor):
        raise NotImplementedError

    def compress_like(self, g: torch.Tensor, k: int, seed: torch.Tensor, extra) -> torch.Tensor:
        raise NotImplementedError

    def weighted_product(self, g: torch.Tensor, x_s: torch.Tensor, extra, k: int = 0,
                         seed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The grad-W estimate (S^T g)^T x_s."""
        return self.compress_like(g, k, seed, extra).t() @ x_s


class _Dense(Sketch):
    def matrix(self, b: int, k: int, seed: torch.Tensor, device, dtype) -> torch.Tensor:
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
        s = _normals(seed, b * k, device).view(b, k)
        return s.mul_(1.0 / math.sqrt(k)).to(dtype)


class RademacherSketch(_Dense):
    name = "rademacher"

    def matrix(self, b, k, seed, device, dtype):
        s = torch.where(_uniforms(seed, b * k, device) < 0.5, -1.0, 1.0).view(b, k)
        return s.mul_(1.0 / math.sqrt(k)).to(dtype)


class CountSketch(Sketch):
    name = "count"

    @staticmethod
    def _hash(b, k, seed, device):
        bucket = (_uniforms(seed, b, device, 0) * k).to(torch.int64).clamp_(max=k - 1)
        sign = _uniforms(seed, b, device, 1) < 0.5
        return bucket, sign

    def _apply(self, t, k, seed):
        bucket, sign = self._hash(t.shape[0], k, seed, t.device)
        signed = torch.where(sign[:, None], t, -t)
        return torch.zeros(k, t.shape[1], dtype=t.dtype, device=t.device).index_add_(0, bucket, signed)

    def compress(self, x, k, seed):
        return self._apply(x, k, seed), None

    def compress_like(self, g, k, seed, extra):
        return self._apply(g, k, seed)


class RowNormSampling(Sketch):
    """k rows drawn i.i.d. with p_i = ||x_i|| / sum_j ||x_j||; row j of S^T x is x_{i_j} / sqrt(k p_{i_j}).

    Saved: the k sampled rows unscaled (k x n), their indices (k int32) and sum_j ||x_j|| (one fp32). The
    weights 1 / (k p_i) = total / (k ||x_i||) are recomputed in backward from the saved rows themselves: they
    are exact copies of x's rows, so their norms come out bit-identical. An all-zero (or non-finite) x is
    sampled uniformly instead, flagged by total = -1 (weights B / k).
    """

    name = "rownorm"

    def compress(self, x, k, seed):
        norms = torch.linalg.vector_norm(x.float(), dim=1)
        total = norms.sum()
        # branchless (no host sync, one graph under torch.compile): the uniform fallback is a torch.where
        usable = torch.isfinite(total) & (total > 0)
        p = torch.where(usable, norms / torch.where(usable, total, 1.0), 1.0 / norms.numel())
        total = torch.where(usable, total, -1.0)
        # k draws with replacement by inverse CDF (float64 sums); a row of p = 0 owns an empty interval
        cdf = torch.cumsum(p.double(), 0)
        u = _uniforms(seed, k, x.device).double() * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=p.numel() - 1)
        return x.index_select(0, idx), (idx.to(torch.int32), total.reshape(()))

    def weights(self, x_s, rows, extra) -> torch.Tensor:
        """1 / (k p_i) for the sampled rows, in fp32 (no host sync: the uniform case is a torch.where)."""
        idx, total = extra
        k = idx.numel()
        by_norm = total / (k * torch.linalg.vector_norm(x_s.float(), dim=1))
        return torch.where(total < 0, torch.full_like(by_norm, rows / k), by_norm)

    def weighted_product(self, g, x_s, extra, k=0, seed=None) -> torch.Tensor:
        """(S^T g)^T (S^T x) = sum_j w_j g_{i_j}^T x_{i_j}, with the weights folded into g's rows."""
        w = self.weights(x_s, g.shape[0], extra)
        g_s = g.index_select(0, extra[0]) * w[:, None].to(g.dtype)
        return g_s.t() @ x_s


SKETCHES = {s.name: s for s in (GaussianSketch(), RademacherSketch(), CountSketch(), RowNormSampling())}


def sketch_for(name: Optional[str]) -> Sketch:
    name = DEFAULT_SKETCH if name is None else name
    try:
        return SKETCHES[name]
    except (KeyError, TypeError):
        raise ValueError(f"sketch must be one of {', '.join(sorted(SKETCHES))}, got {name!r}") from None
