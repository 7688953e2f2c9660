"""Load policy of the native kernels: a prebuilt module, else a JIT build, else the pure-PyTorch reference.

Environment variable FEWBIT_NATIVE:
- unset: use the native kernels if they load (a prebuilt module whose build hash matches the package's sources,
  else a JIT build through the DeepSpeed OpBuilder, or torch.utils.cpp_extension with the same sources where
  DeepSpeed is not installed, cached under TORCH_EXTENSIONS_DIR in a folder named by its build hash: see
  ops/builder.py); if they cannot be built, warn once and use the reference. CPU tensors use the CPU kernels,
  CUDA tensors the CUDA ones (csrc/cuda, built for TORCH_CUDA_ARCH_LIST, default 8.0;9.0);
- "0": always the reference;
- "1": native or an error (a failed build raises).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import warnings

__all__ = ["native_module", "native_available", "native_state", "prebuilt_hash"]

_lock = threading.Lock()
_PREBUILT = {"cpu": "fewbit_dist._fewbit_cpu", "cuda": "fewbit_dist._fewbit_cuda"}
_FIELDS = ("tried", "module", "error", "source", "path", "build_hash", "compiled")
_states: dict = {dev: dict.fromkeys(_FIELDS) | {"tried": False} for dev in _PREBUILT}


def _mode() -> str:
    mode = os.environ.get("FEWBIT_NATIVE", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"FEWBIT_NATIVE must be unset, '0' or '1', got {mode!r}")
    return mode


def prebuilt_hash(device_type: str) -> str:
    """The build hash a module built at install time from the package's sources carries (setup.py computes the
    same with route 'setup')."""
    from . import buildinfo
    from .builder import find_csrc

    return buildinfo.build_hash(find_csrc(), device_type, "setup", buildinfo.device_flags(device_type))


def _load_prebuilt(device_type: str):
    """The module built at install time, or None where there is none or it was built from other sources or
    for another torch (then the JIT build takes over, and says why once)."""
    name = _PREBUILT[device_type]
    if name in sys.modules:  # loaded before, or None: blocked, as import_module would honour
        module = sys.modules[name]
        if module is None:
            return None
    else:
        # Only beside this package: an editable install's finder elsewhere on sys.meta_path would otherwise
        # hand an installed copy the module of the checkout it was installed from.
        package = importlib.import_module("fewbit_dist")
        spec = importlib.machinery.PathFinder.find_spec(name, package.__path__)
        if spec is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    expected, found = prebuilt_hash(device_type), getattr(module, "build_hash", "unknown")
    if found != expected:
        warnings.warn(f"fewbit_dist: the prebuilt {device_type} kernels ({module.__file__}) were built from other "
                      f"sources or for another torch (build hash {found}, expected {expected}); using a JIT "
                      f"build instead. Rebuild them with scripts/setup.sh or FEWBIT_BUILD_OPS=1 pip install.",
                      RuntimeWarning, stacklevel=4)
        return None
    return module


def native_module(device_type: str = "cpu"):
    """The loaded native module for `device_type` ("cpu" or "cuda"), or None (reference). Loads on first call."""
    if device_type not in _PREBUILT or _mode() == "0":
        return None
    state = _states[device_type]
    with _lock:
        if not state["tried"]:
            state["tried"] = True
            try:
                module = _load_prebuilt(device_type)
                if module is not None:
                    state.update(module=module, source="prebuilt", path=module.__file__,
                                 build_hash=module.build_hash, compiled=False)
                else:
                    from . import builder

                    module, info = builder.jit_load(device_type)
                    state.update(module=module, source="jit", path=str(info["library"]),
                                 build_hash=info["build_hash"], compiled=info["compiled"])
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
    """What loading did (for `python -m fewbit_dist.report`): tried, loaded, source ('prebuilt' or 'jit'), path
    of the module, its build hash, whether this process compiled it, error."""
    state = _states[device_type]
    return {k: state[k] for k in _FIELDS if k != "module"} | {"loaded": state["module"] is not None}
