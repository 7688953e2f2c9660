"""How launch/train.py trains: one class per strategy (single process, DDP, DeepSpeed ZeRO 0-3, FSDP2), each
with its setup (convert, then wrap or shard: the order fewbit_dist needs), its training step, an evaluation
forward, and its checkpoints.

Mixed precision (`precision`: "fp32", "bf16" or "fp16"): torch.autocast around the forward for a single
process and DDP (fp16 with a GradScaler); DeepSpeed's own "bf16"/"fp16" sections (`deepspeed_config` writes
them); FSDP2's MixedPrecisionPolicy (bf16 parameters for compute, fp32 gradient reduction; FSDP2 has no
fp16 loss scaling here: use bf16). Master weights and optimizer states stay fp32 everywhere.

Checkpoints (`save`): the framework's own (DeepSpeed save_checkpoint; FSDP2 torch.distributed.checkpoint;
torch.save otherwise), which `load` resumes from, plus DIR/hf: `export(state_dict, DIR/hf)` runs on rank 0
with the consolidated model state dict (train.py writes an unconverted Hugging Face model there).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

import fewbit_dist
from fewbit_dist.integrations import checkpointing as ckpt

__all__ = ["Strategy", "Single", "DDP", "DeepSpeed", "FSDP2", "make_strategy", "deepspeed_config", "PRECISIONS",
           "OPTIMIZERS"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(params, training: dict) -> torch.optim.Optimizer:
    return OPTIMIZERS[training["optimizer"]](params, lr=training["lr"], weight_decay=training["weight_decay"])


def make_optimizer_in_backward(params, training: dict, strategy: str, precision: str):
    """training.optimizer stepped inside backward (fewbit_dist.optim.OptimizerInBackward), after refusing what
    that loop cannot do."""
    if strategy != "single":
        raise ValueError(f"training.optimizer_in_backward trains one process; the {strategy} strategy must reduce "
                         "gradients across ranks before each step")
    if training["max_grad_norm"]:
        raise ValueError("training.optimizer_in_backward cannot clip gradients by their global norm (no moment holds "
                         f"them all): set training.max_grad_norm to 0 (--max-grad-norm 0), got "
                         f"{training['max_grad_norm']}")
    if precision == "fp16":
        raise ValueError("training.optimizer_in_backward with fp16: loss scaling must see every gradient before the "
                         "step; use bf16 (--bf16) or fp32")
    return fewbit_dist.optim.OptimizerInBackward(params, OPTIMIZERS[training["optimizer"]], lr=training["lr"],
                                                 weight_decay=training["weight_decay"])


def deepspeed_config(ds: dict, micro_batch: int, world_size: int, precision: str = "fp32",
                     max_grad_norm: float = 0.0, source="--deepspeed_config") -> dict:
    """A DeepSpeed config completed by the run: the batch sizes (a file that says otherwise is refused), the
    precision section and gradient clipping (when the file leaves them unset)."""
    ds = dict(ds)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    implied = {"train_micro_batch_size_per_gpu": micro_batch, "train_batch_size": micro_batch * gas * world_size}
    for key, value in implied.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{source}: {key} is {ds[key]} but the run config implies {value}; "
                             "remove it from the file")
        ds[key] = value
    for name in ("bf16", "fp16"):
        enabled = bool(ds.get(name, {}).get("enabled", False))
        if enabled and precision != name:
            raise ValueError(f"{source} enables {name} but the run's precision is {precision}: pass --{name} or "
                             "remove the section")
        if precision == name:
            ds[name] = {**ds.get(name, {}), "enabled": True}
    if max_grad_norm and not ds.get("gradient_clipping"):
        ds["gradient_clipping"] = max_grad_norm
    return ds


class Strategy:
    """Set up in the constructor: convert `model` with `fewbit` (a FewBitConfig), wrap it, build the optimizer.
    `model` is on its device already (DeepSpeed places it itself). `training` is train.py's training section
    (optimizer, lr, weight_decay, checkpointing, max_grad_norm)."""

    name = ""

    def __init__(self, model: nn.Module, fewbit, training: dict, info, device: torch.device,
                 precision: str = "fp32", export: Optional[Callable] = None, ds_config: Optional[dict] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.training, self.info, self.device, self.precision = training, info, device, precision
        self.dtype = PRECISIONS[precision]
        self.export = export
        self.model = self.setup(model, fewbit, ds_config)

    # -- what each strategy defines --------------------------------------------------------------------

    def setup(self, model, fewbit, ds_config) -> nn.Module:
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        """The training forward: the loss of this rank's batch."""
        raise NotImplementedError

    def step(self, loss: torch.Tensor) -> None:
        """Backward, gradient clipping, optimizer step, zeroed gradients."""
        raise NotImplementedError

    def save_state(self, path: Path) -> None:
        raise NotImplementedError

    def load_state(self, path: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> Optional[dict]:
        """The consolidated model state dict on rank 0 (None elsewhere)."""
        return self.model.state_dict() if self.info.rank == 0 else None

    # -- shared ------------------------------------------------------------------------------------------

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, batch: dict) -> torch.Tensor:
        loss = self.forward(batch)
        self.step(loss)
        return loss

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The loss of one held-out batch (the caller switches to eval mode)."""
        return self.forward(batch)

    def save(self, path: Path, step: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.save_state(path)
        if self.info.rank == 0:
            (path / "step.json").write_text(json.dumps({"step": step}))
        dist.barrier()
        sd = self.full_state_dict()
        if self.info.rank == 0 and self.export is not None:
            self.export(sd, path / "hf")
        dist.barrier()

    def load(self, path: Path) -> int:
        """Resume from a checkpoint written by `save`; returns the step it was written at."""
        self.load_state(path)
        return int(json.loads((path / "step.json").read_text())["step"])

    def _checkpointing(self, model, fewbit=None) -> None:
        method = self.training["checkpointing"]
        if method != "none":
            bits = fewbit_dist.FewBitConfig.load(fewbit).checkpoint_boundary_bits if fewbit is not None else None
            ckpt.enable(model, method, boundary_bits=bits)


class Single(Strategy):
    """One process: convert, autocast, a GradScaler for fp16."""

    name = "single"

    def setup(self, model, fewbit, ds_config):
        model = fewbit_dist.convert(model, fewbit)
        self._checkpointing(model, fewbit)
        self.in_backward = bool(self.training.get("optimizer_in_backward"))
        self.optimizer = (make_optimizer_in_backward(model.parameters(), self.training, self.name, self.precision)
                          if self.in_backward else make_optimizer(model.parameters(), self.training))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.wrapped = model
        return model

    def forward(self, batch):
        with self.autocast():
            return self.wrapped(**batch).loss

    def step(self, loss):
        if self.in_backward:  # every parameter steps inside backward
            loss.backward()
            return
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.training["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training["max_grad_norm"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, path):
        if self.info.rank == 0:
            torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, path / "state.pt")

    def load_state(self, path):
        state = torch.load(path / "state.pt", map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])


class DDP(Single):
    """DistributedDataParallel around the converted model: gradients all-reduced in backward."""

    name = "ddp"

    def setup(self, model, fewbit, ds_config):
        model = super().setup(model, fewbit, ds_config)
        on_cuda = next(model.parameters()).is_cuda
        self.wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.info.local_rank] if on_cuda else None)
        return model


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO (stage from the config): fewbit_dist.integrations.deepspeed.initialize converts, then
    initializes. The config's own optimizer is used when it has one."""

    def setup(self, model, fewbit, ds_config):
        if ds_config is None:
            raise ValueError("the DeepSpeed strategy needs a DeepSpeed config")
        self.name = f"zero{ds_config.get('zero_optimization', {}).get('stage', 0)}"
        self._checkpointing(model, fewbit)
        optimizer = None if "optimizer" in ds_config else make_optimizer(model.parameters(), self.training)
        self.engine, self.optimizer, _, _ = fewbit_dist.integrations.deepspeed.initialize(
            model, fewbit, optimizer=optimizer, config=ds_config, model_parameters=model.parameters())
        return self.engine.module

    def forward(self, batch):
        return self.engine(**batch).loss

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()

    def train(self, mode=True):
        self.engine.train(mode)

    def save_state(self, path):
        self.engine.save_checkpoint(str(path), client_state={})

    def load_state(self, path):
        _, client = self.engine.load_checkpoint(str(path))
        if client is None:
            raise SystemExit(f"--resume {path}: no DeepSpeed checkpoint there")

    def full_state_dict(self):
        if not self.engine.zero_optimization_partition_weights():
            return super().full_state_dict()
        import deepspeed  # ZeRO-3: gather the partitions

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            if self.info.rank == 0:
                return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return None


class FSDP2(Strategy):
    """FSDP2 (`fully_shard` per transformer block, then the root) through fewbit_dist.integrations.fsdp.shard,
    with non-reentrant checkpointing per block when asked."""

    name = "fsdp2"

    def setup(self, model, fewbit, ds_config):
        from fewbit_dist.integrations.fsdp import shard

        method = self.training["checkpointing"]
        if method not in ("none", "non_reentrant"):
            raise ValueError("FSDP2 checkpoints blocks non-reentrantly: checkpointing must be 'none' or "
                             f"'non_reentrant', got {method!r}")
        if self.precision == "fp16":
            raise ValueError("precision fp16 with FSDP2: no loss scaling on this path; use bf16")
        model = shard(model, fewbit, checkpointing=method == "non_reentrant", param_dtype=self.dtype,
                      reduce_dtype=torch.float32 if self.dtype is not None else None)
        self.optimizer = make_optimizer(model.parameters(), self.training)
        return model

    def forward(self, batch):
        return self.model(**batch).loss  # the MixedPrecisionPolicy casts parameters and inputs

    def step(self, loss):
        loss.backward()
        if self.training["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.training["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))

    def load_state(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.info.rank == 0 else None


def make_strategy(name: str, model, fewbit, training, info, device, precision="fp32", export=None,
                  ds_config=None) -> Strategy:
    """`name`: "single", "ddp", "deepspeed" or "fsdp2"."""
    classes = {"single": Single, "ddp": DDP, "deepspeed": DeepSpeed, "fsdp2": FSDP2}
    if name not in classes:
        raise ValueError(f"strategy must be one of {tuple(classes)}, got {name!r}")
    return classes[name](model, fewbit, training, info, device, precision=precision, export=export,
                         ds_config=ds_config)
