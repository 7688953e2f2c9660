"""Module-tree surgery: `map_module` and `convert_linear` (the FewBit API, kept compatible), and `carry_over`,
which makes a replacement module keep what users attached to the module it replaces."""

from __future__ import annotations

import inspect
import itertools
import re
import types
import warnings
from typing import Callable, Optional

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["map_module", "convert_linear", "carry_over"]


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
    A Linear parametrized with torch.nn.utils.parametrize is converted and keeps its parametrizations; one whose
    weight is recomputed by a hook into a plain attribute (the deprecated torch.nn.utils.weight_norm, pruning)
    is left alone: there is no Parameter to share. Hooks, accelerate hooks and attributes are carried over
    (`carry_over`).
    """
    if parametrize.type_before_parametrizations(module) is not nn.Linear:
        return module
    if not callable(ctor):
        raise TypeError(f"ctor must be a module class or factory, got {type(ctor).__name__}")
    shared = [name for name in ("weight", "bias") if not parametrize.is_parametrized(module, name)]
    if "weight" in shared and not isinstance(module.weight, nn.Parameter):
        return module
    args = dict(bias=module.bias is not None, **kwargs)
    params = inspect.signature(ctor).parameters
    if "device" in params:  # build on meta: no second copy of the weights, even briefly
        args.setdefault("device", "meta")
    if "dtype" in params:
        args.setdefault("dtype", module.weight.dtype)
    new = ctor(module.in_features, module.out_features, **args)
    for name in shared:  # parametrized tensors come with their parametrization (carry_over)
        if getattr(module, name) is not None:
            setattr(new, name, getattr(module, name))
    return carry_over(module, new)


# The hook tables of nn.Module (torch/nn/modules/module.py). RemovableHandle removes a hook by id from the dict
# it was registered in, so the replacement shares these dicts: a handle taken on the old module still works.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# Instance attributes carry_over handles itself (accelerate's hook, the shared parametrizations).
_NOT_COPIED = {"_hf_hook", "_old_forward", "parametrizations"}


def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Make `new`, the replacement of `old`, keep what users attached to `old`; returns `new`.

    - forward, forward pre-, backward and backward pre-hooks, with their flags (kwargs, always_call, full
      backward hook), and the state-dict hooks: `new` shares `old`'s hook tables, so the hooks fire on `new`
      (they receive `new` as their module) and the handles returned when they were registered still remove them;
      hooks `new` registered itself run after the user's;
    - accelerate's hook (`_hf_hook`: device maps, offloading), attached again with `add_hook_to_module`;
    - torch.nn.utils.parametrize parametrizations: `new` shares `old`'s (so their original Parameters and
      state_dict keys), replacing whatever `new` holds under the parametrized names;
    - the training mode (modules that `new` shares with `old` keep their own), and the device of `old`'s
      tensors for those of `new` that are not shared (Parameters shared with `old` keep their device, dtype and
      requires_grad, being the same objects);
    - instance attributes set on `old` (`old.__dict__`) that `new` lacks; methods bound to `old` are bound to
      `new`.

    A forward that was replaced on the `old` instance by anything else than accelerate cannot be carried (it
    would run `old`'s computation): that gives a warning. Calling it again is harmless. `old` is meant to be
    discarded: it keeps sharing its hook tables with `new`.
    """
    if not isinstance(old, nn.Module) or not isinstance(new, nn.Module):
        raise TypeError(f"old and new must be nn.Modules, got {type(old).__name__} and {type(new).__name__}")
    if new is old:
        return new
    if any(m is old for m in new.modules()):
        raise ValueError("new contains old: carry_over is for a replacement, not for a wrapper of the module")
    _carry_parametrizations(old, new)
    _carry_hooks(old, new)
    _carry_training(old, new)
    _carry_device(old, new)
    _carry_attributes(old, new)
    _carry_accelerate_hook(old, new)  # last: it wraps new.forward and may move new's tensors
    return new


def _carry_parametrizations(old: nn.Module, new: nn.Module) -> None:
    if not parametrize.is_parametrized(old):
        return
    if parametrize.is_parametrized(new):
        if new.parametrizations is old.parametrizations:
            return  # carried already
        raise ValueError(f"old and new are both parametrized ({type(old).__name__}, {type(new).__name__}); "
                         "carry_over can only give old's parametrizations to an unparametrized replacement")
    names = list(old.parametrizations.keys())
    for name in names:
        if name in new._parameters or name in new._buffers:
            delattr(new, name)  # new's own tensor gives way to the parametrized one
        elif hasattr(new, name):
            raise ValueError(f"{type(new).__name__} has an attribute {name!r} that is not a parameter or buffer; "
                             f"it cannot take the parametrization of {type(old).__name__}.{name}")
    # What register_parametrization does to a module, sharing old's ParametrizationLists instead of new ones.
    parametrize._inject_new_class(new)
    new.parametrizations = old.parametrizations
    for name in names:
        parametrize._inject_property(new, name)


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    from torch.nn.modules.module import _WrappedHook

    if (old._backward_hooks and new._backward_hooks and old._backward_hooks is not new._backward_hooks
            and old._is_full_backward_hook != new._is_full_backward_hook):
        raise ValueError("old and new both have backward hooks, one of them full (register_full_backward_hook) and "
                         "the other not: torch cannot mix the two on one module")
    for name in _HOOK_DICTS:
        theirs, mine = old.__dict__.get(name), new.__dict__.get(name)
        if not theirs or theirs is mine:
            continue
        if mine:
            theirs.update(mine)
        object.__setattr__(new, name, theirs)
    if old._backward_hooks:
        object.__setattr__(new, "_is_full_backward_hook", old._is_full_backward_hook)
    # load_state_dict pre-hooks registered through the public API get their module from a weak reference.
    hooks = new._load_state_dict_pre_hooks
    for key, hook in list(hooks.items()):
        if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is old:
            hooks[key] = _WrappedHook(hook.hook, new)


def _carry_training(old: nn.Module, new: nn.Module) -> None:
    own = {id(m): m.training for m in old.modules()}
    new.train(old.training)
    for m in new.modules():  # what new shares with old (a parametrization, a wrapped child) keeps its mode
        if m is not new and id(m) in own:
            m.training = own[id(m)]


def _carry_device(old: nn.Module, new: nn.Module) -> None:
    theirs = list(itertools.chain(old.parameters(), old.buffers()))
    devices = {t.device for t in theirs}
    if len(devices) != 1:
        return  # no tensors (an activation), or spread over devices: nothing says where new's belong
    (device,) = devices
    shared = {id(t) for t in theirs}
    if any(id(t) not in shared and t.device != device for t in itertools.chain(new.parameters(), new.buffers())):
        new.to(device)


def _carry_attributes(old: nn.Module, new: nn.Module) -> None:
    if "forward" in old.__dict__ and "_hf_hook" not in old.__dict__:
        warnings.warn(f"{type(old).__name__}.forward was replaced on the instance ({old.__dict__['forward']!r}); "
                      f"its replacement {type(new).__name__} keeps its own forward", RuntimeWarning, stacklevel=3)
    for name, value in old.__dict__.items():
        if name in _NOT_COPIED or hasattr(new, name):
            continue
        if isinstance(value, types.MethodType) and value.__self__ is old:
            value = types.MethodType(value.__func__, new)
        new.__dict__[name] = value


def _carry_accelerate_hook(old: nn.Module, new: nn.Module) -> None:
    hook = old.__dict__.get("_hf_hook")
    if hook is None or new.__dict__.get("_hf_hook") is hook:
        return
    from accelerate.hooks import add_hook_to_module  # a module with an accelerate hook: accelerate is there

    # accelerate's own wrapper of new.forward, without the hook's init_hook: that ran when the hook was attached
    # to old, for the tensors new shares, and running it again would lose what it recorded (an offloading
    # AlignDevicesHook would note their devices as "meta" and not restore them when detached).
    shadowed = hook.__dict__.pop("init_hook", None)
    hook.init_hook = _unchanged
    try:
        add_hook_to_module(new, hook)
    finally:
        del hook.init_hook
        if shadowed is not None:
            hook.init_hook = shadowed


def _unchanged(module: nn.Module) -> nn.Module:
    return module
