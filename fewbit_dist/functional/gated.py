"""The gated product of a GLU MLP (SwiGLU, GeGLU), `h = act(gate) * up`, saving only gate and up.

Left to autograd, `act(gate_proj(x)) * up_proj(x)` keeps gate (for act's backward), act(gate) and up (for
the product's), and the down projection keeps h as well: four tensors of the MLP's width. Here:

- forward: h = act(gate) * up with the activation's own forward (values bit-identical to the module's);
- mode "exact": saves gate and up. Backward recomputes act(gate) and runs the very operations autograd
  would (act's backward through torch.autograd, the product's rule), in the same dtype: gradients are those
  of the unconverted module. It offers the layer reading h (the down projection) the recipe h = act(gate) *
  up, exact, so a converted down projection saves nothing of its own.
- mode "compressed": saves gate and up quantized to `bits` per element (LowBitLinear's group quantizer,
  stochastic rounding by default) and computes the same backward from the dequantized copies; the down
  projection shares them (h ~ act(gate_hat) * up_hat) and rebuilds h in row chunks for its weight gradient.
- backward works by row chunks of GATED_CHUNK_BYTES: besides grad_h and the two gradients it returns, it
  holds a few chunk-sized pieces (gate, up, act(gate), act's backward), not four more tensors of the MLP's
  width, which set the real peak of a checkpointed step's backward before (launch/bench_peak.py --trace).

Hooks on the activation module: its forward hooks fire once per forward (the call in forward); backward's
recomputes of act(gate) run its `forward` without hooks, and its backward hooks do not fire (the product is
one autograd op, as any fused kernel would be).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from ..chunks import chunk_starts
from ..memory import storage_id
from ..validation import check_callable, check_choice, check_generator, check_tensor
from . import shared_input
from .linear import draw_seed
from .lowbit import check_lowbit_args, quantize_input

__all__ = ["gated_product", "GATED_MODES"]

GATED_MODES = ("exact", "compressed")


def _hookless(act):
    """The activation's computation without its module hooks: backward's recomputes of act(gate) are not
    calls of the module (a forward hook must not fire again in backward, and a full backward hook's
    autograd.Function cannot run inside torch.func.vjp)."""
    return act.forward if isinstance(act, torch.nn.Module) else act


def _times(a: torch.Tensor, up: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """a * up, in place in `a` (no second temporary of the MLP's width) when that gives the same tensor: a's
    dtype is the product's and a shares no memory with `inputs` (an activation may return its input). Under
    torch.compile out of place: memory addresses are not traceable, and the compiler plans buffers itself."""
    if torch.compiler.is_compiling():
        return a * up
    same_result = a.dtype == torch.promote_types(a.dtype, up.dtype) and a.shape == torch.broadcast_shapes(a.shape,
                                                                                                          up.shape)
    aliased = any(storage_id(a) == storage_id(t) for t in (up, *inputs))
    return a.mul_(up) if same_result and not aliased else a * up


class _HRecipe:
    """Rebuilds h = act(gate) * up, as [rows, cols], from gate and up saved as they are (mode "exact": bit for
    bit, whole, so an exact consumer's weight gradient is autograd's). Holds no tensor."""

    def __init__(self, act):
        self.act = _hookless(act)

    def __call__(self, gate, up, *, dtype):
        with torch.no_grad():
            h = self.act(gate) * up
        h = h.reshape(-1, h.shape[-1])
        return h if h.dtype == dtype else h.to(dtype)


class _CompressedHRecipe:
    """Rebuilds h = act(gate_hat) * up_hat, as [rows, cols], from gate's and up's codes (`restores`: their
    QuantizedRestorers, `dtypes`: gate's and up's dtypes): whole, or rows r0:r1 alone (`rows`), holding at
    most two row-sized pieces at once (`row_cost`), so the down projection's weight gradient rebuilds h in
    bounded chunks. Holds no tensor."""

    row_cost = 2

    def __init__(self, act, restores, dtypes):
        self.act, self.restores, self.dtypes = _hookless(act), restores, dtypes

    def __call__(self, *tensors, dtype):
        return self.rows(*tensors, dtype=dtype, r0=0, r1=None)

    def rows(self, *tensors, dtype, r0: int, r1: Optional[int]):
        restore_g, restore_u = self.restores
        with torch.no_grad():
            gate = restore_g(tensors[:3], self.dtypes[0]) if r1 is None else \
                restore_g.rows(tensors[:3], self.dtypes[0], r0, r1)
            h = self.act(gate)
            del gate
            up = restore_u(tensors[3:], self.dtypes[1]) if r1 is None else \
                restore_u.rows(tensors[3:], self.dtypes[1], r0, r1)
            h = _times(h, up)
        return h if h.dtype == dtype else h.to(dtype)


GATED_CHUNK_BYTES = 2 << 20  # backward works on row chunks whose float32 pieces stay within this size


def _chunk_rows(n: int, cols: int) -> int:
    """Rows per chunk of the gated backward: a multiple of 8 (quantized rows start on a byte every 8 rows),
    at least 8, with one float32 piece of at most GATED_CHUNK_BYTES; all n when they fit in one chunk."""
    rows = max(8, GATED_CHUNK_BYTES // max(1, 4 * cols) // 8 * 8)
    return n if n <= rows else rows


class _GatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, mode, bits, group_size, rounding, seed):
        with torch.no_grad():
            h = _times(act(gate), up, gate)
        ctx.act, ctx.mode, ctx.shape = act, mode, gate.shape
        ctx.dtypes = (gate.dtype, up.dtype)
        if mode == "exact":
            ctx.save_for_backward(gate, up)
            saved = shared_input.RecomputedInput((gate, up), _HRecipe(act), exact=True)
        else:
            qg = quantize_input(gate.detach().reshape(-1, gate.shape[-1]), bits, group_size, rounding, seed)
            qu = quantize_input(up.detach().reshape(-1, up.shape[-1]), bits, group_size, rounding, seed + 1)
            ctx.restores = (qg.restorer(), qu.restorer())
            ctx.save_for_backward(*qg.tensors(), *qu.tensors())
            saved = shared_input.RecomputedInput(
                (*qg.tensors(), *qu.tensors()), _CompressedHRecipe(act, ctx.restores, ctx.dtypes), exact=False)
        ctx.share_key = shared_input.offer(h, saved)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        """Row chunk by row chunk (`_chunk_rows`): each chunk's gate and up (slices of the saved tensors, or
        dequantized from the codes), act(gate) and act's backward, so the transients stay within a few chunks
        whatever the batch; only the two gradients are full-sized. Elementwise, so each element's gradient is
        the one the whole tensors give."""
        shared_input.forget(ctx.share_key)
        need_gate, need_up = ctx.needs_input_grad[:2]
        cols = ctx.shape[-1]
        g2 = grad_h.reshape(-1, cols)
        n = g2.shape[0]
        t = ctx.saved_tensors
        if ctx.mode == "exact":
            gate2, up2 = (x.detach().reshape(-1, cols) for x in t)
        act = _hookless(ctx.act)
        step = _chunk_rows(n, cols)
        grad_gate = grad_up = None
        for r0 in chunk_starts(n, step):
            r1 = min(n, r0 + step)
            if ctx.mode == "exact":
                gate, up = gate2[r0:r1], up2[r0:r1]
            else:
                gate = ctx.restores[0].rows(t[:3], ctx.dtypes[0], r0, r1)
                up = ctx.restores[1].rows(t[3:], ctx.dtypes[1], r0, r1)
            g = g2[r0:r1]
            # act's own backward through torch.func.vjp: autograd's derivative formulas, traceable by
            # torch.compile (torch.autograd.grad inside a backward is not)
            a, act_vjp = torch.func.vjp(act, gate)
            # The product's backward as autograd computes it: each factor's gradient is grad_h times the other.
            part_up = g * a if need_up else None
            del a
            part_gate = act_vjp(g * up)[0] if need_gate else None
            if step == n:
                grad_gate, grad_up = part_gate, part_up
                break
            if r0 == 0:
                grad_gate = g2.new_empty((n, cols), dtype=part_gate.dtype) if need_gate else None
                grad_up = g2.new_empty((n, cols), dtype=part_up.dtype) if need_up else None
            if need_gate:
                grad_gate[r0:r1] = part_gate
            if need_up:
                grad_up[r0:r1] = part_up
            del gate, up, act_vjp, part_gate, part_up
        shape = ctx.shape
        return (None if grad_gate is None else grad_gate.reshape(shape),
                None if grad_up is None else grad_up.reshape(shape), None, None, None, None, None, None)


def gated_product(gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor], *,
                  mode: str = "exact", bits: int = 8, group_size: int = 128, rounding: str = "stochastic",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """act(gate) * up with less saved (see the module docstring). `act` is the model's own elementwise
    activation (a module or function differentiable by torch.autograd)."""
    check_tensor(gate, "gate")
    check_tensor(up, "up")
    check_callable(act, "act")
    check_choice(mode, "mode", GATED_MODES)
    check_lowbit_args(bits, group_size, rounding)
    check_generator(generator)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    seed = draw_seed(generator) if mode == "compressed" else 0
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return act(gate) * up
    return _GatedFn.apply(gate, up, act, mode, bits, group_size, rounding, seed)
