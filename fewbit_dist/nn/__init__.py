"""nn.Module drop-ins: `fewbit_dist.nn.GELU(bits=3)` is also exported as `fewbit_dist.GELU`."""

from .activations import *  # noqa: F401,F403
from .activations import __all__ as _activations
from .dropout import Dropout  # noqa: F401
from .linear import ExactLinear, LowBitLinear, RandomizedLinear  # noqa: F401

__all__ = [*_activations, "RandomizedLinear", "LowBitLinear", "ExactLinear", "Dropout"]
