"""The main job: fine-tune a Hugging Face RoBERTa sentence-pair classifier with fewbit_dist, on one process or
many, under DeepSpeed ZeRO, FSDP2, DDP or nothing.

    python launch/train.py                                   # configs/roberta-tiny.json, one process
    deepspeed --num_gpus 2 launch/train.py --fewbit-config configs/roberta-tiny.json \\
        --deepspeed_config configs/ds/zero3.json --max-steps 4 --metrics-out m.json
    torchrun --nproc_per_node 2 launch/train.py --fewbit-config configs/roberta-tiny.json --fsdp
    mpirun -np 2 python launch/train.py --fewbit-config configs/roberta-tiny.json --deepspeed_config configs/ds/zero2.json

The run config (--fewbit-config) holds four sections: "fewbit" (fewbit_dist.FewBitConfig), "model" (a
transformers.RobertaConfig), "data" and "training". The model is converted before it is sharded. On CPU the
backend is gloo (set DS_ACCELERATOR=cpu for DeepSpeed), on CUDA nccl.

Data: the embedded, deterministic sentence-pair task of launch/data.py; every strategy sees the same global
batch at a given step (rank r takes its slice), so runs compare across strategies and world sizes.

Metrics (--metrics-out): world_size, strategy, launcher, checkpointing, the fewbit config, steps, the global
loss per step, tokens per second, and per rank the peak memory (CUDA max_memory_allocated; CPU peak RSS of
the process) and the saved-activation bytes of the last step (fewbit_dist.memory; under non-reentrant
checkpointing it sees what the checkpoints save, not the inputs they hold).

Checkpoints: --save DIR writes the framework's own checkpoint (DeepSpeed save_checkpoint; FSDP2
torch.distributed.checkpoint; torch.save otherwise) plus DIR/hf, a consolidated Hugging Face model that an
unconverted RobertaForSequenceClassification loads with from_pretrained. --resume DIR continues from one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fewbit_dist  # noqa: E402
from data import SentencePairTask  # noqa: E402
from fewbit_dist.integrations import checkpointing as ckpt  # noqa: E402
from fewbit_dist.integrations.deepspeed import add_fewbit_arguments  # noqa: E402
from fewbit_dist.integrations.distributed import init_distributed  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter, peak_memory_bytes, reset_peak_memory  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "roberta-tiny.json"
TRAINING_KEYS = {"batch_size": 8, "seq_len": 64, "lr": 1e-3, "steps": 20, "seed": 0, "checkpointing": "none",
                 "weight_decay": 0.0, "optimizer": "adamw"}
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
DATA_KEYS = {"task": "embedded", "topics": 3, "focus": 0.9, "examples": None}
SECTIONS = ("description", "fewbit", "model", "data", "training")
CHECKPOINTING = ("none",) + ckpt.METHODS


# ------------------------------------------------------------------------------------------ config

def read_json(path, option: str):
    """The JSON object in `path`, or a clear exit naming the command-line option it came from."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{option}: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{option} {path}: not valid JSON: {exc}") from None


def load_run_config(path) -> dict:
    raw = read_json(path, "--fewbit-config")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"{path}: unknown section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
    if "model" not in raw:
        raise SystemExit(f"{path}: a run config needs a \"model\" section (a transformers RobertaConfig)")
    cfg = {"fewbit": fewbit_dist.FewBitConfig.load(raw.get("fewbit", {}))}
    for name, defaults in (("training", TRAINING_KEYS), ("data", DATA_KEYS)):
        section = raw.get(name, {})
        bad = sorted(set(section) - set(defaults))
        if bad:
            raise SystemExit(f"{path}: unknown {name} key(s) {bad}; valid keys: {', '.join(defaults)}")
        cfg[name] = {**defaults, **section}
    if cfg["training"]["checkpointing"] not in CHECKPOINTING:
        raise SystemExit(f"{path}: training.checkpointing must be one of {CHECKPOINTING}")
    if cfg["training"]["optimizer"] not in OPTIMIZERS:
        raise SystemExit(f"{path}: training.optimizer must be one of {tuple(OPTIMIZERS)}")
    if cfg["data"]["task"] != "embedded":
        raise SystemExit(f"{path}: data.task must be \"embedded\" (the only task shipped; see launch/data.py)")
    cfg["model"] = raw["model"]
    return cfg


def fewbit_override(value: str) -> "fewbit_dist.FewBitConfig":
    """--fewbit: an inline JSON object or a JSON file (a preset's "fewbit" section is used when present)."""
    try:
        if value.lstrip().startswith("{"):
            try:
                return fewbit_dist.FewBitConfig.load(json.loads(value))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"--fewbit: not valid JSON: {exc}") from None
        if not Path(value).is_file():
            raise SystemExit(f"--fewbit: no such file: {value}")
        return fewbit_dist.FewBitConfig.load(value)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--fewbit {value}: {exc}") from None


def load_ds_config(path, micro_batch: int, world_size: int) -> dict:
    ds = read_json(path, "--deepspeed_config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise SystemExit(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    # The run config owns the batch: fill it in, and refuse a config that says otherwise.
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("train_batch_size", micro_batch * gas * world_size)):
        if key in ds and ds[key] != value:
            raise SystemExit(f"{path}: {key} is {ds[key]} but the run config implies {value}; remove it from the file")
        ds[key] = value
    return ds


# ------------------------------------------------------------------------------------------ model

_HF_DS_CONFIG = None  # transformers reads the live ZeRO-3 config through a weak reference: keep it alive


def build_model(cfg, args, ds_config=None):
    global _HF_DS_CONFIG
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(cfg["training"]["seed"])
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3: transformers builds the model under deepspeed.zero.Init (partitioned parameters, gathered
        # module by module for initialization), as large models are built; convert() comes after.
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    model_cls = transformers.RobertaForSequenceClassification
    if args.model:
        return model_cls.from_pretrained(args.model, local_files_only=True)
    return model_cls._from_config(transformers.RobertaConfig(**cfg["model"]))


def vanilla_model(model_cfg: dict):
    import transformers

    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**model_cfg))


# ------------------------------------------------------------------------------------- strategies

def make_optimizer(model, tcfg):
    return OPTIMIZERS[tcfg["optimizer"]](model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])


class Runner:
    """What differs between strategies: wrapping, one optimizer step, saving and loading."""

    def __init__(self, strategy, model, cfg, args, info, ds_config=None):
        self.strategy, self.cfg, self.args, self.info = strategy, cfg, args, info
        tcfg = cfg["training"]
        method = tcfg["checkpointing"]
        if strategy.startswith("zero"):
            if method != "none":
                ckpt.enable(model, method)
            optimizer = None if "optimizer" in ds_config else make_optimizer(model, tcfg)
            self.engine, self.optimizer, _, _ = fewbit_dist.integrations.deepspeed.initialize(
                model, cfg["fewbit"], optimizer=optimizer, config=ds_config, model_parameters=model.parameters())
            self.model = self.engine.module
        elif strategy == "fsdp2":
            from fewbit_dist.integrations.fsdp import shard

            if method not in ("none", "non_reentrant"):
                raise SystemExit("--fsdp checkpoints blocks non-reentrantly: training.checkpointing must be "
                                 "'none' or 'non_reentrant'")
            self.model = shard(model, cfg["fewbit"], checkpointing=method == "non_reentrant")
            self.optimizer = make_optimizer(self.model, tcfg)
        else:
            model = fewbit_dist.convert(model, cfg["fewbit"])
            if method != "none":
                ckpt.enable(model, method)
            self.model = model
            self.optimizer = make_optimizer(model, tcfg)
            if strategy == "ddp":
                on_cuda = next(model.parameters()).is_cuda
                self.wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[info.local_rank] if on_cuda else None)
        self.step_index = 0

    def forward(self, batch):
        if self.strategy.startswith("zero"):
            return self.engine(**batch).loss
        return getattr(self, "wrapped", self.model)(**batch).loss

    def backward_and_step(self, loss) -> None:
        if self.strategy.startswith("zero"):
            self.engine.backward(loss)
            self.engine.step()
            return
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: Path, step: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.strategy.startswith("zero"):
            self.engine.save_checkpoint(str(path), client_state={"step": step})
        elif self.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
        elif self.info.rank == 0:
            torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, path / "state.pt")
        if self.info.rank == 0:
            (path / "step.json").write_text(json.dumps({"step": step}))
        dist.barrier()
        self.export_hf(path / "hf")

    def full_state_dict(self):
        """The consolidated model state dict on rank 0 (None elsewhere)."""
        if self.strategy.startswith("zero"):
            if self.engine.zero_optimization_partition_weights():  # ZeRO-3: gather the partitions
                import deepspeed

                params = list(self.model.parameters())
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if self.info.rank == 0 else None
                return sd
            return self.model.state_dict() if self.info.rank == 0 else None
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return sd if self.info.rank == 0 else None
        return self.model.state_dict() if self.info.rank == 0 else None

    def export_hf(self, path: Path) -> None:
        sd = self.full_state_dict()
        if self.info.rank == 0:
            vanilla = vanilla_model(self.cfg["model"])
            vanilla.load_state_dict(sd, strict=True)  # an unconverted model takes the converted one's weights
            vanilla.save_pretrained(str(path))
        dist.barrier()

    def load(self, path: Path) -> int:
        if self.strategy.startswith("zero"):
            _, client = self.engine.load_checkpoint(str(path))
            if client is None:
                raise SystemExit(f"--resume {path}: no DeepSpeed checkpoint there")
            return int(client["step"])
        if self.strategy == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = torch.load(path / "state.pt", map_location="cpu")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optim"])
        return int(json.loads((path / "step.json").read_text())["step"])


# ------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fewbit_arguments(ap)
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                    help="DeepSpeed JSON config: train with DeepSpeed (ZeRO stage from the file)")
    ap.add_argument("--fsdp", action="store_true", help="train with FSDP2 (fully_shard per transformer block)")
    ap.add_argument("--fewbit", default=None, metavar="PATH|JSON",
                    help="replace the run config's fewbit section: a fewbit JSON file (e.g. configs/presets/"
                         "max-saving.json) or an inline JSON object ('{\"activation_bits\": null}': vanilla)")
    ap.add_argument("--checkpointing", choices=CHECKPOINTING, default=None,
                    help="activation checkpointing (default: training.checkpointing of the config)")
    ap.add_argument("--max-steps", type=int, default=None, help="steps to run (default: training.steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: training.batch_size)")
    ap.add_argument("--metrics-out", default=None, help="write the run's metrics as JSON here (rank 0)")
    ap.add_argument("--model", default=None, help="a local pretrained RoBERTa directory (no downloads)")
    ap.add_argument("--save", default=None, help="write a checkpoint here at the end (and DIR/hf)")
    ap.add_argument("--resume", default=None, help="resume from a checkpoint written by --save")
    ap.add_argument("--seed", type=int, default=None, help="override training.seed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    if args.deepspeed_config and args.fsdp:
        ap.error("--deepspeed_config and --fsdp are two different strategies: choose one")
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_run_config(args.fewbit_config or DEFAULT_CONFIG)
    if args.fewbit is not None:
        cfg["fewbit"] = fewbit_override(args.fewbit)
    tcfg = cfg["training"]
    for key, value in (("checkpointing", args.checkpointing), ("batch_size", args.batch_size), ("seed", args.seed)):
        if value is not None:
            tcfg[key] = value
    steps = args.max_steps or tcfg["steps"]

    use_cuda = torch.cuda.is_available()
    info = init_distributed(device="cuda" if use_cuda else "cpu")
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # Load the native CPU kernels in every run, vanilla included, so that peak RSS compares like with like
        # (their import costs a few tens of MiB of resident memory, which would otherwise count as a variant's).
        fewbit_dist.ops.native.native_module("cpu")
    ds_config = load_ds_config(args.deepspeed_config, tcfg["batch_size"], info.world_size) if args.deepspeed_config else None
    if ds_config is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend)  # adopt the group made above (deepspeed.comm)
        strategy = f"zero{ds_config.get('zero_optimization', {}).get('stage', 0)}"
    elif args.fsdp:
        strategy = "fsdp2"
    else:
        strategy = "ddp" if info.world_size > 1 else "single"

    model = build_model(cfg, args, ds_config)
    if ds_config is None:  # DeepSpeed places the model itself
        model.to(device)
    runner = Runner(strategy, model, cfg, args, info, ds_config)
    start = runner.load(Path(args.resume)) if args.resume else 0
    task = SentencePairTask(cfg["model"]["vocab_size"], tcfg["seq_len"], seed=tcfg["seed"],
                            topics=cfg["data"]["topics"], focus=cfg["data"]["focus"], examples=cfg["data"]["examples"])

    progress = None
    if info.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=steps - start, desc=f"{strategy} x{info.world_size}", unit="step", file=sys.stderr)
    reset_peak_memory(device)
    losses, times, saved = [], [], 0
    runner.model.train()
    for step in range(start, steps):
        batch = {k: v.to(device) for k, v in task.batch(step, tcfg["batch_size"], info.rank, info.world_size).items()}
        t0 = time.perf_counter()
        with SavedTensorMeter(runner.model) as meter:  # the forward only: a reentrant recompute saves again
            loss = runner.forward(batch)
        runner.backward_and_step(loss)
        times.append(time.perf_counter() - t0)
        saved = meter.nbytes
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / info.world_size)
        if progress is not None:
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            progress.update(1)
    if progress is not None:
        progress.close()

    if args.save:
        runner.save(Path(args.save), steps)

    timed = times[1:] or times
    tokens = tcfg["batch_size"] * tcfg["seq_len"] * info.world_size
    mine = {"rank": info.rank, "peak_memory_bytes": peak_memory_bytes(device), "saved_activation_bytes": saved,
            "step_time_s": sum(timed) / len(timed) if timed else None}
    ranks = [None] * info.world_size
    dist.all_gather_object(ranks, mine)
    if info.rank == 0:
        step_time = max(r["step_time_s"] or 0.0 for r in ranks)
        metrics = {
            "world_size": info.world_size, "strategy": strategy, "launcher": info.launcher, "backend": info.backend,
            "checkpointing": tcfg["checkpointing"], "fewbit": cfg["fewbit"].to_dict(), "model": cfg["model"],
            "training": tcfg, "start_step": start, "steps": steps, "losses": losses,
            "tokens_per_second": tokens / step_time if step_time else None, "ranks": ranks,
        }
        print(f"{strategy} x{info.world_size}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over steps {start}..{steps - 1}; "
              + ", ".join(f"rank {r['rank']} peak {r['peak_memory_bytes'] / 2**20:.0f} MiB saved "
                          f"{r['saved_activation_bytes'] / 2**20:.2f} MiB" for r in ranks)
              if losses else f"{strategy} x{info.world_size}: nothing to do (resumed at step {start} of {steps})")
        if args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(metrics, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed; leave without the interpreter's teardown. With FSDP2 over gloo on
    # CPU about one run in ten otherwise aborted after finishing ("terminate called without an active
    # exception": a C++ worker thread still joinable while the process tears down).
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize MPI ourselves (os._exit skips atexit)
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
