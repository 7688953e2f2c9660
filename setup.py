"""fewbit_dist: few-bit activation derivatives and compressed saved tensors for distributed PyTorch training.

Pure Python for now; the native kernels in csrc/ arrive as DeepSpeed op_builder extensions. DeepSpeed imports
torch while it builds, so install the distributed extra with `pip install --no-build-isolation`.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
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
    packages=find_packages(include=["fewbit_dist", "fewbit_dist.*"]),
    package_data={"fewbit_dist.quant": ["builtin_tables.json"]},
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        "hf": ["transformers>=4.40"],
        "dist": ["deepspeed>=0.15", "mpi4py>=3.1"],
        "build": ["pybind11>=2.12", "ninja>=1.11"],
        "test": ["pytest>=8", "hypothesis>=6.100", "transformers>=4.40"],
    },
)
