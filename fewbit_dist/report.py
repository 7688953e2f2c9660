"""`python -m fewbit_dist.report`: what is installed, built, compatible and in use (like ds_report).

    python -m fewbit_dist.report            # loads (and if needed JIT-builds) the native ops
    python -m fewbit_dist.report --no-build # only says what is there
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys

import torch

import fewbit_dist


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"
    except Exception as exc:  # a broken install says why
        return f"import failed ({type(exc).__name__}: {exc})"


def _tool(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed ({exc})"
    lines = [ln for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
    return lines[-1].strip() if cmd[0] == "nvcc" and lines else (lines[0].strip() if lines else "?")


def registered_ops() -> list[str]:
    """The native ops registered with torch.library (namespace `fewbit`), by qualified name."""
    from . import ops  # noqa: F401  (registers them)

    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fewbit::"))


def _sources() -> str:
    from .ops import builder

    try:
        return str(builder.find_csrc())
    except FileNotFoundError as exc:
        return f"missing ({exc})"


def _build_dir() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return f"{root} (TORCH_EXTENSIONS_DIR)" if root else f"{get_default_build_root()} (default; TORCH_EXTENSIONS_DIR)"


def _first_line(error) -> str:
    return (error or "").splitlines()[0][:160] if error else ""


def _op_status(device: str, op: str, mode: str) -> str:
    """How `op` runs on `device`: natively from the loaded module, or on the reference (and why)."""
    from .ops import native

    if mode == "0":
        return "reference (FEWBIT_NATIVE=0)"
    state = native.native_state(device)
    if not state["tried"]:
        if device == "cuda" and not torch.cuda.is_available():
            return "not loaded: no CUDA device (CUDA tensors would JIT-build csrc/cuda at first use)"
        return "not loaded yet (run without --no-build to build it)"
    if not state["loaded"]:
        return f"reference: the native module failed to build ({_first_line(state['error'])})"
    if not hasattr(native.native_module(device), op.split("::", 1)[1]):
        return "reference: the built native module has no such function"
    return f"native ({state['source']}), in use"


def _module_line(device: str, mode: str) -> str:
    """Which native module is loaded for `device`: prebuilt or JIT, its path and build hash."""
    from .ops import native

    state = native.native_state(device)
    if mode == "0" or not state["tried"]:
        return "not loaded"
    if not state["loaded"]:
        return f"not loaded ({_first_line(state['error'])})"
    how = "prebuilt at install" if state["source"] == "prebuilt" else (
        "JIT, built now" if state["compiled"] else "JIT, from the build cache")
    return f"{how}: {state['path']} (build hash {state['build_hash']})"


def report(build: bool = True) -> str:
    from .ops import native

    mode = os.environ.get("FEWBIT_NATIVE", "")
    lines = [
        f"fewbit_dist ........ {fewbit_dist.__version__} ({os.path.dirname(fewbit_dist.__file__)})",
        f"python ............. {sys.version.split()[0]}",
        f"torch .............. {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"CUDA available: {torch.cuda.is_available()})",
        f"deepspeed .......... {_version('deepspeed')}",
        f"transformers ....... {_version('transformers')}",
        f"c++ compiler ....... {_tool(['c++', '--version'])}",
        f"nvcc ............... {_tool(['nvcc', '--version'])}",
        f"ninja .............. {_tool(['ninja', '--version'])}",
        f"native sources ..... {_sources()}",
        f"JIT build folder ... {_build_dir()}",
        f"FEWBIT_NATIVE ...... {mode or 'unset (native if it builds, else the reference)'}",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if build and mode != "0":
        for device in devices:
            try:
                native.native_module(device)
            except Exception as exc:  # FEWBIT_NATIVE=1 and a failed build: report it, do not die
                lines.append(f"  ({device} load failed: {_first_line(str(exc))})")
    for device in devices:
        lines.append(f"{device + ' kernels ':.<19} {_module_line(device, mode)}")
    ops = registered_ops()
    width = max(len(op) for op in ops) + 4
    lines.append("native ops (torch.library):")
    for device in ("cpu", "cuda"):
        for op in ops:
            lines.append(f"  {device:<5}{op + ' ':.<{width}} {_op_status(device, op, mode)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true", help="do not load or build the native ops")
    args = ap.parse_args(argv)
    print(report(build=not args.no_build))
    return 0


if __name__ == "__main__":
    sys.exit(main())
