"""How the native kernels are built: a DeepSpeed OpBuilder (JIT with ninja, cached), or, without DeepSpeed,
torch.utils.cpp_extension.load with the same sources and flags. Imported only when native ops are first
needed: it imports DeepSpeed."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CSRC", "cpu_sources", "include_paths", "CPU_CXX_ARGS", "cpu_builder", "jit_load_cpu"]

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_CXX_ARGS = ["-O3", "-std=c++17", "-fopenmp"]
CPU_NAME = "fewbit_dist_cpu_ops"  # unique: DeepSpeed caches loaded ops by NAME


def cpu_sources() -> list[str]:
    return [str(CSRC / "cpu" / "fewbit_cpu.cpp")]


def include_paths() -> list[str]:
    return [str(CSRC / "include")]


def cpu_builder():
    """A DeepSpeed OpBuilder for the CPU kernels (absolute source paths, as DeepSpeed wants for third-party ops)."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    class FewBitCPUBuilder(OpBuilder):
        BUILD_VAR = "FEWBIT_BUILD_OPS"
        NAME = CPU_NAME

        def __init__(self):
            super().__init__(name=self.NAME)

        def absolute_name(self):
            return f"fewbit_dist.ops.{self.NAME}"

        def sources(self):
            return cpu_sources()

        def include_paths(self):
            return include_paths()

        def cxx_args(self):
            return list(CPU_CXX_ARGS)

        def extra_ldflags(self):
            return ["-fopenmp"]

        def is_compatible(self, verbose=False):
            return True

    return FewBitCPUBuilder()


def jit_load_cpu(verbose: bool = False):
    """Build (or take from the cache) and import the CPU kernels."""
    try:
        builder = cpu_builder()
    except ImportError:  # no DeepSpeed: the same build through torch directly
        from torch.utils.cpp_extension import load

        return load(name=CPU_NAME, sources=cpu_sources(), extra_include_paths=include_paths(),
                    extra_cflags=CPU_CXX_ARGS, extra_ldflags=["-fopenmp"], verbose=verbose)
    return builder.jit_load(verbose=verbose)
