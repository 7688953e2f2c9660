"""Decoder-LLM blocks of Hugging Face transformers: RMSNorm, gated MLPs, the causal-LM head's loss.

Recognized by what their forward computes, not by a list of model names: the forward's source is compared
with the few shapes transformers uses (Llama, Qwen2/3, Mistral, Gemma, and the many families copied from
them), so a family whose module computes something else is left alone rather than silently changed.

Converted modules stay the same objects, of the same class, with their hooks and parameters: only their
`forward` is replaced on the instance (accelerate's hooks, which wrap `forward` themselves, keep wrapping).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from typing import Optional

from torch import nn

from ..functional.gated import gated_product
from ..functional.loss import chunked_causal_lm_loss, fuse_head
from ..functional.norm import rms_norm

__all__ = ["rms_norm_style", "is_gated_mlp", "is_causal_lm", "convert_rms_norm", "convert_gated_mlp",
           "convert_causal_lm", "set_forward"]


@functools.lru_cache(maxsize=None)
def _forward_source(cls) -> str:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""
    return re.sub(r"\s+", "", src)


def set_forward(module: nn.Module, forward) -> None:
    """Give `module` a new forward on the instance. Under accelerate's hooks (which keep the module's own
    forward as `_old_forward` and call it from their wrapper) the new forward goes there instead."""
    bound = types.MethodType(forward, module)
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        module._old_forward = bound
    else:
        module.forward = bound


# -------------------------------------------------------------------------------------------- RMSNorm

_LLAMA_NORM = ("hidden_states=hidden_states.to(torch.float32)", "variance=hidden_states.pow(2).mean(-1,keepdim=True)",
               "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)",
               "returnself.weight*hidden_states.to(input_dtype)")
_GEMMA_NORM = ("output=self._norm(x.float())", "output=output*(1.0+self.weight.float())", "returnoutput.type_as(x)")
_GEMMA_NORM_BODY = "returnx*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)"


def rms_norm_style(module: nn.Module) -> Optional[str]:
    """'llama' or 'gemma' for a Hugging Face RMSNorm computing exactly that, else None."""
    cls = type(module)
    if not cls.__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), nn.Parameter):
        return None
    src = _forward_source(cls)
    if all(part in src for part in _LLAMA_NORM) and hasattr(module, "variance_epsilon"):
        return "llama"
    if all(part in src for part in _GEMMA_NORM) and hasattr(module, "eps"):
        try:
            norm_src = re.sub(r"\s+", "", inspect.getsource(cls._norm))
        except (OSError, TypeError, AttributeError):
            return None
        if _GEMMA_NORM_BODY in norm_src:
            return "gemma"
    return None


def _rms_norm_forward(self, hidden_states):
    s = self.__dict__["_fewbit_norm"]
    eps = self.variance_epsilon if s["style"] == "llama" else self.eps
    return rms_norm(hidden_states, self.weight, eps, style=s["style"], mode=s["mode"], bits=s["bits"],
                    group_size=s["group_size"], rounding=s["rounding"])


def convert_rms_norm(module: nn.Module, mode: str, bits: int, group_size: int, rounding: str) -> bool:
    style = rms_norm_style(module)
    if style is None:
        return False
    module.__dict__["_fewbit_norm"] = dict(style=style, mode=mode, bits=bits, group_size=group_size,
                                           rounding=rounding)
    set_forward(module, _rms_norm_forward)
    return True


# ------------------------------------------------------------------------------------------ gated MLP

_GATED = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def is_gated_mlp(module: nn.Module) -> bool:
    """A module whose forward returns down_proj(act_fn(gate_proj(x)) * up_proj(x)) (SwiGLU/GeGLU MLPs)."""
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    if not callable(getattr(module, "act_fn", None)):
        return False
    return _GATED in _forward_source(type(module))


def _gated_mlp_forward(self, x):
    s = self.__dict__["_fewbit_gated"]
    h = gated_product(self.gate_proj(x), self.up_proj(x), self.act_fn, mode=s["mode"], bits=s["bits"],
                      group_size=s["group_size"], rounding=s["rounding"])
    return self.down_proj(h)


def convert_gated_mlp(module: nn.Module, mode: str, bits: int, group_size: int, rounding: str) -> bool:
    if not is_gated_mlp(module):
        return False
    module.__dict__["_fewbit_gated"] = dict(mode=mode, bits=bits, group_size=group_size, rounding=rounding)
    set_forward(module, _gated_mlp_forward)
    return True


# ------------------------------------------------------------------------------------- causal-LM loss


def is_causal_lm(module: nn.Module) -> bool:
    """A Hugging Face *ForCausalLM whose forward is `lm_head(hidden)` then `self.loss_function(...)`."""
    src = _forward_source(type(module))
    base = getattr(module, getattr(module, "base_model_prefix", ""), None)
    return (isinstance(getattr(module, "lm_head", None), nn.Module) and isinstance(base, nn.Module)
            and "logits=self.lm_head(hidden_states" in src and "self.loss_function(" in src)


def _causal_lm_forward(self, *args, labels=None, **kwargs):
    if labels is None and kwargs.get("shift_labels") is None:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    s = self.__dict__["_fewbit_loss"]
    kwargs.pop("logits_to_keep", None)
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    base = getattr(self, self.base_model_prefix)
    outputs = base(*args, **kwargs)
    hidden = outputs[0]
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = chunked_causal_lm_loss(hidden, self.lm_head, labels, shift_labels=shift_labels,
                                  num_items_in_batch=num_items, ignore_index=ignore_index,
                                  chunk_rows=s["chunk_rows"], softcap=softcap)
    fields = {k: v for k, v in outputs.items() if k in CausalLMOutputWithPast.__dataclass_fields__}
    fields.pop("logits", None)
    fields.pop("loss", None)
    return CausalLMOutputWithPast(loss=loss, logits=None, **fields)


@functools.lru_cache(maxsize=None)
def _causal_lm_forward_for(cls):
    """_causal_lm_forward showing `cls.forward`'s signature: Trainer reads it to choose the batch's columns."""
    def forward(self, *args, **kwargs):
        return _causal_lm_forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(cls.forward)
    forward.__doc__ = cls.forward.__doc__
    forward.__name__ = "forward"
    return forward


def convert_causal_lm(module: nn.Module, chunk_rows: Optional[int]) -> bool:
    if not is_causal_lm(module):
        return False
    module.__dict__["_fewbit_loss"] = dict(chunk_rows=chunk_rows)
    set_forward(module, _causal_lm_forward_for(type(module)))
    fuse_head(module.lm_head)  # a plain linear head: the fused linear cross-entropy (else checkpointed chunks)
    return True
