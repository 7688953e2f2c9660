"""Recognize models that a distributed wrapper already took over, so that converting them fails loudly.

Conversion swaps modules. Done after DeepSpeed's initialize or FSDP's wrapping, the new modules would miss
the hooks those frameworks installed on the old ones (parameter gathering, resharding, gradient reduction)
and training would go wrong without a word. Convert first, then shard. Parameters partitioned by
`deepspeed.zero.Init` are fine: nothing has been hooked yet, and converted layers share those Parameters.
"""

from __future__ import annotations

from torch import nn

__all__ = ["sharding_wrapper", "check_not_sharded"]


def sharding_wrapper(model: nn.Module) -> str | None:
    """The name of the wrapper that took `model` over, or None."""
    for module in model.modules():
        cls = type(module)
        names = {c.__name__ for c in cls.__mro__}
        if "DeepSpeedEngine" in names:
            return "deepspeed.initialize (DeepSpeedEngine)"
        if "FullyShardedDataParallel" in names:
            return "FSDP (FullyShardedDataParallel)"
        if "FSDPModule" in names:
            return "FSDP2 (fully_shard)"
        if "DistributedDataParallel" in names:
            return "DistributedDataParallel"
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return "a DTensor-sharded model (FSDP2 / tensor parallel)"
    for m in model.modules():  # ZeRO-3 hooks every module (parameter_offload.py), even a bare model
        if any(getattr(h, "__name__", "") == "_pre_forward_module_hook" for h in m._forward_pre_hooks.values()):
            return "DeepSpeed ZeRO-3 (its module hooks are installed)"
    return None


def check_not_sharded(model: nn.Module) -> None:
    wrapper = sharding_wrapper(model)
    if wrapper is not None:
        raise ValueError(f"the model is already wrapped by {wrapper}; convert it first, then wrap or shard it "
                         "(fewbit_dist.integrations.deepspeed.initialize and fewbit_dist.integrations.fsdp.shard "
                         "do both in the right order)")
