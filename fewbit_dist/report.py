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
        f"FEWBIT_NATIVE ...... {mode or 'unset (native if it builds, else the reference)'}",
    ]
    if build and mode != "0":
        try:
            native.native_module("cpu")
        except Exception as exc:  # FEWBIT_NATIVE=1 and a failed build: report it, do not die
            lines.append(f"  (load failed: {exc})")
    state = native.native_state()
    if mode == "0":
        cpu = "disabled by FEWBIT_NATIVE=0: the pure-PyTorch reference is in use"
    elif not state["tried"]:
        cpu = "not loaded yet (run without --no-build to build it)"
    elif state["loaded"]:
        cpu = f"built ({state['source']}), compatible, in use"
    else:
        cpu = f"failed to build: the reference is in use ({(state['error'] or '').splitlines()[0][:160]})"
    if not torch.cuda.is_available():
        cuda = "no CUDA device: not loaded (CUDA tensors would JIT-build csrc/cuda at first use)"
    elif build and mode != "0":
        try:
            native.native_module("cuda")
        except Exception as exc:
            lines.append(f"  (cuda load failed: {exc})")
        cstate = native.native_state("cuda")
        cuda = (f"built ({cstate['source']}), compatible, in use" if cstate["loaded"]
                else f"failed to build: the reference is in use ({(cstate['error'] or '').splitlines()[0][:160]})")
    else:
        cuda = "not loaded"
    lines += ["native ops:",
              f"  cpu  fewbit::encode_pack, fewbit::unpack_scale ... {cpu}",
              f"  cuda fewbit::encode_pack, fewbit::unpack_scale ... {cuda}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true", help="do not load or build the native ops")
    args = ap.parse_args(argv)
    print(report(build=not args.no_build))
    return 0


if __name__ == "__main__":
    sys.exit(main())
