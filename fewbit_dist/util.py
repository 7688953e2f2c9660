"""Module-tree surgery: `map_module` and `convert_linear` (the FewBit API, kept compatible)."""

from __future__ import annotations

import inspect
import re
from typing import Callable, Optional

from torch import nn

__all__ = ["map_module", "convert_linear"]


def map_module(root: nn.Module, fn: Callable[[nn.Module, str], nn.Module], pattern: Optional[str] = None) -> nn.Module:
    """Rebuild the tree under `root` in place, children first.

    `fn(module, path)` is called for every module whose dotted path (``""`` for the root,
    ``"encoder.layer.0.output"``, ...) matches the regular expression `pattern` by `re.match` (None: all),
    and what it returns is installed in the module's place. A module reachable at several paths is replaced
    once and stays shared. Returns the (possibly replaced) root.
    """
    if not isinstance(root, nn.Module):
        raise TypeError(f"root must be an nn.Module, got {type(root).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(module, path), got {type(fn).__name__}")
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except (re.error, TypeError) as exc:
        raise ValueError(f"pattern must be a valid regular expression, got {pattern!r}: {exc}") from None
    return _visit(root, "", fn, regex, {})


def _visit(module: nn.Module, path: str, fn, regex, memo: dict) -> nn.Module:
    # A plain function, not a closure over itself: a self-referencing closure holding `memo` would keep
    # every visited module alive until the cyclic garbage collector runs.
    if id(module) in memo:
        return memo[id(module)]
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _visit(child, f"{path}.{name}" if path else name, fn, regex, memo)
        if new is not child:
            module._modules[name] = new
    out = module
    if regex is None or regex.match(path):
        out = fn(module, path)
        if not isinstance(out, nn.Module):
            raise TypeError(f"fn must return an nn.Module (the module itself to keep it); "
                            f"got {type(out).__name__} for path {path!r}")
    memo[id(module)] = out
    return out


def convert_linear(module: nn.Module, ctor: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """An `nn.Linear` (exactly that class) becomes `ctor(in_features, out_features, bias=..., **kwargs)`
    sharing the same weight and bias Parameters; any other module comes back unchanged.

    Subclasses of nn.Linear are left alone on purpose: some owners read their weight directly
    (nn.MultiheadAttention's out_proj), so swapping their forward would change nothing or break them.
    """
    if type(module) is not nn.Linear:
        return module
    if not callable(ctor):
        raise TypeError(f"ctor must be a module class or factory, got {type(ctor).__name__}")
    args = dict(bias=module.bias is not None, **kwargs)
    params = inspect.signature(ctor).parameters
    if "device" in params:  # build on meta: no second copy of the weights, even briefly
        args.setdefault("device", "meta")
    if "dtype" in params:
        args.setdefault("dtype", module.weight.dtype)
    new = ctor(module.in_features, module.out_features, **args)
    new.weight = module.weight
    if module.bias is not None:
        new.bias = module.bias
    new.train(module.training)
    return new
