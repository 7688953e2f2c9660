"""Native kernels: loading with a pure-PyTorch fallback, and the torch.library ops that dispatch to them.

Policy (environment variable FEWBIT_NATIVE):
- unset: use the native kernels if they load (a prebuilt module, else a JIT build through the DeepSpeed
  OpBuilder, cached by torch under TORCH_EXTENSIONS_DIR); if they cannot be built, warn once and use the
  reference. CPU tensors use the CPU kernels, CUDA tensors the CUDA ones (csrc/cuda, built for
  TORCH_CUDA_ARCH_LIST, default 8.0;9.0);
- "0": always the reference;
- "1": native or an error (a failed build raises).

Ops (schemas in the `fewbit` namespace, with fake kernels so torch.compile and meta tensors work):
- fewbit::encode_pack(Tensor x, Tensor borders, int bits) -> Tensor: the codes of x against the sorted
  borders (in the compute dtype: fp64 for fp64 x, else fp32), packed at `bits` per element;
- fewbit::unpack_scale(Tensor packed, Tensor levels, Tensor grad, int bits) -> Tensor: levels[code] * grad,
  computed in the levels' dtype and returned in grad's.
- fewbit::quantize_pack(Tensor x, Tensor lo, Tensor scale, Tensor? noise, int bits, int group_size) -> Tensor:
  LowBitLinear's group-affine codes of a [rows, cols] input, clamp(floor((x - lo) / scale + u), 0, 2**bits - 1)
  with u = noise (stochastic rounding) or 0.5 (nearest), lo/scale float32 [rows, ceil(cols / group_size)],
  packed at `bits` per element;
- fewbit::unpack_dequantize(Tensor packed, Tensor lo, Tensor scale, int bits, int cols, int group_size,
  ScalarType dtype) -> Tensor: lo + code * scale (float32, no fused multiply-add) as [rows, cols] of dtype.
All are bit-identical to the reference (tests/test_native.py).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Optional

import torch

from ..quant.packing import CHUNK, check_bits, pack_codes, packed_nbytes, unpack_codes

__all__ = ["native_available", "native_module", "encode_pack", "unpack_scale", "encode_with_borders",
           "encode_pack_chunked", "reference_encode_pack", "reference_unpack_scale", "native_state",
           "quantize_pack", "unpack_dequantize", "reference_quantize_pack", "reference_unpack_dequantize",
           "row_chunk"]

_lock = threading.Lock()
_LOADERS = {"cpu": ("fewbit_dist._fewbit_cpu", "jit_load_cpu"), "cuda": ("fewbit_dist._fewbit_cuda", "jit_load_cuda")}
_states: dict = {dev: {"tried": False, "module": None, "error": None, "source": None} for dev in _LOADERS}


def _mode() -> str:
    mode = os.environ.get("FEWBIT_NATIVE", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"FEWBIT_NATIVE must be unset, '0' or '1', got {mode!r}")
    return mode


def native_module(device_type: str = "cpu"):
    """The loaded native module for `device_type` ("cpu" or "cuda"), or None (reference). Loads on first call."""
    if device_type not in _LOADERS or _mode() == "0":
        return None
    state = _states[device_type]
    with _lock:
        if not state["tried"]:
            state["tried"] = True
            prebuilt, jit = _LOADERS[device_type]
            try:
                try:
                    state["module"] = importlib.import_module(prebuilt)
                    state["source"] = "prebuilt"
                except ImportError:
                    from . import builder

                    state["module"] = getattr(builder, jit)()
                    state["source"] = "jit"
            except Exception as exc:  # a compiler or header problem: fall back, say so once
                state["error"] = f"{type(exc).__name__}: {exc}"
                if _mode() == "1":
                    raise RuntimeError(f"FEWBIT_NATIVE=1 but the native {device_type} kernels failed to build: "
                                       f"{exc}") from exc
                warnings.warn(f"fewbit_dist: native {device_type} kernels unavailable, using the pure-PyTorch "
                              f"reference ({state['error'].splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)
        elif state["module"] is None and _mode() == "1":
            raise RuntimeError(f"FEWBIT_NATIVE=1 but the native {device_type} kernels failed to build: "
                               f"{state['error']}")
        return state["module"]


def native_available(device_type: str = "cpu") -> bool:
    return native_module(device_type) is not None


def native_state(device_type: str = "cpu") -> dict:
    """What loading did: tried, source ('prebuilt' or 'jit'), error (for `python -m fewbit_dist.report`)."""
    state = _states[device_type]
    return {k: state[k] for k in ("tried", "source", "error")} | {"loaded": state["module"] is not None}


# -------------------------------------------------------------------------------------- reference

def encode_with_borders(x: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """The number of `borders` <= x, compared in borders' dtype; NaN gets code 0."""
    xs = x.to(borders.dtype)
    if borders.numel() <= 15:  # up to 4 bits: a few comparisons beat a binary search
        codes = (xs >= borders[0]).to(torch.uint8)
        for i in range(1, borders.numel()):
            codes += xs >= borders[i]
        return codes
    codes = torch.bucketize(xs.contiguous(), borders, right=True, out_int32=True)
    return codes.masked_fill_(xs.isnan(), 0)


def encode_pack_chunked(x: torch.Tensor, encode, bits: int) -> torch.Tensor:
    """pack_codes(encode(x), bits), a chunk at a time so that the codes never exist for all of x at once."""
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=x.device)
    for s in range(0, n, CHUNK):  # CHUNK is a multiple of 8: each chunk starts on a byte boundary
        e = min(n, s + CHUNK)
        pack_codes(encode(flat[s:e]), bits, out=packed[s * bits // 8: packed_nbytes(e, bits)])
    return packed


def reference_encode_pack(x: torch.Tensor, borders: torch.Tensor, bits: int) -> torch.Tensor:
    return encode_pack_chunked(x, lambda chunk: encode_with_borders(chunk, borders), bits)


def reference_unpack_scale(packed: torch.Tensor, levels: torch.Tensor, grad: torch.Tensor, bits: int) -> torch.Tensor:
    g = grad.reshape(-1)
    n = g.numel()
    out = torch.empty(n, dtype=grad.dtype, device=grad.device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        codes = unpack_codes(packed[s * bits // 8: packed_nbytes(e, bits)], bits, e - s, dtype=torch.int32)
        out[s:e] = levels.index_select(0, codes) * g[s:e].to(levels.dtype)
    return out.view(grad.shape)


def row_chunk(cols: int) -> int:
    """Rows per step of the row-chunked loops: about CHUNK elements, a multiple of 8 rows so that every
    step starts on a byte boundary of the packed stream."""
    return max(8, (CHUNK // max(cols, 1)) // 8 * 8)


def _per_element(table: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """[rows, groups] -> [rows, cols]: each group's value repeated over its columns."""
    return table.repeat_interleave(group_size, dim=1)[:, :cols]


def reference_quantize_pack(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, noise, bits: int,
                            group_size: int) -> torch.Tensor:
    rows, cols = x.shape
    qmax = (1 << bits) - 1
    packed = torch.empty(packed_nbytes(rows * cols, bits), dtype=torch.uint8, device=x.device)
    step = row_chunk(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        u = noise[r0:r1] if noise is not None else 0.5
        # three separately rounded float32 operations, as in fewbit::quantize_affine
        t = (x[r0:r1].float() - _per_element(lo[r0:r1], cols, group_size)) / _per_element(scale[r0:r1], cols,
                                                                                           group_size) + u
        codes = t.floor_().clamp_(0, qmax).nan_to_num_(0.0).to(torch.uint8)
        pack_codes(codes, bits, out=packed[r0 * cols * bits // 8: packed_nbytes(r1 * cols, bits)])
    return packed


def reference_unpack_dequantize(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, cols: int,
                                group_size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = lo.shape[0]
    out = torch.empty(rows, cols, dtype=dtype, device=lo.device)
    step = row_chunk(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = unpack_codes(packed[r0 * cols * bits // 8: packed_nbytes(r1 * cols, bits)], bits, (r1 - r0) * cols,
                             dtype=torch.int32).view(r1 - r0, cols)
        # a product and a sum, each rounded to float32, as in fewbit::dequantize_affine
        out[r0:r1] = codes.float() * _per_element(scale[r0:r1], cols, group_size) + _per_element(lo[r0:r1], cols,
                                                                                              group_size)
    return out


# ------------------------------------------------------------------------------------ torch.library

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
