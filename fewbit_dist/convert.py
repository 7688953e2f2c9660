"""`convert(model, config=None, **overrides)`: one call that makes a whole model few-bit, in place.

It walks the model children first and runs the handlers of `fewbit_dist.models` (one per kind of module:
gated MLPs, activations, linear layers, dropout, RMSNorms, the causal-LM loss) that the config enables for
each module's path; per-pattern `overrides` choose per module, and a preset name selects a shipped config.
Replaced modules keep their Parameters and what users attached to them (`util.carry_over`); structural
handlers change a module's forward on the instance. Parameters, buffers and state_dict keys are untouched,
so checkpoints load both ways and tied weights stay tied. Run it before ZeRO/FSDP wrap or shard the model.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from . import util
from .config import ConfigLike, FewBitConfig
from .models.sharding import check_not_sharded
from .models import convert_activation, handlers
from .models.hf import use_fewbit_attention
from .util import map_module

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


def _matches(path: str, patterns) -> bool:
    # A pattern selects the module at a matching path and everything below it.
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def _check_patterns(model: nn.Module, cfg: FewBitConfig, user: dict) -> None:
    """Every pattern must match a module path, unless the config says otherwise (a preset: its patterns for
    modules this model lacks are skipped). Patterns the user passes as keyword overrides are always checked."""
    paths = [p for p, _ in model.named_modules() if p]
    checks = []
    for kind in ("include", "exclude"):
        if cfg.require_matches or kind in user:
            checks += [(kind, p) for p in getattr(cfg, kind)]
    if cfg.require_matches or "overrides" in user:
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
    _check_patterns(model, cfg, overrides)
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

    def allowed(path: str) -> bool:
        if cfg.include and not _matches(path, cfg.include):
            return False
        return not (cfg.exclude and _matches(path, cfg.exclude))

    # Children that a handler takes over at their parent (a gated MLP computes its act_fn itself).
    claimed: dict[str, str] = {}
    for path, module in model.named_modules():
        if not allowed(path):
            continue
        try:
            layer = settings(path)
        except ValueError:  # raised again, children first, by the swap below
            continue
        for h in handlers():
            if h.enabled(layer):
                for child in h.claims(module, layer):
                    claimed[f"{path}.{child}" if path else child] = h.name

    def swap(module: nn.Module, path: str) -> nn.Module:
        if not allowed(path):
            return module
        layer = settings(path)
        if layer.compress_dropout and "Attention" in type(module).__name__ and hasattr(module, "config"):
            # a Hugging Face attention module reads only its dropout's p; the attention function drops
            module.__dict__["fewbit_compress_dropout"] = True
            report.attention_modules += 1
        if path in claimed:
            return module
        for h in handlers():
            if not h.enabled(layer):
                continue
            new = h.swap(module, path, layer)
            if new is None:
                continue
            if new is not module:
                util.carry_over(module, new)  # hooks, attributes, training mode
            report.swapped.append((path, type(module).__name__, h.name if new is module else repr(new)))
            return new
        return module

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
