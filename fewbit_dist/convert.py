"""`convert(model, config=None, **overrides)`: one call that makes a whole model few-bit, in place.

It swaps the torch.nn activations (the 21 of `fewbit_dist.nn`) and the activation modules of Hugging Face
transformers for their few-bit versions; when the config asks for it, every nn.Linear for a LowBitLinear
(linear_bits) or a RandomizedLinear (proj_dim_ratio / proj_dim) sharing its Parameters, and every nn.Dropout
for fewbit_dist.Dropout (compress_dropout). Per-pattern `overrides` choose per module. Parameters, buffers and
state_dict keys are untouched, so checkpoints load both ways and tied weights stay tied. Run it before
ZeRO/FSDP wrap or shard the model.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .config import ConfigLike, FewBitConfig
from .integrations.sharding import check_not_sharded
from .integrations.transformers import transformers_activation_spec, use_fewbit_attention
from .nn.activations import PIECEWISE_MODULES, SMOOTH_MODULES, FewBitActivation, FewBitModule
from .nn.dropout import Dropout
from .nn.linear import LowBitLinear, RandomizedLinear
from .util import convert_linear, map_module

__all__ = ["convert", "convert_activation", "ConversionReport", "conversion_report"]

log = logging.getLogger("fewbit_dist")


@dataclass
class ConversionReport:
    """What `convert` swapped: one (path, before, after) per module."""

    config: FewBitConfig
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    attention_modules: int = 0  # Hugging Face modules marked for 1-bit attention dropout (compress_dropout)
    attention: str = ""  # what happened to the attention implementation, when attention_modules

    def counts(self) -> dict[str, int]:
        return dict(Counter(before for _, before, _ in self.swapped))

    def __str__(self) -> str:
        if not self.swapped:
            return "fewbit_dist.convert: nothing to convert"
        lines = [f"fewbit_dist.convert: {len(self.swapped)} module(s) swapped"]
        lines += [f"  {n} x {cls}" for cls, n in sorted(self.counts().items())]
        if self.attention:
            lines.append(f"  attention ({self.attention_modules} modules): {self.attention}")
        return "\n".join(lines)


def _ctor_kwargs(new_cls, old: nn.Module) -> dict:
    """Constructor arguments of `new_cls` (named as in torch.nn) read from the attributes of `old`."""
    params = inspect.signature(new_cls.__init__).parameters
    return {name: getattr(old, name) for name in params if name not in ("self", "bits") and hasattr(old, name)}


def convert_activation(module: nn.Module, bits: int, convert_transformers: bool = True) -> nn.Module:
    """The few-bit replacement of one activation module, or `module` itself when it is not one we convert."""
    if isinstance(module, FewBitModule):
        return module
    cls = type(module)  # exact class: a user's subclass may override forward, so it is not ours to replace
    if cls in SMOOTH_MODULES:
        new_cls = SMOOTH_MODULES[cls]
        return new_cls(**_ctor_kwargs(new_cls, module), bits=bits)
    if cls in PIECEWISE_MODULES:
        new_cls = PIECEWISE_MODULES[cls]
        return new_cls(**_ctor_kwargs(new_cls, module))
    if convert_transformers:
        spec = transformers_activation_spec(module, bits)
        if spec is not None:
            return FewBitActivation(module, bits=bits, spec=spec, name=cls.__name__)
    return module


def _matches(path: str, patterns) -> bool:
    # A pattern selects the module at a matching path and everything below it.
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def _check_patterns(model: nn.Module, cfg: FewBitConfig) -> None:
    paths = [p for p, _ in model.named_modules() if p]
    checks = [(kind, p) for kind in ("include", "exclude") for p in getattr(cfg, kind)]
    checks += [(f"overrides[{i}]", p) for i, ov in enumerate(cfg.overrides) for p in ov.patterns]
    for kind, p in checks:
        if not any(_matches(path, [p]) for path in paths):
            sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ValueError(f"{kind} pattern {p!r} matches no module path of the model (paths look like: "
                             f"{sample}); `*` matches any characters, dots included")


def convert(model: nn.Module, config: ConfigLike = None, **overrides) -> nn.Module:
    """Convert `model` in place and return it (the returned object is the model, unless the model itself
    is a bare activation module, which is then returned replaced). `conversion_report(model)` tells what
    changed. `config`: FewBitConfig, dict, JSON path or None; keyword overrides are config fields."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = FewBitConfig.load(config, **overrides)
    check_not_sharded(model)
    _check_patterns(model, cfg)
    report = ConversionReport(cfg)

    resolved: dict[tuple[int, ...], FewBitConfig] = {}

    def settings(path: str) -> FewBitConfig:
        hits = tuple(i for i, ov in enumerate(cfg.overrides) if _matches(path, ov.patterns))
        if hits not in resolved:
            try:
                resolved[hits] = cfg.layer_config([cfg.overrides[i] for i in hits])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"module {path!r}: {exc}") from None
        return resolved[hits]

    def swap(module: nn.Module, path: str) -> nn.Module:
        if cfg.include and not _matches(path, cfg.include):
            return module
        if cfg.exclude and _matches(path, cfg.exclude):
            return module
        layer = settings(path)
        if layer.compress_dropout and "Attention" in type(module).__name__ and hasattr(module, "config"):
            # a Hugging Face attention module reads only its dropout's p; the attention function drops
            module.__dict__["fewbit_compress_dropout"] = True
            report.attention_modules += 1
        new = module
        if layer.activation_bits is not None:
            new = convert_activation(module, layer.activation_bits, layer.convert_transformers)
        if new is module and layer.low_bit_linear:
            new = convert_linear(module, LowBitLinear, **layer.lowbit_kwargs())
        if new is module and layer.randomized_linear:
            new = convert_linear(module, RandomizedLinear, **layer.linear_kwargs())
        if new is module and layer.compress_dropout and type(module) is nn.Dropout:
            new = Dropout(module.p, module.inplace)
        if new is not module:
            new.train(module.training)
            report.swapped.append((path, type(module).__name__, repr(new)))
        return new

    out = map_module(model, swap)
    if report.attention_modules:
        previous = use_fewbit_attention(out)
        report.attention = (f"{previous} -> fewbit 1-bit dropout masks off CUDA" if previous else
                            f"left as {getattr(getattr(out, 'config', None), '_attn_implementation', None)!r}: "
                            "attention-probability dropout keeps torch's masks")
    out.__dict__["_fewbit_report"] = report
    log.info("%s", report)
    return out


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report of the last `convert` applied to `model`."""
    try:
        return model.__dict__["_fewbit_report"]
    except KeyError:
        raise ValueError("this model was not converted by fewbit_dist.convert") from None
