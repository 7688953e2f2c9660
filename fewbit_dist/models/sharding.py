"""Recognize models that a distributed wrapper already took over, so that converting them fails loudly.

Conversion swaps modules. Done after DeepSpeed's initialize or FSDP's wrapping, the new modules would miss
the hooks those frameworks installed on the old ones (parameter gathering, resharding, gradient reduction)
and training would go wrong without a word. Convert first, then shard. Parameters partitioned by
`deepspeed.zero.Init` are fine: nothing has been hooked yet, and converted layers share those Parameters.

Everything is recognized by the frameworks' own classes and markers, looked up in `sys.modules` only: a
wrapper or a partitioned parameter cannot exist unless its framework is imported, so nothing is imported here.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["sharding_wrapper", "check_not_sharded", "zero_partitioned"]


def _wrapper_classes() -> list[tuple[str, type]]:
    """(description, class) of the wrappers whose frameworks are imported, outermost kinds first."""
    found = []
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and hasattr(deepspeed, "DeepSpeedEngine"):
        found.append(("deepspeed.initialize (DeepSpeedEngine)", deepspeed.DeepSpeedEngine))
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        found += [(label, getattr(fsdp, name)) for label, name in
                  (("FSDP (FullyShardedDataParallel)", "FullyShardedDataParallel"),
                   ("FSDP2 (fully_shard)", "FSDPModule")) if hasattr(fsdp, name)]
    parallel = sys.modules.get("torch.nn.parallel")
    if parallel is not None:
        found.append(("DistributedDataParallel", parallel.DistributedDataParallel))
    return found


def _zero3_hooked(module: nn.Module) -> bool:
    """DeepSpeed's ZeRO-3 parameter offload installed its hooks on `module` (deepspeed.initialize with stage
    3): it numbers every module it hooks (`module.ds_id`) and swaps `_parameters` for a ZeROOrderedDict."""
    if isinstance(module.__dict__.get("ds_id"), int):
        return True
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    ordered = getattr(offload, "ZeROOrderedDict", None)
    return ordered is not None and isinstance(module._parameters, ordered)


def zero_partitioned(model: nn.Module) -> bool:
    """Whether `model` holds parameters partitioned by DeepSpeed ZeRO-3 (`deepspeed.zero.Init` or an engine):
    DeepSpeed marks each with `ds_id` and `ds_status`. Such a model may still be converted as long as ZeRO-3's
    module hooks are not installed (see `sharding_wrapper`)."""
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_status") for p in model.parameters())


def sharding_wrapper(model: nn.Module) -> str | None:
    """The name of the wrapper that took `model` (or a module inside it) over, or None."""
    classes = _wrapper_classes()
    for module in model.modules():
        for label, cls in classes:
            if isinstance(module, cls):
                return label
    tensor = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None)
    if dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters()):
        return "a DTensor-sharded model (FSDP2 / tensor parallel)"
    if "deepspeed" in sys.modules and any(_zero3_hooked(m) for m in model.modules()):
        return "DeepSpeed ZeRO-3 (its module hooks are installed)"
    return None


def check_not_sharded(model: nn.Module) -> None:
    wrapper = sharding_wrapper(model)
    if wrapper is not None:
        raise ValueError(f"the model is already wrapped by {wrapper}; convert it first, then wrap or shard it "
                         "(fewbit_dist.integrations.deepspeed.initialize and fewbit_dist.integrations.fsdp.shard "
                         "do both in the right order)")
