"""Functional few-bit activations, named and parameterized as in torch.nn.functional, plus the linear and
dropout functions with compressed saved tensors."""

from .activations import (  # noqa: F401
    celu, elu, gelu, hardshrink, hardsigmoid, hardswish, hardtanh, leaky_relu, logsigmoid, mish, relu, relu6,
    selu, sigmoid, silu, softplus, softshrink, softsign, tanh, tanhshrink, threshold,
)

from .dropout import dropout  # noqa: F401
from .linear import randomized_linear  # noqa: F401
from .lowbit import low_bit_linear  # noqa: F401

__all__ = ["randomized_linear", "low_bit_linear", "dropout",
    "gelu", "celu", "elu", "hardswish", "logsigmoid", "mish", "selu", "sigmoid", "silu", "softplus", "softsign",
    "tanh", "tanhshrink", "relu", "leaky_relu", "threshold", "hardsigmoid", "hardtanh", "relu6", "hardshrink",
    "softshrink",
]
