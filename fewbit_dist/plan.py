"""Memory planner: what a model needs per GPU for one training step, for each preset and strategy, before the run.

    python -m fewbit_dist.plan --model llama-3-8b --seq 8192 --batch 1 --strategy fsdp2 --world-size 8 --memory 80GiB
    python -m fewbit_dist.plan --model path/to/config.json --presets vanilla,exact,max-saving --json

How: the model is built from its Hugging Face config and one training step (forward, backward, optimizer step) runs
under torch's FakeTensorMode: every op runs on fake CPU tensors that have shapes and no data, so an 8B model costs
seconds and no memory, and SDPA takes its flash path (the plain meta device would take the math path and save the
s x s attention matrix). torch's MemTracker (torch.distributed._tools) follows every storage the step creates and
frees; this module records the live bytes after every op by kind (parameters, gradients, optimizer state,
activations and temporaries) and SavedTensorMeter, with the innermost module of each save, says what backward keeps
and which modules keep it. Nothing about the blocks is assumed: custom autograd functions, compressed saved tensors,
LoRA, checkpointing and the fused loss are traced as they run.

What makes the trace the real step's, the same every time, and quick: where two gradients of one tensor meet,
the autograd engine adds one into the other in place, which it cannot do under a dispatch mode, so the tracker
does it (`_called_by_autograd_engine`); Python's cycle collector and FakeTensorMode's dispatch cache are off
during the trace (each made a tensor die at another op in some traces, so the peak varied from run to run); and
chunked loops run as their first two chunks and the last (fewbit_dist.chunks: every later chunk allocates and
frees what the second did), so a trace costs about the same at 100k tokens as at 4k.

Depth: blocks repeat, so the step is traced with 2 and 3 blocks and every figure is extrapolated linearly to the
config's depth (per phase: forward, backward and optimizer peaks separately). `full_depth=True` traces the real
depth instead (tests check that both agree).

Strategies are composed from the same timeline, sample by sample: parameters, gradients and optimizer state are
divided by the world size where the strategy shards them (ZeRO-1: optimizer state; ZeRO-2: + gradients; ZeRO-3 and
FSDP2: + parameters), plus what each framework documents it allocates: DDP's gradient buckets (a second copy of the
gradients, as `gradient_as_bucket_view=False`, the default); DeepSpeed's fp32 master partition (ZeRO 1-3 keep one
even in fp32) and its reduce bucket, allocated whole, with the bucket sizes of configs/ds/zero3.json ("auto":
hidden_size^2 elements, prefetch 0.9 hidden_size^2, as Hugging Face's Trainer sets them; DeepSpeed's own defaults,
5e8 and 5e7 elements, hold every gradient of a model below 500M parameters unpartitioned, see
fewbit_dist.integrations.deepspeed.AUTO_BUCKETS) and ZeRO-3's prefetched parameters; FSDP2's root unit (what lies
outside the blocks, unsharded from its forward to its backward), one gathered block in forward and two in backward
(the one in use and the one prefetched). What the trace cannot see is listed
with every plan (`Plan.unseen`): CUDA kernel workspaces and library handles, the caching allocator's fragmentation
and rounding, NCCL buffers, the CUDA context.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .chunks import steady_state_chunks
from .memory import SavedTensorMeter, format_bytes
from .validation import check_choice

__all__ = ["PlanSpec", "Plan", "plan", "plan_presets", "trace", "load_model_config", "parse_memory", "shipped_models",
           "fit", "main", "DTYPES", "STRATEGIES", "CHECKPOINTING", "OPTIMIZERS"]

DTYPES = ("fp32", "bf16-autocast", "bf16")
STRATEGIES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2")
CHECKPOINTING = ("none", "hf", "boundary8")
OPTIMIZERS = ("adamw", "sgd", "none")  # none: forward and backward only (as the CPU peak benchmarks measure)
UNSEEN = ("CUDA kernel workspaces (cuBLAS, flash attention) and library handles",
          "the caching allocator's rounding and fragmentation (PyTorch rounds blocks to 512 B; fragmentation is "
          "workload-dependent)",
          "NCCL communication buffers and the CUDA context (about 0.5-1 GiB per GPU, outside torch's counters)")
_MODELS_PACKAGE = "fewbit_dist.plan_models"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ---------------------------------------------------------------------------------------------------------- inputs

def shipped_models() -> list[str]:
    """Names of the model configs shipped with the package (`--model NAME`)."""
    return sorted(p.name[:-5] for p in resources.files(_MODELS_PACKAGE).iterdir() if p.name.endswith(".json"))


def load_model_config(model):
    """A transformers PretrainedConfig from a shipped name, a config.json file, a model directory, or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a shipped name, a path or a transformers config, got {type(model).__name__}")
    path = Path(model)
    if str(model) in shipped_models():
        data = json.loads(resources.files(_MODELS_PACKAGE).joinpath(f"{model}.json").read_text())
    elif path.is_dir() and (path / "config.json").is_file():
        data = json.loads((path / "config.json").read_text())
    elif path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"model: {path} is not a JSON config ({exc})") from exc
    else:
        raise ValueError(f"model must be one of the shipped configs ({', '.join(shipped_models())}), a config.json "
                         f"or a model directory holding one; got {str(model)!r}")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"model: {model} is not a Hugging Face config (it has no 'model_type')")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"model: transformers cannot build a config from {model}: {exc}") from exc


def parse_memory(text) -> int:
    """Bytes from '80GiB', '80 GB', '81920MiB', '1e9' (decimal units for GB/MB, binary for GiB/MiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory must be positive, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory: cannot parse {text!r}; write a number with a unit such as 80GiB, 80GB, 24576MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class PlanSpec:
    """What to plan: a model config (shipped name, config.json, model directory or transformers config), the
    per-rank micro-batch and sequence length, the precision (fp32; bf16-autocast: fp32 weights and optimizer,
    bf16 compute, as Trainer's bf16=True; bf16: weights, gradients and optimizer state in bf16), the optimizer,
    activation checkpointing of every block (hf: non-reentrant; boundary8: with 8-bit block inputs), the
    strategy and world size, and LoRA (r `lora_rank`, all linear projections of the blocks) or full fine-tuning."""

    model: object = "smollm2-135m"
    batch: int = 1
    seq: int = 2048
    dtype: str = "bf16-autocast"
    optimizer: str = "adamw"
    checkpointing: str = "hf"
    strategy: str = "single"
    world_size: int = 1
    lora: bool = False
    lora_rank: int = 16

    def __post_init__(self):
        for name in ("batch", "seq", "world_size", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_choice(self.dtype, "dtype", DTYPES)
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.checkpointing, "checkpointing", CHECKPOINTING)
        check_choice(self.strategy, "strategy", STRATEGIES)
        if self.strategy == "single" and self.world_size != 1:
            raise ValueError(f"strategy 'single' runs one process; world_size must be 1, got {self.world_size}")


# ----------------------------------------------------------------------------------------------------------- trace

def _kind(module: nn.Module, top: nn.Module, blocks: tuple) -> str:
    """The kind of saved tensor a module's own ops make (the innermost module of the save)."""
    name = type(module).__name__
    if module is top or "Loss" in name or name.endswith("ForCausalLM") or name.endswith("Head"):
        return "loss and head"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "Norm" in name:
        return "norms"
    if isinstance(module, nn.Dropout) or "Dropout" in name:
        return "dropout"
    if isinstance(module, nn.Linear) or name.endswith("Linear"):
        return "linear inputs"
    if "Attention" in name:
        return "attention"
    if "MLP" in name:
        return "gated MLP"
    if isinstance(module, blocks):
        return "block (residuals)"
    if type(module).__module__.startswith(("torch.nn.modules.activation", "transformers.activations",
                                           "fewbit_dist.nn.activations")):
        return "activation functions"
    return "other"


class _KindMeter(SavedTensorMeter):
    """SavedTensorMeter that also adds each new storage's bytes to the kind of the innermost running module."""

    def __init__(self, model: nn.Module, blocks: tuple, checkpointed: bool):
        super().__init__(model)
        self.by_kind: dict[str, int] = {}
        self._stack: list[str] = []
        self._handles = []
        def enter(kind):
            def hook(module, args):
                self._stack.append(kind)
            return hook

        def leave(module, args, output):
            if self._stack:
                self._stack.pop()

        for module in model.modules():
            kind = _kind(module, model, blocks)
            if checkpointed and kind == "block (residuals)":  # what a checkpointed block saves is its input
                kind = "checkpoint boundaries"
            self._handles.append(module.register_forward_pre_hook(enter(kind)))
            self._handles.append(module.register_forward_hook(leave))

    def _pack(self, t):
        before = len(self.records)
        out = super()._pack(t)
        if len(self.records) > before:
            kind = self._stack[-1] if self._stack else "other"
            self.by_kind[kind] = self.by_kind.get(kind, 0) + self.records[-1].storage_nbytes
        return out

    def close(self):
        for h in self._handles:
            h.remove()


class _NoHandle:
    def remove(self) -> None:
        pass


_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _called_by_autograd_engine() -> bool:
    """Whether the op being dispatched comes from a node of the autograd graph that has no Python frame (the
    engine's gradient accumulation, a built-in derivative), not from Python code (an autograd Function's
    backward, a checkpoint's recomputation)."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_engine_run_backward":
            return True
        if not code.co_filename.startswith(_TORCH_DIR):
            return False
        frame = frame.f_back
    return False


def _accumulates_in_place(a, b) -> bool:
    """What the engine's in-place accumulation asks of the tensor it adds into (InputBuffer: a plain dense
    tensor that is not a view, of the sum's shape and dtype)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a._base is None and a.is_contiguous() and not a.requires_grad)


def _timeline_tracker():
    """A MemTracker that records, after every op, the live bytes by kind and the phase (its own per-module peak
    bookkeeping, which costs a pass over every module per op, is skipped)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class Timeline(MemTracker):
        def __init__(self):
            super().__init__()
            self.samples: list[tuple] = []  # (phase, param, grad, opt, act)

        def _update_peak_stats(self, peak_state) -> None:
            snap = self._curr_mem_snap.get(torch.device("cpu"))
            if snap is None:
                return
            phase = "opt" if self._in_opt else ("bwd" if self._mod_tracker.is_bw else "fwd")
            act = (snap[_MemRefType.ACT] + snap[_MemRefType.TEMP] + snap[_MemRefType.BUFFER]
                   + snap[_MemRefType.OTH])
            self.samples.append((phase, snap[_MemRefType.PARAM], snap[_MemRefType.GRAD], snap[_MemRefType.OPT], act))
            if self._peak_mem.get(torch.device("cpu"), 0) < snap[_TOTAL_KEY]:
                self._peak_mem[torch.device("cpu")] = snap[_TOTAL_KEY]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Where two gradients of one tensor meet (a tied weight, the residual stream), the autograd engine
            # adds them in place into whichever it holds the last reference to. Under any dispatch mode it never
            # does (the mode's Python objects are references too), so the trace would count a third tensor:
            # model the engine by adding in place here.
            if func is torch.ops.aten.add.Tensor and not kwargs and len(args) == 2 and self._mod_tracker.is_bw \
                    and _called_by_autograd_engine():
                for a, b in (args, args[::-1]):
                    if _accumulates_in_place(a, b):
                        return super().__torch_dispatch__(torch.ops.aten.add_.Tensor, types, (a, b), None)
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's gradient; a frozen one (LoRA's base) cannot take a hook and
            # never has a gradient: mark it hooked already.
            for param in module.parameters():
                if not param.requires_grad and self._param_to_grad_hook_handles.get(param, None) is None:
                    self._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def mark(self, phase: str) -> None:
            """A sample of the current state (at a phase boundary, when no op may have run)."""
            snap = self._curr_mem_snap.get(torch.device("cpu"), {})
            get = lambda k: snap.get(k, 0)  # noqa: E731
            self.samples.append((phase, get(_MemRefType.PARAM), get(_MemRefType.GRAD), get(_MemRefType.OPT),
                                 get(_MemRefType.ACT) + get(_MemRefType.TEMP) + get(_MemRefType.BUFFER)
                                 + get(_MemRefType.OTH)))

    return Timeline()


@dataclass
class Trace:
    """One traced training step at one depth: the timeline and what the model holds."""

    layers: int
    hidden_size: int
    samples: list                # (phase, param, grad, opt, act) after every op
    param_bytes: int             # all parameters
    param_numel: int
    trainable_bytes: int         # trainable parameters (their gradients have this size in the parameter dtype)
    trainable_numel: int
    block_param_bytes: int       # one block's parameters (what ZeRO-3 and FSDP2 gather at a time)
    block_trainable_bytes: int
    root_param_bytes: int        # parameters outside the blocks (embeddings, final norm, head): FSDP2's root unit
    root_trainable_bytes: int
    saved_bytes: int             # SavedTensorMeter over the forward
    saved_by_kind: dict
    kept_after_forward: int      # live activation bytes at the end of the forward (saved + what checkpoints keep)
    start: tuple                 # (param, grad, opt, act) when the step begins
    end: tuple                   # the same after the optimizer step (opt: the optimizer's state)


def _blocks(model: nn.Module) -> tuple:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    return classes


def _meta_to_fake(model: nn.Module) -> None:
    """Every meta parameter and buffer of `model` replaced by a new CPU tensor of its shape, fake under the active
    FakeTensorMode; a tensor shared by several modules (tied weights) stays shared. Unlike Module.to_empty, no
    tensor is swapped in place (fake tensors cannot be)."""
    new: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in new:
                    data = torch.empty_like(t, device="cpu")
                    new[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else data
                store[name] = new[id(t)]


def _build(config, spec: PlanSpec, preset: Optional[str]):
    """The model, converted with `preset` (None or 'vanilla': unconverted), LoRA and checkpointing as spec says.
    Runs under an active FakeTensorMode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .convert import convert

    causal = bool(getattr(config, "architectures", None) and any("CausalLM" in a for a in config.architectures)) \
        or getattr(config, "is_decoder", False) or config.model_type in ("llama", "qwen2", "mistral", "gemma",
                                                                         "gemma2", "phi3", "qwen3")
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
    if not spec.lora:
        model = cls.from_config(config, dtype=dtype)
    else:
        from peft import LoraConfig, get_peft_model

        # peft moves adapter weights with Module._apply, which cannot swap fake tensors: build on the meta device,
        # then give every tensor fake CPU storage.
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype)
            targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)
                              and n.rsplit(".", 1)[-1] not in ("lm_head", "classifier", "dense", "out_proj",
                                                               "score")}) or None
            lora = LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, lora_dropout=0.1,
                              target_modules=targets, task_type="CAUSAL_LM" if causal else "SEQ_CLS")
            model = get_peft_model(model, lora)
        _meta_to_fake(model)
    model.train()
    if preset not in (None, "vanilla"):
        convert(model, preset)
    if spec.checkpointing != "none":
        from .integrations import checkpointing

        base = model.get_base_model() if spec.lora else model
        checkpointing.enable(base, "non_reentrant", boundary_bits=8 if spec.checkpointing == "boundary8" else None)
        if spec.lora and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    return model, causal


@contextmanager
def _unpacked_sequences():
    """transformers looks at position_ids for packed sequences and, finding none (a data-dependent test), lets SDPA
    take its causal path without a mask. Fake tensors have no data, so it would assume packing and build an s x s
    mask that the real run never builds. The planner's inputs are one sequence per row: say so."""
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    if not hasattr(masking, "find_packed_sequence_indices"):
        yield
        return
    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


@contextmanager
def _no_cyclic_gc():
    """Python's cycle collector off for the trace: fake tensors and the tracker's bookkeeping form reference
    cycles, and a collection at a random op freed one early now and then (a trace's peak varied from run to
    run); a real step's tensors die by reference counting, which stays on."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def trace(spec: PlanSpec, preset: Optional[str] = None, layers: Optional[int] = None) -> Trace:
    """One training step of `spec`'s model with `layers` blocks (default: the config's), converted with `preset`,
    under FakeTensorMode: the timeline of live bytes and what backward keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_model_config(spec.model)
    if layers is not None:
        data = config.to_dict()
        depth = data["num_hidden_layers"]
        # per-layer lists (Qwen2's layer_types, ...) follow the depth
        data = {k: (v[:layers] if isinstance(v, list) and len(v) == depth and k != "architectures" else v)
                for k, v in data.items()}
        config = type(config).from_dict({**data, "num_hidden_layers": layers})
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    # FakeTensorMode's dispatch cache made one trace in about ten free a tensor at another op (seen at 100k
    # tokens: a backward peak one hidden-sized tensor lower); without it every trace is the same
    fake.cache_enabled = False
    with _no_cyclic_gc(), fake, steady_state_chunks(), _unpacked_sequences():
        torch.manual_seed(0)
        model, causal = _build(config, spec, preset)
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        blocks = _blocks(model)
        block_list = [m for m in model.modules() if isinstance(m, blocks)]
        block_params = list(block_list[0].parameters()) if block_list else []
        in_blocks = {id(p) for b in block_list for p in b.parameters()}
        root_params = [p for p in params if id(p) not in in_blocks]
        nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        if spec.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)  # CUDA's default: foreach temporaries
        elif spec.optimizer == "sgd":
            opt = torch.optim.SGD(trainable, lr=1e-5, momentum=0.9, foreach=True)
        else:
            opt = None
        vocab = getattr(config, "vocab_size", 1000)
        ids = torch.randint(0, vocab, (spec.batch, spec.seq))
        labels = ids if causal else torch.zeros(spec.batch, dtype=torch.long)
        autocast = torch.autocast("cpu", torch.bfloat16) if spec.dtype == "bf16-autocast" else nullcontext()
        tracker = _timeline_tracker()
        tracker.track_external(*([model, ids, labels] + ([opt] if opt is not None else [])))
        meter = _KindMeter(model, blocks, spec.checkpointing != "none")
        with tracker:
            tracker.mark("fwd")
            start = tracker.samples[-1][1:]
            with autocast, meter:
                loss = model(input_ids=ids, labels=labels).loss
            meter.close()
            tracker.mark("fwd")
            kept = tracker.samples[-1][4]
            loss.backward()
            del loss
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            tracker.mark("end")
        end = tracker.samples.pop()[1:]
        return Trace(layers=config.num_hidden_layers, hidden_size=config.hidden_size, samples=tracker.samples,
                     param_bytes=nbytes(params),
                     param_numel=sum(p.numel() for p in params),
                     trainable_bytes=nbytes(trainable), trainable_numel=sum(p.numel() for p in trainable),
                     block_param_bytes=nbytes(block_params),
                     block_trainable_bytes=nbytes([p for p in block_params if p.requires_grad]),
                     root_param_bytes=nbytes(root_params),
                     root_trainable_bytes=nbytes([p for p in root_params if p.requires_grad]),
                     saved_bytes=meter.nbytes, saved_by_kind=dict(meter.by_kind), kept_after_forward=kept,
                     start=start, end=end)


# -------------------------------------------------------------------------------------------------- strategies

@dataclass(frozen=True)
class _Scale:
    param: float
    grad: float
    opt: float
    extra_always: int = 0   # bytes held across the whole step
    extra_fwd: int = 0      # held during forward and backward (gathered blocks)
    extra_bwd: int = 0      # held during backward only (buckets, unsharded block gradients)


def _strategy_scale(spec: PlanSpec, t: Trace) -> _Scale:
    w = spec.world_size
    grad_elem = 2 if spec.dtype == "bf16" else 4
    if spec.strategy == "single":
        return _Scale(1, 1, 1)
    if spec.strategy == "ddp":
        return _Scale(1, 1, 1, extra_always=t.trainable_bytes)
    from .integrations.deepspeed import AUTO_BUCKETS

    master = t.trainable_numel * 4 // w  # DeepSpeed's fp32 master partition
    bucket = min(AUTO_BUCKETS["reduce_bucket_size"](t.hidden_size), t.trainable_numel) * grad_elem
    if spec.strategy == "zero1":
        return _Scale(1, 1, 1 / w, extra_always=master)
    if spec.strategy == "zero2":
        return _Scale(1, 1 / w, 1 / w, extra_always=master + bucket)
    elem = t.param_bytes // max(1, t.param_numel)
    if spec.strategy == "zero3":
        # Blocks are gathered as they run, with up to stage3_prefetch_bucket_size elements fetched ahead.
        prefetch = AUTO_BUCKETS["stage3_prefetch_bucket_size"](t.hidden_size)
        gathered = min(prefetch * elem + t.block_param_bytes, t.param_bytes)
        return _Scale(1 / w, 1 / w, 1 / w, extra_always=master + bucket, extra_fwd=gathered)
    # FSDP2: the root unit (what lies outside the blocks) stays unsharded from its forward to its backward
    # (reshard_after_forward=False for the root); in forward one block is gathered at a time (no forward
    # prefetch unless set_modules_to_forward_prefetch asks for it), in backward the block in use and the one
    # prefetched. A block's gradients are reduce-scattered as soon as its backward ends, so they count as the
    # trace's gradients divided by the world size.
    return _Scale(1 / w, 1 / w, 1 / w, extra_fwd=t.root_param_bytes + t.block_param_bytes,
                  extra_bwd=t.block_param_bytes)


def _phase_peaks(spec: PlanSpec, t: Trace) -> dict:
    """Per phase (fwd, bwd, opt): the largest per-rank total over the step's samples, and the composition
    (param, grad, opt, act, extra) at that sample; plus the total when the step starts."""
    s = _strategy_scale(spec, t)
    out = {}
    for phase, p, g, o, a in t.samples:
        extra = s.extra_always + (s.extra_fwd if phase in ("fwd", "bwd") else 0) + (s.extra_bwd if phase == "bwd"
                                                                                     else 0)
        if phase == "opt":  # the optimizer's temporaries are per shard too
            parts = (p * s.param, g * s.grad, o * s.opt, a * s.opt, extra)
        else:
            parts = (p * s.param, g * s.grad, o * s.opt, a, extra)
        total = sum(parts)
        if phase not in out or total > out[phase][0]:
            out[phase] = (total, parts)
    p, g, o, a = t.start
    out["start"] = (p * s.param + g * s.grad + o * s.opt + a + s.extra_always, None)
    return out


# ------------------------------------------------------------------------------------------------------- plan

@dataclass
class Plan:
    """The predicted per-rank memory of one training step for one preset (bytes)."""

    preset: str
    spec: dict
    params: int
    grads: int
    optimizer_state: int
    saved_activations: int
    saved_by_kind: dict
    kept_after_forward: int      # activations alive when backward starts (saved tensors, checkpoint inputs, ...)
    backward_transient: int      # the most activations and temporaries backward holds above that
    framework_extra: int
    peak: int
    peak_phase: str
    peak_above_start: int
    layers_traced: list
    seconds: float
    unseen: tuple = UNSEEN
    fit: dict = field(default_factory=dict)


def _model_label(model) -> str:
    """A short name for a plan's model: the name or path given, or the config's model type and source."""
    if isinstance(model, (str, Path)):
        return str(model)
    return getattr(model, "_name_or_path", "") or f"{getattr(model, 'model_type', 'model')} config"


def _extrapolate(a: float, b: float, la: int, lb: int, target: int) -> float:
    return a if la == lb else a + (b - a) * (target - la) / (lb - la)


def _plan_from_traces(spec: PlanSpec, preset: str, traces: list, depth: int, seconds: float) -> Plan:
    peaks = [_phase_peaks(spec, t) for t in traces]
    layers = [t.layers for t in traces]

    def ex(values) -> int:
        return int(round(_extrapolate(values[0], values[-1], layers[0], layers[-1], depth)))

    phase_totals = {ph: ex([pk[ph][0] for pk in peaks]) for ph in peaks[0] if ph != "start"}
    peak_phase = max(phase_totals, key=phase_totals.get)
    parts = [ex([pk[peak_phase][1][i] for pk in peaks]) for i in range(5)]
    start = ex([pk["start"][0] for pk in peaks])
    s = [_strategy_scale(spec, t) for t in traces]
    kinds = sorted({k for t in traces for k in t.saved_by_kind})
    by_kind = {k: ex([t.saved_by_kind.get(k, 0) for t in traces]) for k in kinds}
    bwd_start = ex([t.kept_after_forward for t in traces])
    bwd_act = ex([max((a for ph, _, _, _, a in t.samples if ph == "bwd"), default=0) for t in traces])
    return Plan(
        preset=preset, spec={k: (_model_label(v) if k == "model" else v) for k, v in asdict(spec).items()},
        params=int(ex([t.param_bytes * sc.param for t, sc in zip(traces, s)])),
        grads=int(ex([t.trainable_bytes * sc.grad for t, sc in zip(traces, s)])),
        optimizer_state=int(ex([t.end[2] * sc.opt for t, sc in zip(traces, s)])),
        saved_activations=ex([t.saved_bytes for t in traces]), saved_by_kind=by_kind,
        kept_after_forward=bwd_start,
        backward_transient=max(0, bwd_act - bwd_start),
        framework_extra=parts[4], peak=phase_totals[peak_phase], peak_phase=peak_phase,
        peak_above_start=phase_totals[peak_phase] - start, layers_traced=layers, seconds=round(seconds, 2))


def plan(spec: PlanSpec, preset: str = "vanilla", full_depth: bool = False) -> Plan:
    """The per-rank memory plan of one training step of `spec` with `preset` ('vanilla' for the unconverted
    model). Traces 2 and 3 blocks and extrapolates to the config's depth, or the full depth."""
    t0 = time.perf_counter()
    depth = load_model_config(spec.model).num_hidden_layers
    if full_depth or depth <= 3:
        traces = [trace(spec, preset)]
    else:
        traces = [trace(spec, preset, layers=2), trace(spec, preset, layers=3)]
    return _plan_from_traces(spec, preset, traces, depth, time.perf_counter() - t0)


def fit(spec: PlanSpec, preset: str, memory: int, what: str = "seq", limit: int = 1 << 20,
        full_depth: bool = False, granularity: Optional[int] = None, known: Optional[dict] = None) -> dict:
    """The largest `what` ('seq' or 'batch') whose predicted peak fits `memory` bytes per rank, a multiple of
    `granularity` (default: 128 tokens, 1 sample) up to `limit`. Each probe is a plan; `known` maps sizes
    already planned to their peaks (plan_presets passes spec's own). The peak grows almost linearly in tokens,
    so after spec's size the next probe is interpolated between the largest size known to fit and the smallest
    known not to (extrapolated from the two largest that fit, at least one granule up, until one does not),
    which takes a few probes. Returns the answer (0 when not even one granule fits) and every probe."""
    check_choice(what, "what", ("seq", "batch"))
    step = granularity or (128 if what == "seq" else 1)
    top = limit // step * step
    probes: dict[int, int] = dict(known or {})

    def peak(n: int) -> int:
        if n not in probes:
            probes[n] = plan(replace(spec, **{what: n}), preset, full_depth).peak
        return probes[n]

    def done(answer: int) -> dict:
        return {"what": what, "value": answer, "memory": memory, "probes": {k: probes[k] for k in sorted(probes)}}

    def guess(lo: int, hi: Optional[int]) -> int:
        """Where the peak meets the memory: interpolated in [lo, hi], or extrapolated above lo."""
        below = sorted(k for k in probes if k % step == 0 and probes[k] <= memory)
        a = below[-2] if hi is None and len(below) > 1 else lo
        b = hi if hi is not None else below[-1]
        if a == b:
            return 2 * lo
        slope = (probes[b] - probes[a]) / (b - a)
        n = int(a + (memory - probes[a]) / slope) // step * step if slope > 0 else 2 * lo
        if hi is None:
            return max(n, lo + step)
        if n <= lo:  # lands on lo: test one granule up
            return lo + step
        return n if n < hi else (lo + hi) // 2 // step * step

    first = min(top, max(step, getattr(spec, what) // step * step))
    if first < step:
        return done(0)
    lo, hi = first, None  # lo fits; hi (when known) does not
    if peak(first) > memory:
        if first == step or peak(step) > memory:
            return done(0)
        lo, hi = step, first
    while hi is None or hi - lo > step:
        n = guess(lo, hi)
        if n > top:
            if lo == top or peak(top) <= memory:
                return done(top)
            hi = top
            continue
        if peak(n) <= memory:
            lo = n
        else:
            hi = n
    return done(lo)


def quality_order(presets: Sequence[str]) -> list[str]:
    """Presets from the least lossy to the most (vanilla first, then by the measured gradient cosine on real
    SmolLM2-135M in presets/measured.json; unmeasured ones last)."""
    from .presets import _files

    measured = json.loads(_files().joinpath("measured.json").read_text())

    def key(name):
        if name == "vanilla":
            return (0, 0.0)
        cos = measured.get(name, {}).get("SmolLM2-135M", {}).get("grad_cosine")
        return (1, -cos) if cos is not None else (2, 0.0)

    return sorted(presets, key=key)


def plan_presets(spec: PlanSpec, presets: Sequence[str], memory: Optional[int] = None,
                 full_depth: bool = False, max_seq: Optional[int] = None, max_batch: int = 256) -> dict:
    """Plans for every preset; with `memory`, each plan's `fit` (the longest seq, up to `max_seq`, default the
    config's max_position_embeddings, and the largest batch, up to `max_batch`, that fit it; `fit["capped"]`
    names the searches that still fitted at their cap) and the least lossy preset whose peak at spec's shape
    fits."""
    from .presets import list_presets

    known = ["vanilla"] + list_presets()
    for name in presets:
        if name not in known:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(known)}")
    plans = [plan(spec, name, full_depth) for name in presets]
    out = {"spec": plans[0].spec if plans else asdict(spec), "plans": plans, "memory": memory, "choice": None}
    if memory is not None:
        if max_seq is None:
            max_seq = getattr(load_model_config(spec.model), "max_position_embeddings", None) or 1 << 20
        limits = {"seq": max_seq, "batch": max_batch}
        for p in plans:
            p.fit = {what: fit(spec, p.preset, memory, what, limit=limits[what], full_depth=full_depth,
                               known={getattr(spec, what): p.peak})["value"]
                     for what in ("seq", "batch")}
            granule = {"seq": 128, "batch": 1}
            p.fit["capped"] = [what for what in ("seq", "batch") if p.fit[what] + granule[what] > limits[what]]
        fitting = [p.preset for p in plans if p.peak <= memory]
        ordered = quality_order(fitting)
        out["choice"] = ordered[0] if ordered else None
    return out


# ------------------------------------------------------------------------------------------------------- CLI

def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def render(result: dict) -> str:
    spec, plans = result["spec"], result["plans"]
    model = spec["model"]
    lines = [f"model {model}: batch {spec['batch']} x {spec['seq']} tokens per rank, {spec['dtype']}, "
             f"{spec['optimizer']}, checkpointing {spec['checkpointing']}, {spec['strategy']} x {spec['world_size']}"
             f"{', LoRA r' + str(spec['lora_rank']) if spec['lora'] else ', full fine-tuning'}",
             f"(traced under FakeTensorMode with {'/'.join(str(x) for x in plans[0].layers_traced)} blocks"
             f"{', extrapolated' if len(plans[0].layers_traced) > 1 else ''}; GiB per rank)", ""]
    head = ["preset", "params", "grads", "optim", "saved", "kept fwd", "bwd trans", "framework", "peak", "phase"]
    rows = [[p.preset, _gib(p.params), _gib(p.grads), _gib(p.optimizer_state), _gib(p.saved_activations),
             _gib(p.kept_after_forward), _gib(p.backward_transient), _gib(p.framework_extra), _gib(p.peak),
             p.peak_phase] for p in plans]
    if result["memory"] is not None:
        head += ["fits", "max seq", "max batch"]
        for row, p in zip(rows, plans):
            capped = p.fit.get("capped", [])
            row += ["yes" if p.peak <= result["memory"] else "no"] + [
                f"{p.fit.get(what, '')}{'+' if what in capped else ''}" for what in ("seq", "batch")]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    kinds = sorted({k for p in plans for k in p.saved_by_kind})
    if kinds:
        lines += ["", "saved for backward by kind (GiB): " + ", ".join(kinds)]
        for p in plans:
            lines.append(f"  {p.preset:<14}" + "  ".join(f"{k} {_gib(p.saved_by_kind.get(k, 0))}" for k in kinds))
    if result["memory"] is not None:
        lines += ["", "max seq: up to the model's max_position_embeddings (--max-seq to search further), max "
                  "batch: up to --max-batch; N+ still fits at that cap"]
        lines += [f"memory per rank {format_bytes(result['memory'])}: "
                  + (f"the least lossy preset that fits is {result['choice']}" if result["choice"]
                     else "no preset fits at this shape")]
    lines += ["", "not seen by the trace: " + "; ".join(UNSEEN)]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .presets import list_presets

    ap = argparse.ArgumentParser(prog="python -m fewbit_dist.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help=f"a shipped config ({', '.join(shipped_models())}), a config.json or a model directory")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch per rank")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16-autocast", choices=DTYPES)
    ap.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    ap.add_argument("--checkpointing", default="hf", choices=CHECKPOINTING)
    ap.add_argument("--strategy", default="single", choices=STRATEGIES)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--lora", action="store_true", help="LoRA adapters on every linear projection of the blocks")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--presets", default=",".join(["vanilla"] + list_presets()),
                    help="comma-separated: vanilla and shipped presets")
    ap.add_argument("--memory", help="per-rank memory, e.g. 80GiB: adds the longest sequence and largest batch "
                                     "that fit, and the least lossy preset that fits")
    ap.add_argument("--max-seq", type=int, default=None,
                    help="with --memory: the longest sequence searched (default: the config's max_position_embeddings)")
    ap.add_argument("--max-batch", type=int, default=256, help="with --memory: the largest batch searched")
    ap.add_argument("--full-depth", action="store_true", help="trace every block instead of extrapolating from 2, 3")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    try:
        memory = parse_memory(args.memory) if args.memory is not None else None
        spec = PlanSpec(model=args.model, batch=args.batch, seq=args.seq, dtype=args.dtype, optimizer=args.optimizer,
                        checkpointing=args.checkpointing, strategy=args.strategy, world_size=args.world_size,
                        lora=args.lora, lora_rank=args.lora_rank)
        load_model_config(spec.model)
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        result = plan_presets(spec, presets, memory, args.full_depth, args.max_seq, args.max_batch)
    except (ValueError, TypeError) as exc:
        ap.error(str(exc))
    if args.json:
        print(json.dumps({**result, "plans": [asdict(p) for p in result["plans"]]}, indent=1))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
