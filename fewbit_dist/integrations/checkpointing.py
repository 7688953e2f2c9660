"""Activation checkpointing that composes with few-bit and randomized layers, and can compress its boundaries.

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

Compressed boundaries. With checkpointing on, what stays alive between forward and backward is each
block's input (the hidden states: rows x hidden floats per block). `enable(model, method,
boundary_bits=8)` stores those inputs quantized instead: `checkpoint` (or `CompressedCheckpoint(bits,
rounding, group_size)` for other settings) has the calling convention of torch.utils.checkpoint.checkpoint,
`(function, *args, use_reentrant=None, preserve_rng_state=True, **kwargs)`, and

- runs the block once under no_grad: its outputs are exactly those of the unchecked block, bit for bit;
- keeps every floating-point tensor input that requires grad (parameters excepted) as LowBitLinear keeps its input
  (fewbit_dist.functional.lowbit.quantize_input: `bits` per element, a float32 min and step per group of
  `group_size` consecutive elements of the last dimension); any other argument (masks, position ids,
  rotary cos/sin, non-tensors) is kept as it is;
- in backward dequantizes, reruns the block with grad enabled under the forward's RNG state (CPU, and the
  devices of its tensor inputs, as torch's reentrant checkpoint does: dropout masks, sketch seeds and
  low-bit rounding seeds replay the same) and autocast state, and backpropagates through it.

Saved bytes per compressed input of shape [..., cols] with rows = numel / cols:
`boundary_nbytes(shape, bits, group_size)` = ceil(rows * cols * bits / 8) + 8 * rows * ceil(cols / group_size),
against rows * cols * element_size uncompressed (fp32 hidden 576, 8 bits, groups of 128: 27% of it).

The backward is reentrant (a nested backward through the recomputed block, as torch's use_reentrant=True
and DeepSpeed's checkpoint do), so `use_reentrant` is accepted and ignored, and torch.autograd.grad or
`backward(inputs=...)` through it is refused. Unlike torch's reentrant checkpoint, the parameters inside
get their gradients even when no input requires grad. Keyword arguments reach the function; tensor keyword
arguments are treated like positional ones. Tensors the function reads from elsewhere (a closure, a
functools.partial) must not require grad: their gradient would not flow (torch's reentrant checkpoint
shares this rule). Outputs: a tensor or a tuple (torch's reentrant rule), not a dict.

Rounding. 'nearest' (the default) has half the mean squared error of 'stochastic'; unbiasedness does not
carry through a recomputed non-linear block, and nearest gives the higher gradient cosine (see
tests/test_checkpoint_boundaries.py and launch/bench_peak.py). Stochastic rounding draws its noise from a
private stream (torch.initial_seed(), a call counter and the rank), never from torch's RNG, so the RNG
stream, and with it every dropout mask, is the same as without compression.

Where it plugs in:
- Hugging Face: `enable(model, "non_reentrant", boundary_bits=8)` (GradientCheckpointingLayer calls the
  function with the layer's bound forward and the hidden states positionally).
- FSDP2: `apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper_fn(bits=8),
  check_fn=lambda m: isinstance(m, Block))` (torch.distributed.algorithms._checkpoint.checkpoint_wrapper),
  then `fully_shard` each CheckpointWrapper (so FSDP's hooks stay outside the checkpoint) and the root. Call
  the model with use_cache=False: a KV cache passed to the blocks would be filled again by the recompute
  (Hugging Face's own checkpointing turns it off for you). (The composable
  `torch.distributed._composable.checkpoint` takes no checkpoint function: it cannot compress.)
- DeepSpeed ZeRO (any stage): use it in place of deepspeed.checkpointing.checkpoint, which has the same
  calling convention (`checkpoint(function, *args)`): `enable(model, "non_reentrant", boundary_bits=8)` for
  a Hugging Face model, or call `checkpointing.checkpoint(block, hidden_states, ...)` in your own blocks.
  ZeRO-3 gathers the parameters of the submodules the recompute calls through its module hooks, as it
  does for DeepSpeed's checkpoint. DeepSpeed's own options (partition_activations across model-parallel
  ranks, cpu_checkpointing, the model-parallel RNG tracker) do not apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import nn

from ..functional.lowbit import DEFAULT_GROUP_SIZE, check_lowbit_args, dequantize_input, quantize_input
from ..validation import check_callable, check_choice

__all__ = ["enable", "METHODS", "CompressedCheckpoint", "checkpoint", "wrapper_fn", "boundary_nbytes",
           "DEFAULT_BOUNDARY_ROUNDING"]

METHODS = ("non_reentrant", "reentrant", "deepspeed")
DEFAULT_BOUNDARY_ROUNDING = "nearest"
_NAMES = ("boundary_bits", "group_size", "boundary_rounding")


def boundary_nbytes(shape, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes a compressed boundary of `shape` keeps (codes packed at `bits`, float32 min and step per group)."""
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape) // cols if cols else 0
    return math.ceil(rows * cols * bits / 8) + 8 * rows * math.ceil(cols / group_size)


# Seeds for stochastic rounding: a private stream, so torch's RNG (dropout) runs as without compression.
_seed_stream = {"initial": None, "count": 0}


def _boundary_seed() -> int:
    initial = torch.initial_seed()
    if _seed_stream["initial"] != initial:  # torch.manual_seed restarts the stream: runs are reproducible
        _seed_stream.update(initial=initial, count=0)
    _seed_stream["count"] += 1
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0
    return hash((initial, _seed_stream["count"], rank)) & ((1 << 62) - 1)


def _device_type(tensors) -> str:
    types = [t.device.type for t in tensors if t.device.type not in ("cpu", "meta")]
    return "cuda" if "cuda" in types else (types[0] if types else "cpu")


def _autocast_state(device_type: str) -> Optional[dict]:
    if not torch.amp.is_autocast_available(device_type):
        return None
    return {"enabled": torch.is_autocast_enabled(device_type), "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled()}


class _CompressedCheckpointFn(torch.autograd.Function):
    """inputs: (run, spec, preserve_rng_state, anchor, *flat); `anchor` is an empty leaf that requires grad, so
    the output joins the graph (and the parameters inside get gradients) whatever the inputs."""

    @staticmethod
    def forward(ctx, run, spec, preserve_rng_state, anchor, *flat):
        bits, group_size, rounding = spec
        tensors = [x for x in flat if torch.is_tensor(x)]
        ctx.run, ctx.preserve = run, preserve_rng_state
        ctx.device_type = _device_type(tensors)
        ctx.cpu_autocast, ctx.device_autocast = _autocast_state("cpu"), _autocast_state(ctx.device_type)
        ctx.devices, ctx.device_states = [], []
        if preserve_rng_state:
            ctx.cpu_state = torch.get_rng_state()
            if ctx.device_type != "cpu":  # the devices of the tensor inputs, as torch's reentrant checkpoint
                module = getattr(torch, ctx.device_type)
                if getattr(module, "_initialized", True):
                    ctx.devices = sorted({t.get_device() for t in tensors if t.device.type == ctx.device_type})
                    for d in ctx.devices:
                        with module.device(d):
                            ctx.device_states.append(module.get_rng_state())
        # Without autocast's weight-cast cache: under no_grad the converted layers fall back to the plain ops,
        # whose casts of the block's weights autocast caches until its outermost region exits, so every block's
        # low-precision weights stayed through the whole forward (Llama-3-8B: 7 GiB per rank under FSDP2, per
        # the planner). Nothing here is saved for backward, which recomputes the block anyway.
        cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            with torch.no_grad():
                outputs = run(*flat)
        finally:
            torch.set_autocast_cache_enabled(cache)
        slots, saved = [], []
        for x, needs_grad in zip(flat, ctx.needs_input_grad[4:]):
            if not torch.is_tensor(x):
                slots.append(("value", x))
            elif needs_grad and x.is_floating_point() and x.numel() > 0 and not isinstance(x, nn.Parameter):
                cols = x.shape[-1] if x.dim() else 1
                seed = _boundary_seed() if rounding == "stochastic" else None
                q = quantize_input(x.detach().reshape(-1, cols), bits, group_size, rounding, seed)
                saved += [q.packed, q.lo, q.scale]
                slots.append(("quantized", dataclasses.replace(q, packed=None, lo=None, scale=None), x.shape, x.dtype))
            else:
                saved.append(x)
                slots.append(("tensor", needs_grad))
        ctx.slots = slots
        ctx.save_for_backward(*saved)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not getattr(torch.autograd, "_is_checkpoint_valid", lambda: True)():
            raise RuntimeError("compressed checkpointing backpropagates reentrantly: it works with .backward(), not "
                               "with torch.autograd.grad or backward(inputs=...)")
        saved = iter(ctx.saved_tensors)
        inputs = []
        for slot in ctx.slots:
            if slot[0] == "value":
                inputs.append(slot[1])
            elif slot[0] == "quantized":
                _, template, shape, dtype = slot
                q = dataclasses.replace(template, packed=next(saved), lo=next(saved), scale=next(saved))
                inputs.append(dequantize_input(q, dtype).view(shape).requires_grad_(True))
            else:
                t = next(saved)
                inputs.append(t.detach().requires_grad_(slot[1]))
        devices = ctx.devices if ctx.preserve else []
        fork = torch.random.fork_rng(devices=devices, enabled=ctx.preserve, device_type=ctx.device_type)
        device_autocast = (torch.autocast(ctx.device_type, **ctx.device_autocast)
                           if ctx.device_type != "cpu" and ctx.device_autocast is not None else contextlib.nullcontext())
        with fork:
            if ctx.preserve:
                torch.set_rng_state(ctx.cpu_state)
                module = getattr(torch, ctx.device_type, None)
                for d, state in zip(ctx.devices, ctx.device_states):
                    with module.device(d):
                        module.set_rng_state(state)
            with torch.enable_grad(), device_autocast, torch.autocast("cpu", **ctx.cpu_autocast):
                outputs = ctx.run(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads = tuple(x.grad if torch.is_tensor(x) and x.requires_grad else None for x in inputs)
        return (None, None, None, None) + grads


class CompressedCheckpoint:
    """A checkpoint function (torch.utils.checkpoint.checkpoint's calling convention) that keeps the block's
    floating-point inputs that require grad at `bits` (2..8) per element; see the module docstring.

    `rounding`: 'nearest' (default) or 'stochastic'. `group_size`: elements of the last dimension per float32
    (min, step) pair.
    """

    def __init__(self, bits: int = 8, rounding: str = DEFAULT_BOUNDARY_ROUNDING,
                 group_size: int = DEFAULT_GROUP_SIZE):
        check_lowbit_args(bits, group_size, rounding, names=_NAMES)
        self.bits, self.rounding, self.group_size = bits, rounding, group_size

    def __repr__(self) -> str:
        return f"CompressedCheckpoint(bits={self.bits}, rounding={self.rounding!r}, group_size={self.group_size})"

    def __call__(self, function, *args, use_reentrant: Optional[bool] = None, preserve_rng_state: bool = True,
                 **kwargs):
        check_callable(function, "function")
        if not torch.is_grad_enabled():  # nothing to backpropagate: run it as it is
            return function(*args, **kwargs)
        n, keys = len(args), tuple(kwargs)

        def run(*flat):
            return function(*flat[:n], **dict(zip(keys, flat[n:])))

        anchor = torch.empty(0, requires_grad=True)
        return _CompressedCheckpointFn.apply(run, (self.bits, self.group_size, self.rounding), preserve_rng_state,
                                             anchor, *args, *kwargs.values())


checkpoint = CompressedCheckpoint()
checkpoint.__doc__ = "8-bit compressed checkpoint with nearest rounding: `checkpoint(function, *args, **kwargs)`."


def wrapper_fn(bits: int = 8, rounding: str = DEFAULT_BOUNDARY_ROUNDING, group_size: int = DEFAULT_GROUP_SIZE):
    """A `checkpoint_wrapper_fn` for torch's apply_activation_checkpointing (FSDP2 recipes): each wrapped block
    checkpoints through CompressedCheckpoint(bits, rounding, group_size)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return functools.partial(checkpoint_wrapper, checkpoint_fn=CompressedCheckpoint(bits, rounding, group_size))


def enable(model: nn.Module, method: str = "non_reentrant", boundary_bits: Optional[int] = None,
           boundary_rounding: str = DEFAULT_BOUNDARY_ROUNDING) -> nn.Module:
    """Switch on activation checkpointing for a Hugging Face model (see the module docstring), in place.

    `boundary_bits` (2..8): keep each checkpointed block's inputs at that many bits per element
    (CompressedCheckpoint, rounding `boundary_rounding`); None keeps them as they are. With compressed
    boundaries `method` must be "non_reentrant" or "reentrant" (both name the same compressed function,
    whose backward is reentrant); DeepSpeed's checkpoint cannot compress, use ours under ZeRO instead.
    """
    check_choice(method, "method", METHODS)
    if boundary_bits is not None:
        check_lowbit_args(boundary_bits, DEFAULT_GROUP_SIZE, boundary_rounding, names=_NAMES)
        if method == "deepspeed":
            raise ValueError("boundary_bits needs method 'non_reentrant' or 'reentrant' (our compressed checkpoint, "
                             "which works under DeepSpeed ZeRO too); deepspeed.checkpointing cannot compress")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face model with activation checkpointing; "
                         "wrap its blocks with torch.utils.checkpoint (or this module's checkpoint) yourself")
    if method == "deepspeed" or boundary_bits is not None:
        if not hasattr(model, "_set_gradient_checkpointing"):
            raise ValueError("this transformers version has no hook for a custom checkpoint function")
    kwargs = {"use_reentrant": method == "reentrant"}
    if method != "deepspeed":
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if method == "deepspeed":
        import deepspeed

        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=deepspeed.checkpointing.checkpoint)
    elif boundary_bits is not None:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=CompressedCheckpoint(
            boundary_bits, boundary_rounding))
    return model
