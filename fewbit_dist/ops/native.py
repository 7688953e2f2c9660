"""The torch.library ops of fewbit_dist: each dispatches to the native kernel of its device (see loader.py for
the FEWBIT_NATIVE policy) or to its pure-PyTorch reference (reference.py). This module also re-exports the
loader's and the reference's names, so `from fewbit_dist.ops.native import ...` keeps working.

Ops (schemas in the `fewbit` namespace, with fake kernels so torch.compile and meta tensors work):
- fewbit::encode_pack(Tensor x, Tensor borders, int bits) -> Tensor: the codes of x against the sorted
  borders (in the compute dtype: fp64 for fp64 x, else fp32), packed at `bits` per element;
- fewbit::unpack_scale(Tensor packed, Tensor levels, Tensor grad, int bits) -> Tensor: levels[code] * grad,
  computed in the levels' dtype and returned in grad's.
- fewbit::quantize_pack(Tensor x, Tensor lo, Tensor scale, Tensor? noise, int bits, int group_size) -> Tensor:
  LowBitLinear's group-affine codes of a [rows, cols] input, clamp(floor((x - lo) / scale + u), 0, 2**bits - 1)
  with u = noise (stochastic rounding) or 0.5 (nearest), lo/scale float32 [rows, ceil(cols / group_size)],
  packed at `bits` per element;
- fewbit::quantize_groups(Tensor x, int bits, int group_size, Tensor? seed) -> (Tensor, Tensor, Tensor): the
  fused form of LowBitLinear's quantization (ranges, uniforms, codes, packing in one pass, no noise tensor);
  see `quantize_groups` below;
- fewbit::unpack_dequantize(Tensor packed, Tensor lo, Tensor scale, int bits, int cols, int group_size,
  ScalarType dtype) -> Tensor: lo + code * scale (float32, no fused multiply-add) as [rows, cols] of dtype.
All are bit-identical to the reference (tests/test_native.py, tests/test_quantize_kernel.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import validation
from ..quant.packing import check_bits, packed_nbytes
from .loader import _states, native_available, native_module, native_state  # noqa: F401
from .reference import (  # noqa: F401
    counter_uniforms, encode_pack_chunked, encode_with_borders, mix32, reference_encode_pack,
    reference_group_ranges, reference_quantize_groups, reference_quantize_pack, reference_unpack_dequantize,
    reference_unpack_scale, row_chunk, uniform_key,
)

__all__ = ["native_available", "native_module", "encode_pack", "unpack_scale", "encode_with_borders",
           "encode_pack_chunked", "reference_encode_pack", "reference_unpack_scale", "native_state",
           "quantize_pack", "unpack_dequantize", "reference_quantize_pack", "reference_unpack_dequantize",
           "row_chunk", "quantize_groups", "reference_quantize_groups", "reference_group_ranges"]


@torch.library.custom_op("fewbit::encode_pack", mutates_args=())
def encode_pack(x: torch.Tensor, borders: torch.Tensor, bits: int) -> torch.Tensor:
    check_bits(bits)
    mod = native_module(x.device.type)
    if mod is not None:
        return mod.encode_pack(x, borders, bits)
    return reference_encode_pack(x, borders, bits)


@encode_pack.register_fake
def _(x, borders, bits):
    return x.new_empty(packed_nbytes(x.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op("fewbit::unpack_scale", mutates_args=())
def unpack_scale(packed: torch.Tensor, levels: torch.Tensor, grad: torch.Tensor, bits: int) -> torch.Tensor:
    check_bits(bits)
    mod = native_module(grad.device.type)
    if mod is not None:
        return mod.unpack_scale(packed, levels, grad, bits).view(grad.shape)
    return reference_unpack_scale(packed, levels, grad, bits)


@unpack_scale.register_fake
def _(packed, levels, grad, bits):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.custom_op("fewbit::quantize_pack", mutates_args=())
def quantize_pack(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, noise: Optional[torch.Tensor], bits: int,
                  group_size: int) -> torch.Tensor:
    check_bits(bits)
    mod = native_module(x.device.type)
    if mod is not None:
        return mod.quantize_pack(x, lo, scale, noise, bits, group_size)
    return reference_quantize_pack(x, lo, scale, noise, bits, group_size)


@quantize_pack.register_fake
def _(x, lo, scale, noise, bits, group_size):
    return x.new_empty(packed_nbytes(x.numel(), bits), dtype=torch.uint8)


@torch.library.custom_op("fewbit::unpack_dequantize", mutates_args=())
def unpack_dequantize(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, cols: int,
                      group_size: int, dtype: torch.dtype) -> torch.Tensor:
    check_bits(bits)
    mod = native_module(packed.device.type)
    if mod is not None:
        return mod.unpack_dequantize(packed, lo, scale, bits, cols, group_size, dtype)
    return reference_unpack_dequantize(packed, lo, scale, bits, cols, group_size, dtype)


@unpack_dequantize.register_fake
def _(packed, lo, scale, bits, cols, group_size, dtype):
    return lo.new_empty(lo.shape[0], cols, dtype=dtype)


@torch.library.custom_op("fewbit::quantize_groups", mutates_args=())
def _quantize_groups(x: torch.Tensor, bits: int, group_size: int,
                     seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mod = native_module(x.device.type)
    if mod is not None:
        return mod.quantize_groups(x, bits, group_size, seed)
    return reference_quantize_groups(x, bits, group_size, seed)


@_quantize_groups.register_fake
def _(x, bits, group_size, seed):
    rows, cols = x.shape
    groups = (cols + group_size - 1) // group_size
    packed = x.new_empty((rows * cols * bits + 7) // 8, dtype=torch.uint8)
    return packed, x.new_empty(rows, groups, dtype=torch.float32), x.new_empty(rows, groups, dtype=torch.float32)


def quantize_groups(x2: torch.Tensor, bits: int, group_size: int, seed: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LowBitLinear's input quantization in one pass: `(packed, lo, scale)` of a 2-D [rows, cols] input.

    x2: any float dtype (fp32, fp16, bf16, fp64), any strides (read in place, never copied). Each row is cut
    into groups of `group_size` columns (the last may be shorter). Group g of row r gets lo = min and
    scale = (max - min) / (2**bits - 1) rounded up by one ulp (1 for a constant group), float32
    [rows, ceil(cols / group_size)]: exactly fewbit_dist.functional.lowbit.group_ranges on the CPU. Element
    (r, c) gets code = clamp(floor((x - lo) / scale + u), 0, 2**bits - 1) in float32, NaN -> 0, packed at
    `bits` per element in row-major order: `packed` is what `unpack_dequantize(packed, lo, scale, bits, cols,
    group_size, dtype)` reads.

    seed: None rounds to nearest (u = 0.5); a one-element int64 tensor (on the CPU or x2's device) rounds
    stochastically, with u the 24-bit uniform of a counter-based hash of (seed, r * cols + c): unbiased,
    E[lo + code * scale] = x, the same for the same seed on every device and kernel, and no noise tensor.
    The seed is never read on the host by the caller, so this does not synchronize and traces under
    torch.compile(fullgraph=True).
    """
    if not isinstance(x2, torch.Tensor) or x2.dim() != 2 or not x2.dtype.is_floating_point:
        got = f"{x2.dtype} of shape {tuple(x2.shape)}" if isinstance(x2, torch.Tensor) else type(x2).__name__
        raise TypeError(f"x2 must be a 2-D floating-point tensor [rows, cols], got {got}")
    validation.check_bits(bits, "bits", 2, 8)
    validation.check_int(group_size, "group_size", lo=1)  # columns per group
    if seed is not None:
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be None (round to nearest) or a one-element int64 tensor, got "
                            f"{seed.dtype if isinstance(seed, torch.Tensor) else type(seed).__name__}")
        if seed.device.type != "cpu" and seed.device != x2.device:
            raise ValueError(f"seed must be on the CPU or on x2's device ({x2.device}), got {seed.device}")
    return torch.ops.fewbit.quantize_groups(x2, bits, group_size, seed)
