"""The optimizer step inside backward: each parameter is updated, and its gradient freed, as soon as backward
has accumulated it.

    opt = fewbit_dist.optim.OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-4)
    for batch in data:
        model(**batch).loss.backward()     # every parameter steps here, and no .grad is left behind

Why: a plain loop holds every parameter's gradient from the moment backward forms it until `optimizer.step()`.
Late in backward that is almost all of them (4 bytes per parameter in fp32), and under activation
checkpointing, where compression has shrunk what the blocks save, those gradients are most of the step's peak
(results/peak/FINDINGS.md). Here a gradient lives only from its accumulation until its parameter's update.
The technique is PyTorch's "optimizer step in backward" (a post-accumulate-grad hook per parameter, one
optimizer per parameter); it changes the training loop, not what is saved, so it helps an unconverted model too.

The update is the optimizer's own: one instance of `optimizer_class` per parameter, so an elementwise optimizer
(SGD, Adam, AdamW, ...) updates each parameter exactly as one instance over all of them would. What a loop can
no longer do, because no moment holds all the gradients:
- clip gradients by their global norm (`clip_grad_norm_` would find none);
- accumulate gradients over micro-batches: every backward steps;
- reduce gradients across data-parallel ranks before stepping: parameters that DDP, FSDP or DeepSpeed manage
  (DTensors, ZeRO's partitions) are refused. Use it in a single process (or per rank with no data parallelism).
Learning-rate schedules: set `group["lr"]` in `param_groups` (every per-parameter optimizer's groups, in
order), e.g. with `set_lr`. `state_dict` / `load_state_dict` round-trip all per-parameter states.
"""

from __future__ import annotations

from typing import Any, Iterable, Union

import torch

__all__ = ["OptimizerInBackward"]


class OptimizerInBackward:
    """Steps `optimizer_class(group, **defaults)` for each trainable parameter of `params` in backward, then
    frees its gradient (module docstring). `params`: tensors, or parameter-group dicts as torch optimizers take
    them (a group's options override `defaults`)."""

    def __init__(self, params: Iterable[Union[torch.Tensor, dict]], optimizer_class: type, **defaults: Any):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        groups = list(params)
        if not groups:
            raise ValueError("params is empty: nothing to optimize")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._optimizers: list[torch.optim.Optimizer] = []
        self._by_param: dict[int, torch.optim.Optimizer] = {}  # by id(parameter)
        self._handles = []
        for i, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"params[{i}] must be a tensor or a dict with 'params', got {type(group).__name__}")
            options = {k: v for k, v in group.items() if k != "params"}
            tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
            for p in tensors:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"params must hold tensors, got {type(p).__name__}")
                if id(p) in self._by_param:
                    raise ValueError("a parameter appears twice in params")
                if type(p).__name__ == "DTensor" or hasattr(p, "ds_id"):
                    raise ValueError("params holds a parameter sharded by FSDP or DeepSpeed: its gradient must be "
                                     "reduced across ranks before the step, which a step in backward cannot wait "
                                     "for; use the wrapper's optimizer")
                if not p.requires_grad:
                    continue
                opt = optimizer_class([{"params": [p], **options}], **defaults)
                self._optimizers.append(opt)
                self._by_param[id(p)] = opt
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_one))
        if not self._optimizers:
            raise ValueError("params holds no parameter that requires grad")

    def _step_one(self, p: torch.Tensor) -> None:
        opt = self._by_param[id(p)]
        opt.step()
        opt.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        """Every per-parameter optimizer's groups, in the order of `params`: set `lr` here for a schedule."""
        return [g for opt in self._optimizers for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do (each gradient is freed when its parameter steps); kept so plain loops run unchanged."""

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self._optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self._optimizers):
            n = len(saved) if isinstance(saved, list) else "no"
            raise ValueError(f"state holds {n} per-parameter optimizer states; this OptimizerInBackward has "
                             f"{len(self._optimizers)} (built over other parameters?)")
        for opt, s in zip(self._optimizers, saved):
            opt.load_state_dict(s)

    def remove(self) -> None:
        """Remove the hooks: backward then leaves gradients in .grad again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
