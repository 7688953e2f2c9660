"""torch.nn.LayerNorm (BERT, MiniLM, RoBERTa, GPT-2 in transformers) computed by
fewbit_dist.functional.layer_norm: "exact" (its input saved once, linear layers reading its output save
nothing) or "compressed" (its normalized input saved at a few bits and shared with those layers).

Only `nn.LayerNorm` itself, over one dimension, is converted: a subclass may compute something else. The
module stays the same object, of the same class, with its parameters, state_dict and hooks; only its forward is
replaced on the instance (decoder.set_forward, which also keeps accelerate's hooks wrapping it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.layer_norm import layer_norm
from ..functional.lowbit import check_lowbit_args
from ..functional.norm import NORM_MODES
from ..validation import check_choice
from .decoder import set_forward

__all__ = ["is_layer_norm", "convert_layer_norm"]


def is_layer_norm(module: nn.Module) -> bool:
    """An nn.LayerNorm (exactly that class) normalizing over one dimension, converted or not."""
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


def _layer_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
    if tuple(input.shape[-1:]) != tuple(self.normalized_shape):  # torch's own error, as before conversion
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
    s = self.__dict__["_fewbit_layer_norm"]
    return layer_norm(input, self.weight, self.bias, self.eps, mode=s["mode"], bits=s["bits"],
                      group_size=s["group_size"], rounding=s["rounding"])


def convert_layer_norm(module: nn.Module, mode: str, bits: int, group_size: int, rounding: str) -> bool:
    """Give an nn.LayerNorm the few-bit forward (`mode` "exact" or "compressed"; `bits`, `group_size` and
    `rounding` as LowBitLinear's, used by "compressed"). False (and nothing changed) for any other module;
    converting again replaces the settings."""
    if not is_layer_norm(module):
        return False
    check_choice(mode, "mode", NORM_MODES)
    check_lowbit_args(bits, group_size, rounding)
    module.__dict__["_fewbit_layer_norm"] = dict(mode=mode, bits=bits, group_size=group_size, rounding=rounding)
    set_forward(module, _layer_norm_forward)
    return True
