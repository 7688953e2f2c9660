"""Hugging Face: real weights in (a model directory or a .gguf file), and the recipes for Trainer, accelerate
and PEFT. Each framework is imported only when a function here needs it.

Trainer: convert, then hand the model to Trainer; it wraps it (DeepSpeed, FSDP, DDP) after conversion, the
order convert needs. For ZeRO-3 build the TrainingArguments first: while they live, from_pretrained builds the
model already partitioned (deepspeed.zero.Init), and convert works on that model as on any other. On CPU
(`use_cpu=True`) Trainer leaves DeepSpeed's communication layer to be started later, so zero.Init would see a
world of one: call `init_deepspeed_comm()` before from_pretrained.

    args = TrainingArguments(out, deepspeed="configs/ds/zero2.json", bf16=True, ...)  # or fsdp="full_shard"
    init_deepspeed_comm()                                                   # DeepSpeed on CPU
    model, tokenizer = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # dequantized, trainable
    model = fewbit_dist.convert(model, config)
    Trainer(model=model, args=args, train_dataset=..., eval_dataset=...).train()

accelerate: `prepare(accelerator, model, optimizer, loader, fewbit_config=config)` converts, then
`accelerator.prepare`s everything (an optimizer built before conversion is fine: converted layers keep the
same Parameters).

PEFT: convert the PeftModel (after get_peft_model), not the bare base model: a LoRA layer
(peft.tuners.lora.Linear) keeps its frozen `base_layer` and its adapters `lora_A` / `lora_B` as nn.Linear
children, and convert swaps each. A frozen base layer needs no input for its weight gradient, so its
LowBitLinear saves nothing but the Parameter; lora_A reads the same tensor as the base layer and saves it
low-bit; lora_B saves lora_A's small output low-bit. (Adapters that read one tensor, such as those of q, k
and v, each keep their own low-bit copy of it for now: the shared saved-input slot of
fewbit_dist.functional.shared_input holds one entry, and each lora_B's input replaces it.) Adapter checkpoints
are PEFT's own (`save_pretrained`, `PeftModel.from_pretrained`): the state dict keys do not change, and they
load into a converted or an unconverted base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigLike
from ..convert import convert

__all__ = ["TASKS", "infer_task", "init_deepspeed_comm", "load_pretrained", "mark_unquantized", "prepare"]

TASKS = ("causal-lm", "classification")


def infer_task(config) -> Optional[str]:
    """"causal-lm" or "classification" from a transformers config's `architectures`, or None when it does not
    say (a bare encoder such as BertModel, or a config converted from a .gguf file)."""
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "classification"
    return None


def mark_unquantized(model: nn.Module) -> nn.Module:
    """Mark a model that was dequantized on load (from a .gguf file) as the plain floating-point model it is.

    transformers keeps the model flagged as quantized (`hf_quantizer`, `is_quantized`,
    `config.quantization_config`), so Trainer refuses to fine-tune it ("purely quantized") and optimizers
    built by helpers skip it, though every weight is an ordinary float tensor by then. Checks that, then
    drops the flags. In place; returns the model."""
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise ValueError(f"parameter {name} is {p.dtype}: the model still holds quantized weights")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model


def load_pretrained(path, task: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
                    num_labels: Optional[int] = None, **kwargs):
    """(model, tokenizer, task) from a local model directory or a .gguf file; nothing is downloaded.

    `task`: "causal-lm" or "classification"; None infers it from the config (a .gguf file: causal-lm). A
    .gguf file is dequantized to `dtype` and marked unquantized (`mark_unquantized`). The tokenizer is None
    when the directory has none. A tokenizer without a pad token pads with EOS (and the model is told so).
    `kwargs` go to from_pretrained."""
    import transformers

    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    path = Path(path)
    gguf = path.suffix == ".gguf"
    if gguf:
        if not path.is_file():
            raise FileNotFoundError(f"path: no such .gguf file: {path}")
        where, extra = path.parent, {"gguf_file": path.name}
        task = task or "causal-lm"
    else:
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"path: {path} is not a Hugging Face model directory (no config.json) "
                                    "nor a .gguf file")
        where, extra = path, {}
        task = task or infer_task(transformers.AutoConfig.from_pretrained(where, local_files_only=True))
        if task is None:
            raise ValueError(f"cannot tell the task of {path} from its config (architectures); pass task= one of "
                             f"{TASKS}")
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(where, dtype=dtype, local_files_only=True, **extra, **kwargs)
    if gguf:
        mark_unquantized(model)
    tokenizer = None
    has_tokenizer = gguf or any((where / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    if has_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, task


def init_deepspeed_comm(backend: Optional[str] = None) -> None:
    """Start deepspeed.comm on the process group of this launch (torchrun's environment; gloo on CPU, nccl on
    CUDA unless `backend` says otherwise). Idempotent."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def prepare(accelerator, model: nn.Module, *objects, fewbit_config: ConfigLike = None):
    """`convert(model, fewbit_config)`, then `accelerator.prepare(model, *objects)`; returns what prepare
    returns. Build the optimizer before or after: converted layers keep the model's Parameters."""
    return accelerator.prepare(convert(model, fewbit_config), *objects)
