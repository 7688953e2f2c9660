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
  projection shares them (h ~ act(gate_hat) * up_hat).

Hooks on the activation module: its forward hooks fire once per forward (the call in forward); backward's
recomputes of act(gate) run its `forward` without hooks, and its backward hooks do not fire (the product is
one autograd op, as any fused kernel would be).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

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


class _HRecipe:
    """Rebuilds h = act(gate) * up, as [rows, cols], from the saved parts: gate and up themselves, or their
    codes (`restores`: the quantized inputs' restorers, `dtypes`: gate's and up's dtypes). Holds no tensor."""

    def __init__(self, act, restores=None, dtypes=None):
        self.act, self.restores, self.dtypes = _hookless(act), restores, dtypes

    def __call__(self, *tensors, dtype):
        if self.restores is None:
            gate, up = tensors
        else:
            gate = self.restores[0](tensors[:3], self.dtypes[0])
            up = self.restores[1](tensors[3:], self.dtypes[1])
        with torch.no_grad():
            h = self.act(gate) * up
        h = h.reshape(-1, h.shape[-1])
        return h if h.dtype == dtype else h.to(dtype)


class _GatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act, mode, bits, group_size, rounding, seed):
        with torch.no_grad():
            h = act(gate) * up
        ctx.act, ctx.mode, ctx.shape = act, mode, gate.shape
        ctx.dtypes = (gate.dtype, up.dtype)
        if mode == "exact":
            ctx.save_for_backward(gate, up)
            saved = shared_input.RecomputedInput((gate, up), _HRecipe(act), exact=True)
        else:
            qg = quantize_input(gate.detach().reshape(-1, gate.shape[-1]), bits, group_size, rounding, seed)
            qu = quantize_input(up.detach().reshape(-1, up.shape[-1]), bits, group_size, rounding, seed + 1)
            restore_g, restore_u = qg.restorer(), qu.restorer()
            ctx.restores = (restore_g, restore_u)
            ctx.save_for_backward(*qg.tensors(), *qu.tensors())
            saved = shared_input.RecomputedInput(
                (*qg.tensors(), *qu.tensors()), _HRecipe(act, ctx.restores, ctx.dtypes), exact=False)
        ctx.share_key = shared_input.offer(h, saved)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        shared_input.forget(ctx.share_key)
        if ctx.mode == "exact":
            gate, up = ctx.saved_tensors
        else:
            t = ctx.saved_tensors
            gate = ctx.restores[0](t[:3], ctx.dtypes[0]).view(ctx.shape)
            up = ctx.restores[1](t[3:], ctx.dtypes[1]).view(ctx.shape)
        # act's own backward through torch.func.vjp: autograd's derivative formulas, traceable by torch.compile
        # (torch.autograd.grad inside a backward is not)
        a, act_vjp = torch.func.vjp(_hookless(ctx.act), gate.detach())
        # The product's backward as autograd computes it: each factor's gradient is grad_h times the other.
        grad_up = grad_h * a if ctx.needs_input_grad[1] else None
        grad_gate = act_vjp(grad_h * up)[0] if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, None, None, None, None, None, None


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
