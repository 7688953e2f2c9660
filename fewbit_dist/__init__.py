"""fewbit_dist: memory-efficient training with few-bit activation derivatives, for distributed PyTorch.

    import fewbit_dist
    model = fewbit_dist.convert(model, activation_bits=3)   # before ZeRO / FSDP wrap the model
    act = fewbit_dist.GELU(bits=3)                           # or use the drop-ins directly

Importing the package imports torch only: no DeepSpeed, no transformers, no CUDA initialization.
"""

__version__ = "0.1.0"

from . import functional, memory, optim, presets, quant, util  # noqa: E402,F401
from .config import FewBitConfig  # noqa: E402
from .convert import ConversionReport, conversion_report, convert  # noqa: E402
from .nn.dropout import Dropout  # noqa: E402
from .nn.linear import ExactLinear, LowBitLinear, RandomizedLinear  # noqa: E402
from .nn.activations import (  # noqa: E402
    CELU, ELU, GELU, SELU, FewBitActivation, Hardshrink, Hardsigmoid, Hardswish, Hardtanh, LeakyReLU, LogSigmoid,
    Mish, ReLU, ReLU6, Sigmoid, SiLU, Softplus, Softshrink, Softsign, Tanh, Tanhshrink, Threshold,
)

SMOOTH_ACTIVATIONS = ("GELU", "CELU", "ELU", "Hardswish", "LogSigmoid", "Mish", "SELU", "Sigmoid", "SiLU", "Softplus",
                      "Softsign", "Tanh", "Tanhshrink")
PIECEWISE_ACTIVATIONS = ("ReLU", "LeakyReLU", "Threshold", "Hardsigmoid", "Hardtanh", "ReLU6", "Hardshrink",
                         "Softshrink")

__all__ = [
    "__version__", "convert", "conversion_report", "ConversionReport", "FewBitConfig", "FewBitActivation",
    "RandomizedLinear", "LowBitLinear", "ExactLinear", "Dropout", "presets",
    "functional", "memory", "optim", "quant", "util", "SMOOTH_ACTIVATIONS", "PIECEWISE_ACTIVATIONS",
    *SMOOTH_ACTIVATIONS, *PIECEWISE_ACTIVATIONS,
]
