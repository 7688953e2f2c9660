"""How the native kernels are built: a DeepSpeed OpBuilder (JIT with ninja, cached), or, without DeepSpeed,
torch.utils.cpp_extension.load with the same sources and flags. Imported only when native ops are first
needed: it imports DeepSpeed.

The sources ship inside the package (fewbit_dist/csrc, package data that setup.py maps from the repository's
csrc/); a source checkout (editable install) has them at the repository root instead. Builds go where torch puts
JIT extensions (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), never into the package, so a read-only
install builds too."""

from __future__ import annotations

from pathlib import Path

__all__ = ["find_csrc", "cpu_sources", "cuda_sources", "include_paths", "CPU_CXX_ARGS", "cpu_builder",
           "cuda_builder", "jit_load_cpu", "jit_load_cuda", "build_cuda_extension", "clear_stale_lock"]

CPU_CXX_ARGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]  # no FMA: the reference's bytes
CPU_NAME = "fewbit_dist_cpu_ops"  # unique: DeepSpeed caches loaded ops by NAME
CUDA_NAME = "fewbit_dist_cuda_ops"
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200; override with TORCH_CUDA_ARCH_LIST


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


def cpu_sources() -> list[str]:
    return [str(find_csrc() / "cpu" / "fewbit_cpu.cpp")]


def cuda_sources() -> list[str]:
    csrc = find_csrc()
    return [str(csrc / "cuda" / "binding.cpp"), str(csrc / "cuda" / "fewbit_cuda.cu")]


def include_paths() -> list[str]:
    return [str(find_csrc() / "include")]


class _FewBitBuilder:
    """What both builders share; mixed into DeepSpeed's OpBuilder / CUDAOpBuilder when those are imported."""

    BUILD_VAR = "FEWBIT_BUILD_OPS"
    NAME = ""

    def __init__(self):
        super().__init__(name=self.NAME)

    def absolute_name(self):
        return f"fewbit_dist.ops.{self.NAME}"

    def include_paths(self):
        return include_paths()

    def is_compatible(self, verbose=False):
        return True


def cpu_builder():
    """A DeepSpeed OpBuilder for the CPU kernels (absolute source paths, as DeepSpeed wants for third-party ops)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    class FewBitCPUBuilder(_FewBitBuilder, OpBuilder):
        NAME = CPU_NAME

        def sources(self):
            return cpu_sources()

        def cxx_args(self):
            return list(CPU_CXX_ARGS)

        def extra_ldflags(self):
            return ["-fopenmp"]

    return FewBitCPUBuilder()


STALE_LOCK_S = 600  # a JIT build of these kernels takes well under a minute


def clear_stale_lock(name: str, max_age_s: float = STALE_LOCK_S):
    """torch's JIT loader guards its build folder with a lock file and waits for it forever. A process killed
    while holding it (a job killed during the build or its up-to-date check) would hang every later run, so
    a lock older than `max_age_s` is removed, with a warning. Returns the removed path or None."""
    import time
    import warnings

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < max_age_s:
        return None
    lock.unlink(missing_ok=True)
    warnings.warn(f"fewbit_dist: removed a stale JIT build lock ({lock}, {age:.0f} s old; its owner was killed)",
                  RuntimeWarning, stacklevel=2)
    return lock


def jit_load_cpu(verbose: bool = False):
    """Build (or take from the cache) and import the CPU kernels."""
    clear_stale_lock(CPU_NAME)
    try:
        builder = cpu_builder()
    except ImportError:  # no DeepSpeed: the same build through torch directly
        from torch.utils.cpp_extension import load

        return load(name=CPU_NAME, sources=cpu_sources(), extra_include_paths=include_paths(),
                    extra_cflags=CPU_CXX_ARGS, extra_ldflags=["-fopenmp"], verbose=verbose)
    return builder.jit_load(verbose=verbose)


def cuda_builder():
    """A DeepSpeed CUDAOpBuilder for the CUDA kernels (the same header-only core as the CPU ones)."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    class FewBitCUDABuilder(_FewBitBuilder, CUDAOpBuilder):
        NAME = CUDA_NAME

        def sources(self):
            return cuda_sources()

        def nvcc_args(self):
            # No --use_fast_math: it flushes denormals, and the kernels must give the reference's bytes.
            return [a for a in super().nvcc_args() if a != "--use_fast_math"] + ["-lineinfo"]

    return FewBitCUDABuilder()


def jit_load_cuda(verbose: bool = False):
    import os

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    clear_stale_lock(CUDA_NAME)
    return cuda_builder().jit_load(verbose=verbose)


def build_cuda_extension(build_dir, verbose: bool = False):
    """Compile and link the CUDA extension ahead of time through the OpBuilder (works without a GPU, given
    a CUDA build of torch and CUDA_HOME); returns the path of the built module."""
    import os
    from pathlib import Path as _Path

    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    builder = cuda_builder()
    ext = builder.builder()
    if builder.build_for_cpu:
        raise RuntimeError("the OpBuilder found no usable CUDA toolkit for this torch (a CUDA build of torch and "
                           "CUDA_HOME are needed)")
    build_dir = _Path(build_dir)
    dist = Distribution({"name": "fewbit_dist_cuda_check", "ext_modules": [ext],
                         "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.verbose = str(build_dir / "lib"), str(build_dir / "tmp"), verbose
    dist.run_command("build_ext")
    built = sorted((build_dir / "lib").rglob(f"{CUDA_NAME}*.so"))
    if not built:
        raise RuntimeError(f"no {CUDA_NAME} module was produced under {build_dir}")
    return built[0]
