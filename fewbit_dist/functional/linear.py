"""Randomized linear layer: exact forward, grad input and grad bias; unbiased sketched grad weight.

    y = x W^T + b                       exact
    grad_x = g W,  grad_b = sum_rows g  exact
    grad_W ~ (S^T g)^T (S^T x)          unbiased: E[S S^T] = I (see sketch.py)

Forward saves S^T x (k x n_in, in x's dtype) and the seed of S; backward regenerates S. With k >= B (the
number of rows, the product of x's leading dims) sketching saves nothing, so x itself is kept and grad_W is
exact.

Seeds. Each call draws a fresh 62-bit seed from torch's default CPU generator (or from `generator`), so
`torch.manual_seed` makes runs reproducible and consecutive steps use different sketches. It draws one with
or without autograd, so the RNG stream after the layer (dropout masks) does not depend on the grad mode. Activation
checkpointing (torch.utils.checkpoint, reentrant or not; DeepSpeed's) restores the CPU RNG state before it
recomputes a forward, so the recompute draws the same seed and saves the same sketch. Data-parallel ranks
usually share one seed (torch.manual_seed(s) everywhere), which would give every rank the same S and stop
the averaged gradient's variance from shrinking with the number of ranks; so the drawn seed is mixed with
the torch.distributed rank when a process group is initialized: every rank sketches independently.
The seed is a one-element int64 tensor that is never read on the host: drawing it does not synchronize a
device, and under torch.compile it is a value of the graph (a fresh seed per call, as in eager), not a
constant baked into it. The sketches turn it into randomness with a counter-based hash (sketch.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import shared_input
from ..chunks import chunk_starts
from ..validation import check_int
from .sketch import sketch_for

__all__ = ["randomized_linear", "exact_linear", "projection_dim", "draw_seed", "apply_linear_function",
           "exact_input_and_bias_grads", "linear_forward", "weight_grad", "restored_weight_grad", "cast_operands"]

_SEED_BITS = 62
_GOLDEN = 0x9E3779B97F4A7C15  # odd constant of the golden ratio: spreads ranks over the seed space


def draw_seed(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh 62-bit seed from `generator` (default: torch's CPU generator), mixed with the distributed rank:
    a one-element int64 tensor on the generator's device, never read on the host (no synchronization, and
    torch.compile traces it as a graph value)."""
    if generator is None:
        seed = torch.randint(0, 1 << _SEED_BITS, (1,), dtype=torch.int64)
    else:
        seed = torch.randint(0, 1 << _SEED_BITS, (1,), generator=generator, device=generator.device,
                             dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        offset = (torch.distributed.get_rank() * _GOLDEN) % (1 << _SEED_BITS)  # both terms < 2^62: no overflow
        seed = (seed + offset) % (1 << _SEED_BITS)
    return seed


def projection_dim(rows: int, proj_dim: Optional[int] = None, proj_dim_ratio: Optional[float] = None,
                   proj_dim_min: Optional[int] = None, proj_dim_max: Optional[int] = None) -> int:
    """k for a batch of `rows` rows: proj_dim, or ceil(proj_dim_ratio * rows), clamped to [min, max], >= 1."""
    k = proj_dim if proj_dim is not None else math.ceil(proj_dim_ratio * rows)
    if proj_dim_min is not None:
        k = max(k, proj_dim_min)
    if proj_dim_max is not None:
        k = min(k, proj_dim_max)
    return max(1, k)


def apply_linear_function(fn, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *args):
    """`fn.apply(input, weight, bias, compute_dtype, *args)` for a linear autograd.Function with a compressed
    saved input, or plain F.linear when autograd will not need it.

    Under torch.autocast, `compute_dtype` is the autocast dtype and `fn` casts the operands itself (as autocast
    does for F.linear), with autocast off; otherwise it is None. Casting inside the function is what lets it
    save the Parameter rather than autocast's per-layer weight copy (recast in backward), and key a shared
    saved input on the tensor the layers read rather than on each layer's own cast."""
    if not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return F.linear(input, weight, bias)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fn.apply(input, weight, bias, dtype, *args)
    return fn.apply(input, weight, bias, None, *args)


def cast_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype):
    """The operands as F.linear sees them under autocast to `dtype` (None: unchanged)."""
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def linear_forward(ctx, x, weight, bias, dtype) -> torch.Tensor:
    """y = F.linear on the (autocast-)cast operands; records on ctx what the exact gradients need."""
    xc, wc, bc = cast_operands(x, weight, bias, dtype)
    ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
    ctx.compute_dtype = xc.dtype
    return F.linear(xc, wc, bc)


def exact_input_and_bias_grads(ctx, g2: torch.Tensor, weight: torch.Tensor, bias_dtype=None):
    """grad_x = g W (shaped like the input, in its dtype) and grad_b = sum of g's rows, each when needed
    (else None). `weight` is the Parameter: it is cast to g's dtype here, as the forward cast it."""
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = (g2 @ weight.to(g2.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = g2.sum(0)
        grad_b = grad_b.to(bias_dtype) if bias_dtype is not None else grad_b
    return grad_x, grad_b


def weight_grad(g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g^T x in the compute dtype, returned in the Parameter's dtype (as autocast's cast-backward does)."""
    return (g2.t() @ x2.to(g2.dtype)).to(weight.dtype)


RESTORE_CHUNK_BYTES = 16 << 20  # the largest piece of a lossy saved input rebuilt at once in backward


def restored_weight_grad(g2: torch.Tensor, restore, tensors, weight: torch.Tensor) -> torch.Tensor:
    """g^T x_hat with x_hat rebuilt by `restore` from the saved `tensors`. A restorer that can rebuild rows
    (`restore.rows`: quantized inputs, the compressed gated product's recipe) is called on row chunks of at
    most RESTORE_CHUNK_BYTES (divided by the restorer's `row_cost`, its transients per row), summed
    in float32 (float64 for float64): backward never holds the whole rebuilt input, a fresh input-sized
    buffer per layer whose page faults cost as much time as the dequantization on a CPU. Measured there
    (LowBitLinear 4-bit, 8192 x 1024 -> 1024, fwd+bwd against nn.Linear, 11 interleaved rounds): whole
    1.15x, 4 MiB chunks 1.18x (products over 1024 rows run slower), 8 MiB 1.08x, 16 MiB 1.06x."""
    rows_of = getattr(restore, "rows", None)
    n = g2.shape[0]
    cost = getattr(restore, "row_cost", 1)  # a recipe's transients per rebuilt row (the gated product's: 2)
    chunk = RESTORE_CHUNK_BYTES // max(1, cost * g2.shape[1] * g2.element_size()) // 8 * 8
    if rows_of is None or chunk < 8 or n <= chunk:
        return weight_grad(g2, restore(tensors, g2.dtype), weight)
    acc_dtype = torch.promote_types(g2.dtype, torch.float32)  # half types sum their chunks in float32
    acc = None
    for r0 in chunk_starts(n, chunk):
        r1 = min(n, r0 + chunk)
        part_x = rows_of(tensors, g2.dtype, r0, r1)
        if acc is None:
            acc = (g2[r0:r1].t() @ part_x).to(acc_dtype)
        elif g2.dtype == acc_dtype:
            acc.addmm_(g2[r0:r1].t(), part_x)
        else:
            acc += (g2[r0:r1].t() @ part_x).to(acc_dtype)
        del part_x  # before the next chunk is rebuilt: else two chunks are alive at once
    return acc.to(weight.dtype)


def save_shared_input(ctx, weight: torch.Tensor, key, saved: shared_input.SavedInput) -> None:
    """Save the Parameter and the saved form of the input (shared with the input's other readers)."""
    ctx.share_key, ctx.restore = key, saved.restorer()
    ctx.save_for_backward(weight, *saved.tensors())


def shared_input_linear_backward(ctx, grad_out: torch.Tensor):
    """(grad_x, grad_W, grad_b) of a linear function that saved with `save_shared_input`: exact grad_x and
    grad_b, grad_W = g^T x from the restored input (exact or not, as the saved form is)."""
    weight, *rest = ctx.saved_tensors
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x, grad_b = exact_input_and_bias_grads(ctx, g2, weight, ctx.bias_dtype)
    grad_w = None
    if ctx.needs_input_grad[1]:
        shared_input.forget(ctx.share_key)
        grad_w = restored_weight_grad(g2, ctx.restore, rest, weight)
    return grad_x, grad_w, grad_b


class _ExactLinearFn(torch.autograd.Function):
    """F.linear with exact gradients that saves the Parameter (not autocast's copy of it) and one copy of its
    input shared by every layer that reads the same tensor (fewbit_dist.functional.shared_input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        y = linear_forward(ctx, x, weight, bias, dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if not ctx.needs_input_grad[1]:
            ctx.share_key = None
            ctx.save_for_backward(weight)
            return y
        key, saved = shared_input.take(x, exact=True, tag=ctx.compute_dtype)
        if saved is None:
            x2 = x.reshape(-1, x.shape[-1])
            saved = shared_input.ExactInput(x2 if x2.dtype == ctx.compute_dtype else x2.to(ctx.compute_dtype))
            key = shared_input.offer(x, saved, tag=ctx.compute_dtype)
        save_shared_input(ctx, weight, key, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return (*shared_input_linear_backward(ctx, grad_out), None)


def exact_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, values and gradients unchanged, saving less: the Parameter instead of autocast's weight copy
    and one input copy shared with the other layers that read the same tensor (Q/K/V, gate/up), or none at
    all when the tensor's producer (a converted norm or gated MLP) can rebuild it exactly."""
    return apply_linear_function(_ExactLinearFn, input, weight, bias)


class _RandomizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, k, sketch_name, seed):
        y = linear_forward(ctx, x, weight, bias, dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        x = x.to(ctx.compute_dtype)
        if not ctx.needs_input_grad[1]:  # nothing to estimate: keep only what grad_x needs
            ctx.mode = "none"
            ctx.save_for_backward(weight)
            return y
        x2 = x.reshape(-1, x.shape[-1])
        if k >= x2.shape[0]:
            ctx.mode = "exact"
            ctx.save_for_backward(weight, x2)
            return y
        sketch = sketch_for(sketch_name)
        x_s, extra = sketch.compress(x2, k, seed)
        ctx.mode, ctx.sketch, ctx.k = "sketch", sketch, k
        ctx.save_for_backward(weight, x_s, seed, *(extra or ()))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weight, *rest = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_b = exact_input_and_bias_grads(ctx, g2, weight, ctx.bias_dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.mode == "exact":
                grad_w = weight_grad(g2, rest[0], weight)
            else:
                x_s, seed, extra = rest[0], rest[1], tuple(rest[2:]) or None
                grad_w = ctx.sketch.weighted_product(g2, x_s, extra, ctx.k, seed).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def randomized_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                      proj_dim: int, sketch: Optional[str] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """F.linear with a sketched weight gradient of `proj_dim` rows (see the module docstring).

    Under torch.autocast the operands are cast to the autocast dtype first, as autocast does for F.linear.
    """
    check_int(proj_dim, "proj_dim", lo=1)
    sketch_for(sketch)  # validate the name early
    # Always draw, with or without autograd: reentrant checkpointing runs the forward once without grad and
    # again with it from the same RNG state, and both runs must consume the RNG alike (dropout after us!).
    seed = draw_seed(generator)
    return apply_linear_function(_RandomizedLinearFn, input, weight, bias, proj_dim, sketch, seed)
