"""Dropout with a 1-bit saved mask: the semantics of nn.Dropout (see fewbit_dist.functional.dropout)."""

from __future__ import annotations

import torch
from torch import nn

from ..functional.dropout import check_dropout_p, dropout

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """nn.Dropout(p, inplace) whose backward keeps one bit per element (ceil(n / 8) bytes) for the mask.
    On the CPU its output equals nn.Dropout's under the same RNG state."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        check_dropout_p(p)
        super().__init__(p, inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_bits=1"
