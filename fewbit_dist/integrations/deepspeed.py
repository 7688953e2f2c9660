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

__all__ = ["add_fewbit_arguments", "initialize", "resolve_auto_buckets", "AUTO_BUCKETS"]

# ZeRO settings that scale with the model's width, written "auto" in a config and set from hidden_size h as
# Hugging Face's Trainer sets them. DeepSpeed's own defaults (reduce_bucket_size 5e8 elements, prefetch 5e7) exceed
# every gradient of a small or mid-size model: ZeRO-3 then holds all gradients unpartitioned until the end of
# backward and reduces them through full-size buffers, which sets the step's peak (measured: results/peak,
# FINDINGS.md).
AUTO_BUCKETS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


def add_fewbit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--fewbit-config PATH` (a JSON file; a top-level "fewbit" section is used when present)."""
    group = parser.add_argument_group("fewbit_dist")
    group.add_argument("--fewbit-config", dest="fewbit_config", default=None, metavar="PATH",
                       help="fewbit_dist JSON config (or a training config with a \"fewbit\" section)")
    return parser


def resolve_auto_buckets(ds_config: dict, model: nn.Module) -> dict:
    """A copy of `ds_config` whose zero_optimization values "auto" (AUTO_BUCKETS' keys) are set from the model's
    hidden size (`model.config.hidden_size`); a ValueError names the key when the model has none."""
    zero = ds_config.get("zero_optimization") or {}
    auto = [k for k, v in zero.items() if v == "auto"]
    if not auto:
        return ds_config
    unknown = [k for k in auto if k not in AUTO_BUCKETS]
    if unknown:
        raise ValueError(f"zero_optimization.{unknown[0]} is 'auto', which fewbit_dist sets only for "
                         f"{', '.join(AUTO_BUCKETS)}; give it a number")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ValueError(f"zero_optimization.{auto[0]} is 'auto' but the model has no config.hidden_size to size it "
                         "from; give it a number")
    return {**ds_config, "zero_optimization": {**zero, **{k: AUTO_BUCKETS[k](hidden) for k in auto}}}


def initialize(model: nn.Module, fewbit_config: ConfigLike = None, **deepspeed_kwargs):
    """`fewbit_dist.convert(model, fewbit_config)` then `deepspeed.initialize(model=model, **deepspeed_kwargs)`.

    A config dict passed as `config` may say "auto" for the ZeRO bucket sizes (AUTO_BUCKETS): they are set from
    the model's hidden size first. Returns what deepspeed.initialize returns. `fewbit_config=None` uses the
    defaults (3-bit activations).
    """
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("fewbit_dist.integrations.deepspeed needs DeepSpeed: "
                          "pip install --no-build-isolation deepspeed") from exc
    if "model" in deepspeed_kwargs:
        raise TypeError("pass the model as the first argument, not in deepspeed_kwargs")
    if isinstance(deepspeed_kwargs.get("config"), dict):
        deepspeed_kwargs["config"] = resolve_auto_buckets(deepspeed_kwargs["config"], model)
    model = convert(model, fewbit_config)
    return deepspeed.initialize(model=model, **deepspeed_kwargs)
