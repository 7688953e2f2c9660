"""Load policy of the native kernels: a prebuilt module, else a JIT build, else the pure-PyTorch reference.

Environment variable FEWBIT_NATIVE:
- unset: use the native kernels if they load (a prebuilt module, else a JIT build through the DeepSpeed
  OpBuilder, or torch.utils.cpp_extension with the same sources where DeepSpeed is not installed, cached by
  torch under TORCH_EXTENSIONS_DIR); if they cannot be built, warn once and use the
  reference. CPU tensors use the CPU kernels, CUDA tensors the CUDA ones (csrc/cuda, built for
  TORCH_CUDA_ARCH_LIST, default 8.0;9.0);
- "0": always the reference;
- "1": native or an error (a failed build raises).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings

__all__ = ["native_module", "native_available", "native_state"]

_lock = threading.Lock()
_LOADERS = {"cpu": ("fewbit_dist._fewbit_cpu", "jit_load_cpu"), "cuda": ("fewbit_dist._fewbit_cuda", "jit_load_cuda")}
_states: dict = {dev: {"tried": False, "module": None, "error": None, "source": None} for dev in _LOADERS}


def _mode() -> str:
    mode = os.environ.get("FEWBIT_NATIVE", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"FEWBIT_NATIVE must be unset, '0' or '1', got {mode!r}")
    return mode


def _jit_load(jit: str):
    """(module, source) from the builder's `jit` function; without DeepSpeed, the CUDA kernels are built by
    torch.utils.cpp_extension from the same sources (builder.jit_load_cpu already does so for the CPU)."""
    from . import builder

    try:
        return getattr(builder, jit)(), "jit"
    except ImportError as exc:
        if jit != "jit_load_cuda" or "deepspeed" not in str(exc):
            raise
    from torch.utils.cpp_extension import load

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", builder.DEFAULT_CUDA_ARCHS)
    builder.clear_stale_lock(builder.CUDA_NAME)
    module = load(name=builder.CUDA_NAME, sources=builder.cuda_sources(), extra_include_paths=builder.include_paths(),
                  extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=["-O3", "-lineinfo"])
    return module, "jit (cpp_extension)"


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
                    state["module"], state["source"] = _jit_load(jit)
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
