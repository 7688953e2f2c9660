"""fewbit_dist: few-bit activation derivatives and compressed saved tensors for distributed PyTorch training.

Package data: the native sources (the repository's csrc/, installed as fewbit_dist/csrc so that an installed
package can JIT-build them), the presets (fewbit_dist/presets/*.json) and the built-in tables.
The native kernels in csrc/ are JIT-built at first use through DeepSpeed OpBuilders (fewbit_dist/ops). To
build them at install time instead: `FEWBIT_BUILD_OPS=1 pip install --no-build-isolation .` (CPU kernels, plus
the CUDA ones when torch is a CUDA build and nvcc is found). DeepSpeed imports torch while it builds, so
install with `--no-build-isolation`.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _buildinfo():
    """fewbit_dist/ops/buildinfo.py, executed by path (the package cannot be imported before it is installed)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fewbit_buildinfo", ROOT / "fewbit_dist" / "ops" / "buildinfo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extensions():
    """The prebuilt native modules fewbit_dist.ops loads before any JIT build (FEWBIT_BUILD_OPS=1). Each carries
    its build hash (buildinfo.build_hash with route 'setup'), so the loader can tell a stale one."""
    if os.environ.get("FEWBIT_BUILD_OPS") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    info = _buildinfo()
    csrc = ROOT / "csrc"
    include = [str(csrc / "include")]
    cpu_define = info.hash_define(info.build_hash(csrc, "cpu", "setup", info.device_flags("cpu")))
    exts = [CppExtension("fewbit_dist._fewbit_cpu", ["csrc/cpu/fewbit_cpu.cpp"], include_dirs=include,
                         extra_compile_args=info.CPU_CXX_ARGS + [cpu_define], extra_link_args=info.CPU_LDFLAGS)]
    if torch.version.cuda and CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", info.DEFAULT_CUDA_ARCHS)
        cuda_define = info.hash_define(info.build_hash(csrc, "cuda", "setup", info.device_flags("cuda")))
        exts.append(CUDAExtension("fewbit_dist._fewbit_cuda", ["csrc/cuda/binding.cpp", "csrc/cuda/fewbit_cuda.cu"],
                                  include_dirs=include,
                                  extra_compile_args={"cxx": info.CUDA_CXX_ARGS + [cuda_define],
                                                      "nvcc": info.CUDA_NVCC_ARGS + [cuda_define]}))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()
version = next(line.split('"')[1] for line in (ROOT / "fewbit_dist" / "__init__.py").read_text().splitlines()
               if line.startswith("__version__"))

setup(
    name="fewbit_dist",
    version=version,
    description="Few-bit activation derivatives and randomized/low-bit saved tensors for DeepSpeed and FSDP training",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # csrc/ lives at the repository root; it is installed as the data-only package fewbit_dist.csrc
    packages=find_packages(include=["fewbit_dist", "fewbit_dist.*"]) + ["fewbit_dist.csrc"],
    package_dir={"fewbit_dist.csrc": "csrc"},
    package_data={
        "fewbit_dist": ["presets/*.json"],
        "fewbit_dist.presets": ["*.json"],
        "fewbit_dist.quant": ["builtin_tables.json"],
        "fewbit_dist.plan_models": ["*.json"],
        "fewbit_dist.csrc": ["README.md", "include/fewbit/*.h", "cpu/*.cpp", "cuda/*.cpp", "cuda/*.cu"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "hf": ["transformers>=4.40"],
        "dist": ["deepspeed>=0.15", "mpi4py>=3.1"],
        "build": ["pybind11>=2.12", "ninja>=1.11"],
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=4.40"],
    },
)
