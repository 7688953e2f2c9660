"""fewbit_dist: memory-efficient training with few-bit activation derivatives, for distributed PyTorch."""

__version__ = "0.1.0"
