"""Activation checkpointing that composes with few-bit and randomized layers.

Why it composes: a checkpointed block keeps only its inputs; in backward it reruns its forward, and the
layers inside save their compressed state then (packed codes, sketches), which is consumed at once. The
recompute must save the same things as the first run: few-bit codes are a function of the input, and a
sketch's seed is drawn from the CPU RNG, which every checkpoint implementation here restores before it
recomputes (torch.utils.checkpoint reentrant and non-reentrant, Hugging Face, DeepSpeed's). Non-reentrant
checkpointing checks the shapes and dtypes of what the recompute saves; they match.

`enable(model, method)` switches it on for a Hugging Face model:
- "non_reentrant" (default): torch.utils.checkpoint, use_reentrant=False (FSDP2 and ZeRO friendly);
- "reentrant": torch.utils.checkpoint, use_reentrant=True;
- "deepspeed": deepspeed.checkpointing.checkpoint (reentrant, with DeepSpeed's RNG tracker).
"""

from __future__ import annotations

from torch import nn

__all__ = ["enable", "METHODS"]

METHODS = ("non_reentrant", "reentrant", "deepspeed")


def enable(model: nn.Module, method: str = "non_reentrant") -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with activation checkpointing; "
                         "wrap its blocks with torch.utils.checkpoint yourself")
    if method == "deepspeed":
        import deepspeed

        if not hasattr(model, "_set_gradient_checkpointing"):
            raise ValueError("this transformers version has no hook for a custom checkpoint function")
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
        return model
    kwargs = {"use_reentrant": method == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
