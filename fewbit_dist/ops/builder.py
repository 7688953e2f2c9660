"""How the native kernels are built at run time: a DeepSpeed OpBuilder (JIT with ninja), or, without DeepSpeed,
torch.utils.cpp_extension.load with the same sources and flags. Imported only when native ops are first needed.

The sources ship inside the package (fewbit_dist/csrc, package data that setup.py maps from the repository's
csrc/); a source checkout (editable install) has them at the repository root instead. Builds go where torch puts
JIT extensions (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), never into the package, so a read-only
install builds too.

One build folder per build hash (`buildinfo.build_hash`): the folder and the module are named
`fewbit_dist_cpu_ops_<hash>_<environment tag>`, and the sources are copied into the folder before the build, so
the build commands name no path of the tree they came from. Two source trees with the same content share one
build; a changed source, flag, compiler or torch gets a new folder; two environments never rebuild over each
other. A finished build is marked (`BUILT_MARK`), and a later load imports the module directly: no ninja, no
compiler. Builds of one folder are serialized by an flock on `fewbit.lock`, which the kernel releases when its
holder dies, so a lock is never taken over while its holder is alive and never outlives it; the file names the
holder's pid for whoever waits.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import buildinfo
from .buildinfo import CPU_CXX_ARGS, CPU_LDFLAGS, CUDA_CXX_ARGS, CUDA_NVCC_ARGS, DEFAULT_CUDA_ARCHS

__all__ = ["find_csrc", "cpu_sources", "cuda_sources", "include_paths", "CPU_CXX_ARGS", "cpu_builder",
           "cuda_builder", "jit_load", "jit_plan", "build_cuda_extension",
           "build_lock", "BUILT_MARK"]

CPU_NAME = "fewbit_dist_cpu_ops"  # the prefix of every JIT build's name (unique: DeepSpeed caches ops by NAME)
CUDA_NAME = "fewbit_dist_cuda_ops"
BASE_NAMES = {"cpu": CPU_NAME, "cuda": CUDA_NAME}
BUILT_MARK = "fewbit-built"
LOCK_NAME = "fewbit.lock"
WAIT_NOTICE_S = 5.0


def find_csrc() -> Path:
    """The folder of the native sources: the installed package's `csrc` (package data), else the repository's
    `csrc/` beside the package (a source checkout or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "csrc", package.parent / "csrc")
    for root in candidates:
        if (root / "cpu" / "fewbit_cpu.cpp").is_file():
            return root
    raise FileNotFoundError("fewbit_dist: the native sources are missing (looked for cpu/fewbit_cpu.cpp in "
                            f"{' and '.join(str(c) for c in candidates)}); reinstall the package, or set "
                            "FEWBIT_NATIVE=0 to use the pure-PyTorch reference")


def cpu_sources(csrc: Path | None = None) -> list[str]:
    return [str(p) for p in buildinfo.source_files(csrc or find_csrc(), "cpu")[0]]


def cuda_sources(csrc: Path | None = None) -> list[str]:
    return [str(p) for p in buildinfo.source_files(csrc or find_csrc(), "cuda")[0]]


def include_paths(csrc: Path | None = None) -> list[str]:
    return [str((csrc or find_csrc()) / "include")]


class _FewBitBuilder:
    """What both builders share; mixed into DeepSpeed's OpBuilder / CUDAOpBuilder when those are imported."""

    BUILD_VAR = "FEWBIT_BUILD_OPS"
    NAME = ""

    def __init__(self, name: str | None = None, csrc: Path | None = None, defines: tuple[str, ...] = ()):
        self._csrc = csrc
        self._defines = list(defines)
        super().__init__(name=name or self.NAME)

    def absolute_name(self):
        return f"fewbit_dist.ops.{self.name}"

    def include_paths(self):
        return include_paths(self._csrc)

    def is_compatible(self, verbose=False):
        return True


def cpu_builder(name: str | None = None, csrc: Path | None = None, defines: tuple[str, ...] = ()):
    """A DeepSpeed OpBuilder for the CPU kernels (absolute source paths, as DeepSpeed wants for third-party ops)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    class FewBitCPUBuilder(_FewBitBuilder, OpBuilder):
        NAME = CPU_NAME

        def sources(self):
            return cpu_sources(self._csrc)

        def cxx_args(self):
            return list(CPU_CXX_ARGS) + self._defines

        def extra_ldflags(self):
            return list(CPU_LDFLAGS)

    return FewBitCPUBuilder(name, csrc, defines)


def cuda_builder(name: str | None = None, csrc: Path | None = None, defines: tuple[str, ...] = ()):
    """A DeepSpeed CUDAOpBuilder for the CUDA kernels (the same header-only core as the CPU ones)."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    class FewBitCUDABuilder(_FewBitBuilder, CUDAOpBuilder):
        NAME = CUDA_NAME

        def sources(self):
            return cuda_sources(self._csrc)

        def cxx_args(self):
            return super().cxx_args() + self._defines

        def nvcc_args(self):
            # No --use_fast_math: it flushes denormals, and the kernels must give the reference's bytes.
            return [a for a in super().nvcc_args() if a != "--use_fast_math"] + ["-lineinfo"] + self._defines

    return FewBitCUDABuilder(name, csrc, defines)


def _route() -> str:
    """'deepspeed' where DeepSpeed is installed (its OpBuilder builds), else 'torch' (torch.utils.cpp_extension).
    Found without importing DeepSpeed, so that a cached build loads fast."""
    return "deepspeed" if importlib.util.find_spec("deepspeed") is not None else "torch"


def _route_flags(device: str, route: str) -> list[str]:
    """The flags that enter the build hash. DeepSpeed's OpBuilder adds flags of its own, so its version does too."""
    flags = buildinfo.device_flags(device)
    if route == "deepspeed":
        flags = flags + [f"deepspeed=={importlib.metadata.version('deepspeed')}"]
    return flags


def jit_plan(device: str = "cpu", csrc: Path | None = None) -> dict:
    """Where and under which name a JIT build of the `device` kernels from `csrc` (default: the package's) goes,
    its build hash and whether it is already built. Builds nothing (without TORCH_EXTENSIONS_DIR, torch's folder
    helper creates the empty folder)."""
    from torch.utils.cpp_extension import _get_build_directory

    if device == "cuda":
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    csrc = Path(csrc) if csrc is not None else find_csrc()
    route = _route()
    digest = buildinfo.build_hash(csrc, device, route, _route_flags(device, route))
    name = f"{BASE_NAMES[device]}_{digest}_{buildinfo.environment_tag()}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    folder = Path(root) / name if root else Path(_get_build_directory(name, False))
    plan = {"device": device, "name": name, "build_hash": digest, "route": route, "csrc": csrc, "folder": folder,
            "library": folder / f"{name}.so"}
    return plan | {"built": _finished(plan)}


def _finished(plan: dict) -> bool:
    """Whether the planned build has finished (its mark is written after the library)."""
    return (plan["folder"] / BUILT_MARK).is_file() and plan["library"].is_file()


@contextmanager
def build_lock(folder: Path):
    """Holds an exclusive flock on `folder`/fewbit.lock (waits for it; says once whom it waits for). The
    kernel drops the lock when the holder exits or is killed, so no age rule is needed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with open(path, "a+") as fh:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and time.monotonic() - start > WAIT_NOTICE_S:
                    fh.seek(0)
                    holder = fh.read().strip() or "?"
                    print(f"fewbit_dist: waiting for process {holder} building the native kernels in {folder}",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.2)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _import_library(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage_sources(csrc: Path, device: str, dest: Path) -> Path:
    """Copies the sources and headers to `dest` (a file whose bytes are already there is left alone, so its
    time stamp, which ninja reads, does not move) and returns `dest`."""
    sources, headers = buildinfo.source_files(csrc, device)
    for path in sources + headers:
        target = dest / path.relative_to(csrc)
        data = path.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    return dest


def _compile(plan: dict, staged: Path, verbose: bool):
    """Builds the planned module from the sources staged in `staged` (the caller holds the build lock)."""
    device, name, route = plan["device"], plan["name"], plan["route"]
    defines = (buildinfo.hash_define(plan["build_hash"]),)
    if route == "deepspeed":
        make = cpu_builder if device == "cpu" else cuda_builder
        return make(name, staged, defines).jit_load(verbose=verbose)
    from torch.utils.cpp_extension import load

    if device == "cpu":
        return load(name=name, sources=cpu_sources(staged), extra_include_paths=include_paths(staged),
                    extra_cflags=CPU_CXX_ARGS + list(defines), extra_ldflags=CPU_LDFLAGS, verbose=verbose)
    return load(name=name, sources=cuda_sources(staged), extra_include_paths=include_paths(staged),
                extra_cflags=CUDA_CXX_ARGS + list(defines), extra_cuda_cflags=CUDA_NVCC_ARGS + list(defines),
                verbose=verbose)


def jit_load(device: str = "cpu", csrc: Path | None = None, verbose: bool = False):
    """(module, info): the `device` kernels from the JIT cache, built first if this build hash has no finished
    build yet. info has the plan's fields (name, build_hash, folder, library, route) and `compiled` (whether
    this call ran the build)."""
    plan = jit_plan(device, csrc)
    if plan["built"]:
        return _import_library(plan["name"], plan["library"]), plan | {"compiled": False}
    with build_lock(plan["folder"]):
        if _finished(plan):  # built while we waited
            return _import_library(plan["name"], plan["library"]), plan | {"built": True, "compiled": False}
        # Every build of this folder holds the flock first, so torch's own lock file, if any, is a killed
        # build's leftover: without this, torch would wait on it forever.
        (plan["folder"] / "lock").unlink(missing_ok=True)
        staged = _stage_sources(plan["csrc"], plan["device"], plan["folder"] / "src")
        module = _compile(plan, staged, verbose)
        (plan["folder"] / BUILT_MARK).write_text(plan["build_hash"] + "\n")
    return module, plan | {"built": True, "compiled": True}


def build_cuda_extension(build_dir, verbose: bool = False):
    """Compile and link the CUDA extension ahead of time through the OpBuilder (works without a GPU, given
    a CUDA build of torch and CUDA_HOME); returns the path of the built module."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    builder = cuda_builder()
    ext = builder.builder()
    if builder.build_for_cpu:
        raise RuntimeError("the OpBuilder found no usable CUDA toolkit for this torch (a CUDA build of torch and "
                           "CUDA_HOME are needed)")
    build_dir = Path(build_dir)
    dist = Distribution({"name": "fewbit_dist_cuda_check", "ext_modules": [ext],
                         "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.verbose = str(build_dir / "lib"), str(build_dir / "tmp"), verbose
    dist.run_command("build_ext")
    built = sorted((build_dir / "lib").rglob(f"{CUDA_NAME}*.so"))
    if not built:
        raise RuntimeError(f"no {CUDA_NAME} module was produced under {build_dir}")
    return built[0]

