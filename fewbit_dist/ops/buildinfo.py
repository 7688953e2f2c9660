"""What a native build of the kernels depends on, named by a short hash.

A build of csrc/ is a function of: the bytes of its sources and headers, the compiler flags, the compiler named
by CXX, the route that builds it (setuptools at install time, DeepSpeed's OpBuilder or torch.utils.cpp_extension
at run time), the torch build it links against (version, git revision, CUDA version, C++ ABI) and the Python ABI.
`build_hash` folds all of these into 12 hex digits. The JIT build folder carries that hash (plus
`environment_tag`, the install paths that the build commands name), so two source trees or two environments
share a folder only when the build would come out the same; and the module itself carries the hash
(FEWBIT_BUILD_HASH, readable as `module.build_hash`), so a prebuilt module built from other sources or for
another torch is recognized as stale instead of being loaded.

This file imports nothing from the package (setup.py executes it by path, before the package is importable)
and imports torch only inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path

__all__ = ["CPU_CXX_ARGS", "CPU_LDFLAGS", "CUDA_CXX_ARGS", "CUDA_NVCC_ARGS", "DEFAULT_CUDA_ARCHS", "DEVICES",
           "source_files", "device_flags", "build_hash", "environment_tag", "hash_define"]

CPU_CXX_ARGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]  # no FMA: the reference's bytes
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CXX_ARGS = ["-O3", "-std=c++17"]
CUDA_NVCC_ARGS = ["-O3", "-std=c++17", "-lineinfo"]  # no --use_fast_math: it flushes denormals
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200; override with TORCH_CUDA_ARCH_LIST
DEVICES = ("cpu", "cuda")
HASH_CHARS = 12


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def source_files(csrc: Path, device: str) -> tuple[list[Path], list[Path]]:
    """(sources, headers) of the `device` kernels under the source folder `csrc`, headers sorted."""
    _check_device(device)
    csrc = Path(csrc)
    sources = ([csrc / "cpu" / "fewbit_cpu.cpp"] if device == "cpu"
               else [csrc / "cuda" / "binding.cpp", csrc / "cuda" / "fewbit_cuda.cu"])
    headers = sorted((csrc / "include").rglob("*.h")) + sorted((csrc / device).glob("*.h"))
    return sources, headers


def device_flags(device: str) -> list[str]:
    """The compiler and linker flags of the `device` kernels, as they enter the build hash."""
    _check_device(device)
    return CPU_CXX_ARGS + CPU_LDFLAGS if device == "cpu" else CUDA_CXX_ARGS + CUDA_NVCC_ARGS


def build_hash(csrc: Path, device: str, route: str, flags: list[str] | tuple[str, ...] = ()) -> str:
    """The hash of what a build of the `device` kernels from `csrc` by `route` with `flags` depends on."""
    import torch

    _check_device(device)
    h = hashlib.sha256()

    def add(*parts) -> None:
        for part in parts:
            h.update(part if isinstance(part, bytes) else str(part).encode())
            h.update(b"\0")

    csrc = Path(csrc)
    sources, headers = source_files(csrc, device)
    for path in sources + headers:
        add(path.relative_to(csrc).as_posix(), path.read_bytes())
    add("route", route, "flags", *flags, "CXX", os.environ.get("CXX", "c++"))
    add("torch", torch.__version__, torch.version.git_version, torch.version.cuda, torch.version.hip,
        torch._C._GLIBCXX_USE_CXX11_ABI)
    add("python", sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"), platform.machine())
    if device == "cuda":
        add("cuda", os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS), os.environ.get("CUDA_HOME", ""))
    return h.hexdigest()[:HASH_CHARS]


def environment_tag() -> str:
    """A short hash of the install paths that JIT build commands name (torch's and Python's include folders):
    two environments with the same torch build get separate folders, so neither rewrites the other's
    build.ninja, which would make ninja rebuild."""
    import torch

    paths = (os.path.dirname(torch.__file__), sysconfig.get_paths()["include"])
    return hashlib.sha256("\0".join(paths).encode()).hexdigest()[:6]


def hash_define(value: str) -> str:
    """The compiler flag that bakes a build hash into the module (read back as `module.build_hash`)."""
    return f"-DFEWBIT_BUILD_HASH={value}"
