"""DeepSpeed: convert, then `deepspeed.initialize`, in that order; `--fewbit-config` for argparse.

    parser = argparse.ArgumentParser()
    fewbit_dist.integrations.deepspeed.add_fewbit_arguments(parser)
    deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    engine, optimizer, _, _ = fewbit_dist.integrations.deepspeed.initialize(
        model=model, fewbit_config=args.fewbit_config, config=args.deepspeed_config,
        model_parameters=model.parameters())

Works for ZeRO stages 0-3 and for models built under `deepspeed.zero.Init` (their Parameters are already
partitioned; converted layers share them, and ZeRO-3's hooks, installed by initialize, cover the new
modules). DeepSpeed's activation checkpointing (`deepspeed.checkpointing.checkpoint`) restores the CPU RNG
state before recomputing, so randomized layers draw the same seed in the recompute.
"""

from __future__ import annotations

import argparse

from torch import nn

from ..config import ConfigLike
from ..convert import convert

__all__ = ["add_fewbit_arguments", "initialize"]


def add_fewbit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--fewbit-config PATH` (a JSON file; a top-level "fewbit" section is used when present)."""
    group = parser.add_argument_group("fewbit_dist")
    group.add_argument("--fewbit-config", dest="fewbit_config", default=None, metavar="PATH",
                       help="fewbit_dist JSON config (or a training config with a \"fewbit\" section)")
    return parser


def initialize(model: nn.Module, fewbit_config: ConfigLike = None, **deepspeed_kwargs):
    """`fewbit_dist.convert(model, fewbit_config)` then `deepspeed.initialize(model=model, **deepspeed_kwargs)`.

    Returns what deepspeed.initialize returns. `fewbit_config=None` uses the defaults (3-bit activations).
    """
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("fewbit_dist.integrations.deepspeed needs DeepSpeed: "
                          "pip install --no-build-isolation deepspeed") from exc
    if "model" in deepspeed_kwargs:
        raise TypeError("pass the model as the first argument, not in deepspeed_kwargs")
    model = convert(model, fewbit_config)
    return deepspeed.initialize(model=model, **deepspeed_kwargs)
