"""FSDP: convert, then shard block by block (FSDP2 `fully_shard`; FSDP1 for CUDA users), with optional
non-reentrant activation checkpointing per block.

    model = fewbit_dist.integrations.fsdp.shard(model, fewbit_config="configs/roberta.json",
                                                checkpointing=True, param_dtype=torch.bfloat16)

Blocks are found from the model: the classes Hugging Face lists in `_no_split_modules` (RobertaLayer,
LlamaDecoderLayer, ...), or the classes you pass. Each block is checkpointed (if asked) and then sharded, and
finally the root, the order FSDP2 expects. Under non-reentrant checkpointing the recompute draws the same
seeds (the RNG state is restored) and saves the same compressed tensors, which the determinism check
verifies.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..config import ConfigLike
from ..convert import convert

__all__ = ["block_classes", "shard", "shard_fsdp1"]


def block_classes(model: nn.Module, names: Optional[Iterable[Union[str, type]]] = None) -> tuple[type, ...]:
    """The transformer-block classes of `model`: `names` (classes or class names) or its `_no_split_modules`."""
    if names is not None:
        wanted = list(names)
    else:  # transformers keeps a set here: sort it, so every rank wraps in the same order
        wanted = sorted(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        raise ValueError("cannot tell the transformer blocks of this model: it has no _no_split_modules; "
                         "pass block classes (or class names) explicitly")
    present = {type(m).__name__: type(m) for m in model.modules()}
    out = []
    for w in wanted:
        if isinstance(w, type):
            out.append(w)
        elif w in present:
            out.append(present[w])
    if not out:
        raise ValueError(f"none of the block classes {wanted} occurs in the model")
    return tuple(dict.fromkeys(out))


def _blocks(model, classes):
    return [m for m in model.modules() if isinstance(m, classes) and m is not model]


def _checkpoint_blocks(model: nn.Module, classes: tuple[type, ...]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
    import functools

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, classes))


def shard(model: nn.Module, fewbit_config: ConfigLike = None, *, blocks: Optional[Sequence] = None,
          checkpointing: bool = False, param_dtype: Optional[torch.dtype] = None,
          reduce_dtype: Optional[torch.dtype] = None, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Convert `model` (fewbit_config; None: defaults), then FSDP2-shard each block and the root, in place.

    `checkpointing`: non-reentrant activation checkpointing of every block. `param_dtype`/`reduce_dtype`:
    the MixedPrecisionPolicy (None: keep the parameters' dtype). `mesh`: a DeviceMesh (default: all ranks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = block_classes(model, blocks)
    model = convert(model, fewbit_config)
    if checkpointing:
        _checkpoint_blocks(model, classes)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in _blocks(model, classes):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_fsdp1(model: nn.Module, fewbit_config: ConfigLike = None, *, blocks: Optional[Sequence] = None,
                checkpointing: bool = False, param_dtype: Optional[torch.dtype] = None,
                device_id: Optional[int] = None) -> nn.Module:
    """The FSDP1 path (FullyShardedDataParallel with transformer_auto_wrap_policy), for CUDA users.

    FSDP1 refuses to run without an accelerator, so this path is not exercised on CPU-only machines.
    """
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    classes = block_classes(model, blocks)
    model = convert(model, fewbit_config)
    mixed = MixedPrecision(param_dtype=param_dtype, reduce_dtype=param_dtype) if param_dtype else None
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=set(classes)),
        mixed_precision=mixed, device_id=device_id, use_orig_params=True)
    if checkpointing:
        _checkpoint_blocks(wrapped, classes)
    return wrapped
