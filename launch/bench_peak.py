"""Real peak memory of one training step, as a user measures it: each configuration in a fresh process.

    python launch/bench_peak.py                      # SmolLM2 shape, fp32 and bf16 autocast, 3 repeats
    python launch/bench_peak.py --quick              # a fast check (2 layers, 128 tokens, fp32, 1 repeat)
    python launch/bench_peak.py --roberta            # the RoBERTa-base shape (sequence classification, 4 x 128)
    python launch/bench_peak.py --shape smollm2-4k   # the real vocabulary (49152, tied), 8 layers, 1 x 4096 tokens
    python launch/bench_peak.py --optimizer --trace  # include the AdamW step; locate each peak
    python launch/bench_peak.py --optimizer-in-backward   # AdamW stepped inside backward, the second step
    python launch/bench_peak.py --strategies zero3,fsdp2 --world-size 2   # per rank, 2 ranks over gloo

Model: a SmolLM2-shaped LlamaForCausalLM (8 layers, hidden 576, FFN 1536, 9 heads, 3 KV heads, vocab 8192,
random init), batch 4 x 512 tokens, labels = input_ids; or with --roberta RobertaForSequenceClassification
with roberta-base's sizes (12 layers, hidden 768, 4 x 128 tokens). fp32, or fp32 weights under bf16
autocast (as Trainer's bf16=True).

Variants: vanilla, and `fewbit_dist.convert(model, PRESET)` for each --presets name (exact, safe,
max-saving); a name that does not resolve (or a conversion that fails) is recorded as that row's error.
Checkpointing modes: none; `hf` (model.gradient_checkpointing_enable with use_reentrant=False); `boundary8`
(HF checkpointing with 8-bit compressed boundaries, fewbit_dist.integrations.checkpointing.enable).

Per configuration and repeat a fresh process builds the model (seeded), loads the native CPU kernels (every
variant, vanilla included, so their resident size cancels), and measures with fewbit_dist.memory.PeakMemory
the first training step (forward, backward, and with --optimizer the AdamW step that allocates its state):
peak RSS above the step's start (CPU; CUDA: max_memory_allocated above the allocated bytes at the start).
Then, outside the measured region, it counts the saved-activation bytes of one more forward
(fewbit_dist.memory.SavedTensorMeter). The table reports the median over repeats, the ratio to vanilla in the
same checkpointing mode and dtype, and the saved bytes beside it.

Strategies (--strategies, default single): `single` (one process, as above); `zero3` and `fsdp2`, each
configuration run as --world-size fresh rank processes under torchrun (CPU, gloo, DS_ACCELERATOR=cpu), each
rank with torch threads = --threads // --world-size (at least 1) and its own batch of the shape above
(SmolLM2: 4 x 512 tokens per rank), drawn with seed 1 + rank (rank 0's is the single process's batch). In
every rank the model is built with the same seed, converted (and checkpointing enabled) BEFORE it is wrapped,
the order launch/train.py uses:
- zero3: DeepSpeed ZeRO-3 (configs/ds/zero3.json completed by launch/strategies.deepspeed_config); the model
  is built under deepspeed.zero.Init through transformers' HfDeepSpeedConfig, as launch/train.py builds it,
  then `deepspeed.initialize` with a torch AdamW; the step is `engine(**batch).loss`, `engine.backward(loss)`
  (and `engine.step()` with --optimizer), as a user writes it.
- fsdp2: `fully_shard` on every decoder block (the model's _no_split_modules) and then on the root, a torch
  AdamW over the sharded parameters; the step is `model(**batch).loss.backward()` (and `optimizer.step()`).
Each rank measures its own peak with PeakMemory and then its saved bytes with SavedTensorMeter around one more
forward through the wrapper (null, with the reason, if that forward fails). The table reports the max over
ranks (median over repeats) and the ratio to vanilla of the same strategy, checkpointing mode and dtype;
results.json rows keep each rank's median (`peak_mib_ranks`, `saved_mib_ranks`) and the ratios
(`peak_vs_vanilla`, `saved_vs_vanilla`). All checkpointing modes run under both wrappers. bf16 under
zero3/fsdp2 is the same fp32 weights under torch.autocast (not DeepSpeed's bf16 section nor FSDP2's
MixedPrecisionPolicy).

--optimizer-in-backward (single process): every variant, vanilla included, trains with AdamW stepped inside
backward (fewbit_dist.optim.OptimizerInBackward: each parameter updated and its gradient freed as soon as it
is accumulated); one unmeasured step allocates AdamW's state, and the second step is measured. Ratios compare
variants under that same loop (results.json rows: "optimizer": "in-backward").

--trace: each process also records VmRSS and VmHWM at every module's forward and backward boundary (module
hooks), so the results say between which two events the step's peak occurred and how high the resident set
stood before it (rank 0's, under zero3/fsdp2).

--search-batch --budget-mib B (per rank): instead of the rows, for each variant x checkpointing mode x dtype x
strategy the largest per-rank batch (sequence length fixed: the shape's, or --quick's) whose measured peak stays
within B MiB above the step's start. Each probe is one configuration measured as above (a fresh process, or
fresh ranks; the max over ranks) with ONE repeat (no median). The batch doubles from --batch-start (default 1)
until a probe is over the budget, fails (out of memory, a timeout, any error: counted as over) or reaches
--batch-limit (default 256); then bisection between the last fit and the first miss. results.json keeps every
probe (batch, peak per rank, fit or not, or the error), the answer and its ratio to vanilla's of the same
strategy, checkpointing mode and dtype under the key "max_batch" (its "rows" stay empty); results.md has a table
per strategy and dtype, and notes where the peaks are not monotone in the batch (on a CPU the allocator's noise
can make them so).

    python launch/bench_peak.py --search-batch --budget-mib 1650 --dtypes fp32 --presets max-saving --ckpt none,hf

(SmolLM2's shape; give --timeout room: a probe at batch 32 can run longer than the default 900 s.)

Writes --out/results.json (one row per configuration, every repeat's figures included; rows carry `strategy`
and `world_size`, a row without them is a single-process one) and results.md (one section per strategy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

MIB = 2**20
SHAPES = {
    "smollm2": dict(family="llama", batch=4, seq=512, config=dict(
        vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=False)),
    # The real SmolLM2-135M configuration (vocabulary 49152, tied embeddings) at one 4096-token sequence, with 8 of
    # its 30 layers (CPU time): the long-context shape, where the logits and the checkpoint boundaries weigh.
    "smollm2-4k": dict(family="llama", batch=1, seq=4096, config=dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)),
    "roberta-base": dict(family="roberta", batch=4, seq=128, config=dict(
        vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=514, type_vocab_size=1, num_labels=2)),
}
QUICK = {"num_hidden_layers": 2}
QUICK_SEQ = 128
CKPT_MODES = ("none", "hf", "boundary8")
PRESETS = ("exact", "safe", "max-saving")
STRATEGIES = ("single", "zero3", "fsdp2")
STRATEGY_TITLES = {"single": "single process", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
DTYPES = ("fp32", "bf16")
ZERO3_CONFIG = ROOT / "configs" / "ds" / "zero3.json"


# -- one configuration, in this (fresh) process ------------------------------------------------------------

def build(spec: dict, rank: int = 0, from_config: bool = False):
    """(model, batch): the seeded model and this rank's batch (seed 1 + rank). `from_config`: build through
    `_from_config`, which transformers runs under deepspeed.zero.Init while an HfDeepSpeedConfig for ZeRO-3
    is alive (as launch/train.py builds its models)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    shape = SHAPES[spec["shape"]]
    cfg = dict(shape["config"], **(QUICK if spec["quick"] else {}))
    torch.manual_seed(0)
    if shape["family"] == "llama":
        cls, config = transformers.LlamaForCausalLM, transformers.LlamaConfig(**cfg)
    else:
        cls, config = transformers.RobertaForSequenceClassification, transformers.RobertaConfig(**cfg)
    model = cls._from_config(config) if from_config else cls(config)
    seq = QUICK_SEQ if spec["quick"] else spec.get("seq") or shape["seq"]  # --seqs sets its own
    g = torch.Generator().manual_seed(1 + rank)
    batch = spec.get("batch") or shape["batch"]  # the batch search sets its own per-rank batch
    ids = torch.randint(3, cfg["vocab_size"], (batch, seq), generator=g)
    labels = ids if shape["family"] == "llama" else torch.randint(0, 2, (batch,), generator=g)
    return model, {"input_ids": ids, "labels": labels}


def prepare(model, spec: dict):
    import fewbit_dist
    from fewbit_dist.integrations import checkpointing

    if spec["variant"] != "vanilla":
        fewbit_dist.convert(model, spec["variant"])
    if spec["ckpt"] == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif spec["ckpt"] == "boundary8":
        checkpointing.enable(model, "non_reentrant", boundary_bits=8)
    model.train()


class Tracer:
    """VmRSS / VmHWM at every module's forward and backward boundary (the peak's location).

    Leaf modules without parameters (activations) get forward hooks only: the compressed gated MLP calls the
    model's activation module inside its backward through torch.func.vjp, where a full backward hook's
    autograd.Function cannot run ("must override the setup_context staticmethod")."""

    def __init__(self, model):
        from fewbit_dist import memory

        self.memory, self.events, self.handles = memory, [], []
        for name, m in model.named_modules():
            name = name or "<model>"
            self.handles += [
                m.register_forward_pre_hook(lambda *_, n=name: self.mark(f"fwd> {n}")),
                m.register_forward_hook(lambda *_, n=name: self.mark(f"fwd< {n}")),
            ]
            if next(m.children(), None) is None and next(m.parameters(), None) is None:
                continue
            self.handles += [
                m.register_full_backward_pre_hook(lambda *_, n=name: self.mark(f"bwd> {n}")),
                m.register_full_backward_hook(lambda *_, n=name: self.mark(f"bwd< {n}")),
            ]

    def mark(self, what):
        self.events.append((what, self.memory._status_kib("VmRSS"), self.memory._status_kib("VmHWM")))

    def close(self):
        for h in self.handles:
            h.remove()

    def peak_location(self, start_bytes: int) -> dict:
        """The first event by which the high-water mark had reached its final value, and the one before."""
        if not self.events:
            return {}
        final = self.events[-1][2]
        i = next(k for k, e in enumerate(self.events) if e[2] == final)
        before = self.events[i - 1] if i else ("<step start>", start_bytes // 1024, start_bytes // 1024)
        mib = lambda kib: round(kib * 1024 / MIB - start_bytes / MIB, 1)  # noqa: E731
        return {"between": [before[0], self.events[i][0]], "rss_before_mib": mib(before[1]),
                "rss_after_mib": mib(self.events[i][1]), "events": len(self.events)}


def _autocast(spec: dict):
    """bf16 autocast for dtype bf16 (fp32 weights, as Trainer's bf16=True), a no-op context for fp32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")


def child(spec: dict) -> dict:
    import torch

    import fewbit_dist

    torch.set_num_threads(spec["threads"])
    fewbit_dist.ops.native.native_module("cpu")  # every variant loads the kernels: their RSS cancels out
    model, batch = build(spec)
    try:
        prepare(model, spec)
    except Exception as exc:  # noqa: BLE001 - a preset that does not resolve yet: record it
        return {"error": f"{type(exc).__name__}: {exc}"}
    if spec["optimizer"] == "in-backward":
        # AdamW steps inside backward, from hooks on the parameters (which keep the stepper alive); one
        # unmeasured step first allocates its state, as any run's first step does
        fewbit_dist.optim.OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-4)
        with _autocast(spec):
            loss = model(**batch).loss
        loss.backward()
        del loss
        opt = None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec["optimizer"] else None
    out = measure_step(spec, model, model, batch, lambda loss: loss.backward(), opt and opt.step)
    model.zero_grad(set_to_none=True)
    return {**out, "saved_bytes": saved_bytes(spec, model, model, batch)}


def measure_step(spec: dict, net, module, batch: dict, backward, opt_step=None) -> dict:
    """One training step through `net` (the model or its wrapper) under PeakMemory: forward (bf16
    autocast for dtype bf16), `backward(loss)`, and `opt_step()` when given and --optimizer; with --trace,
    where in `module` the peak occurred."""
    from fewbit_dist.memory import PeakMemory

    autocast = _autocast(spec)
    tracer = Tracer(module) if spec["trace"] else None
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        with autocast:
            loss = net(**batch).loss
        backward(loss)
        if spec["optimizer"] and opt_step is not None:
            opt_step()
    seconds = time.perf_counter() - t0
    out = {"peak_bytes": pm.peak_bytes, "start_bytes": pm.start_bytes, "end_bytes": pm.end_bytes,
           "loss": loss.item(), "step_s": round(seconds, 3)}
    if tracer is not None:
        out["peak_location"] = tracer.peak_location(pm.start_bytes)
        tracer.close()
    return out


def saved_bytes(spec: dict, net, module, batch: dict) -> int:
    """Saved-activation bytes of one more forward through `net` (outside the measured region)."""
    from fewbit_dist.memory import SavedTensorMeter

    with _autocast(spec), \
            SavedTensorMeter(module) as meter:
        net(**batch)
    return meter.nbytes


def _fully_shard(model) -> None:
    """FSDP2: every transformer block (the model's _no_split_modules), then the root (the order FSDP2 expects;
    what fewbit_dist.integrations.fsdp.shard does after converting)."""
    from torch.distributed.fsdp import fully_shard

    from fewbit_dist.integrations.fsdp import block_classes

    classes = block_classes(model)
    for block in [m for m in model.modules() if isinstance(m, classes) and m is not model]:
        fully_shard(block)
    fully_shard(model)


def dist_child(spec: dict) -> None:
    """One rank of a zero3 / fsdp2 configuration (under torchrun). Writes RESULT_DIR/rank{R}.json: this rank's
    figures, or {"error": ...} with the stage that failed (then exits non-zero, so torchrun stops the others)."""
    import torch
    import torch.distributed as dist

    import fewbit_dist
    from fewbit_dist.integrations.distributed import init_distributed

    torch.set_num_threads(spec["threads"])
    info = init_distributed(device="cpu")
    path = Path(spec["result_dir"]) / f"rank{info.rank}.json"

    def finish(result: dict, code: int) -> None:
        path.write_text(json.dumps(dict(result, rank=info.rank, world_size=info.world_size)))
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
        # Leave without the interpreter's teardown (gloo's worker threads can abort it; see launch/train.py).
        os._exit(code)

    fewbit_dist.ops.native.native_module("cpu")  # every variant loads the kernels: their RSS cancels out
    stage = "setup"
    try:
        if spec["strategy"] == "zero3":
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            from strategies import deepspeed_config

            from fewbit_dist.integrations.deepspeed import resolve_auto_buckets

            deepspeed.init_distributed(dist_backend=info.backend)  # adopt the gloo group made above
            micro = spec.get("batch") or SHAPES[spec["shape"]]["batch"]
            ds_path = Path(spec.get("zero3_config") or ZERO3_CONFIG)
            ds = deepspeed_config(json.loads(ds_path.read_text()), micro, info.world_size, "fp32",
                                  source=str(ds_path))
            hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841 - alive while the model is built: zero.Init
            stage = "build"
            model, batch = build(spec, rank=info.rank, from_config=True)
            stage = "convert"
            prepare(model, spec)
            stage = "deepspeed.initialize"
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ds = resolve_auto_buckets(ds, model)
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds,
                                                   model_parameters=model.parameters())
            net, module = engine, engine.module
            backward, opt_step, zero_grad = engine.backward, engine.step, engine.zero_grad
        elif spec["strategy"] == "fsdp2":
            stage = "build"
            model, batch = build(spec, rank=info.rank)
            stage = "convert"
            prepare(model, spec)
            stage = "fully_shard"
            _fully_shard(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            net = module = model
            backward, opt_step = (lambda loss: loss.backward()), opt.step
            zero_grad = lambda: opt.zero_grad(set_to_none=True)  # noqa: E731
        else:
            raise ValueError(f"strategy {spec['strategy']!r} does not run in ranks")
        net.train()
        stage = "training step"
        dist.barrier()  # every rank starts its step together
        out = measure_step(spec, net, module, batch, backward, opt_step)
    except Exception as exc:  # noqa: BLE001 - recorded as the row's error, verbatim
        traceback.print_exc()
        finish({"error": f"{stage}: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}, 1)
    out["threads"] = torch.get_num_threads()
    try:  # outside the measured region: one more forward through the wrapper, not backpropagated
        zero_grad()
        out["saved_bytes"] = saved_bytes(spec, net, module, batch)
    except Exception as exc:  # noqa: BLE001
        out["saved_bytes"] = None
        out["saved_error"] = f"{type(exc).__name__}: {exc}"
    finish(out, 0)


# -- the harness ---------------------------------------------------------------------------------------------

def relative_paths(text: str) -> str:
    """Error text with this checkout's path and the Python installation's cut away (results files name no
    machine's folders)."""
    text = text.replace(str(ROOT) + os.sep, "")
    text = re.sub(r'File "[^"]*/(site-packages|dist-packages)/', r'File "\1/', text)
    return re.sub(r'File "[^"]*/(python3[^/"]*)/', r'File "\1/', text)


def child_env(spec: dict, malloc_env: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", **malloc_env)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # torchrun sets its own
        env.pop(key, None)
    return env


def run_child(spec: dict, timeout: float, malloc_env: dict) -> dict:
    if spec.get("strategy", "single") != "single":
        return run_ranks(spec, timeout, malloc_env)
    env = child_env(spec, malloc_env)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": relative_paths(f"exit {out.returncode}: " + " | ".join(tail))}
    return json.loads(lines[-1])


def run_ranks(spec: dict, timeout: float, malloc_env: dict) -> dict:
    """One zero3/fsdp2 configuration: spec["world_size"] fresh rank processes under torchrun. {"ranks": [one
    dict per rank]} or {"error": ...} (a rank's own error first, verbatim)."""
    ws = spec["world_size"]
    with tempfile.TemporaryDirectory(prefix="bench_peak_") as tmp:
        spec = dict(spec, result_dir=tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ws),
               __file__, "--child", json.dumps(spec)]
        # A session of its own: on a timeout the whole group (torchrun and its ranks) is killed.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env(spec, malloc_env), cwd=ROOT, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        files = [Path(tmp) / f"rank{r}.json" for r in range(ws)]
        ranks = [json.loads(f.read_text()) if f.is_file() else None for f in files]
    failed = [r for r in ranks if r is not None and "error" in r]
    if failed:
        return {"error": relative_paths(f"rank {failed[0]['rank']}: {failed[0]['error']}"),
                "traceback": relative_paths(failed[0].get("traceback") or "")}
    if proc.returncode != 0 or any(r is None for r in ranks):
        missing = [i for i, r in enumerate(ranks) if r is None]
        tail = [line for line in (stderr or stdout).strip().splitlines() if line.strip()][-3:]
        return {"error": relative_paths(f"exit {proc.returncode}" + (f", no result from rank(s) {missing}" if missing
                                                                     else "") + ": " + " | ".join(tail))}
    return {"ranks": ranks}


def _ranks(run: dict) -> list[dict]:
    """A run's per-rank figures: a single-process run is its own one rank."""
    return run["ranks"] if "ranks" in run else [run]


def _median_max(per: list[list[dict]], key: str) -> float:
    """Median over repeats of the max over ranks."""
    return statistics.median(max(x[key] for x in ranks) for ranks in per)


def summarize(spec: dict, runs: list[dict]) -> dict:
    """One results row from a configuration's runs (each a single-process dict or {"ranks": [...]}): the max
    over ranks, median over repeats; per-rank medians in *_ranks."""
    row = {k: spec[k] for k in ("shape", "dtype", "variant", "ckpt", "optimizer", "quick")}
    row.update(strategy=spec.get("strategy", "single"), world_size=spec.get("world_size", 1))
    if spec.get("seq"):
        row["seq"] = spec["seq"]
    if "threads" in spec:
        row["threads"] = spec["threads"]
    errors = [r["error"] for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    if errors and not good:
        row["error"] = errors[0]
        if runs[0].get("traceback"):
            row["error_traceback"] = runs[0]["traceback"]
        return row
    per = [_ranks(r) for r in good]  # per[repeat][rank]
    n = min(len(ranks) for ranks in per)
    peaks = [max(x["peak_bytes"] for x in ranks) for ranks in per]
    row.update(peak_mib=statistics.median(peaks) / MIB, peak_mib_runs=[round(p / MIB, 1) for p in peaks],
               peak_mib_ranks=[round(statistics.median(ranks[i]["peak_bytes"] for ranks in per) / MIB, 1)
                               for i in range(n)])
    if all(x.get("saved_bytes") is not None for ranks in per for x in ranks):
        row.update(saved_mib=_median_max(per, "saved_bytes") / MIB,
                   saved_mib_ranks=[round(statistics.median(ranks[i]["saved_bytes"] for ranks in per) / MIB, 2)
                                    for i in range(n)])
    else:
        row["saved_mib"] = None
        row["saved_error"] = next((x.get("saved_error") for ranks in per for x in ranks if x.get("saved_error")),
                                  "no saved bytes recorded")
    row.update(start_mib=_median_max(per, "start_bytes") / MIB, loss=per[0][0]["loss"],
               step_s=_median_max(per, "step_s"), repeats=len(good))
    if n > 1:
        row["loss_ranks"] = [x["loss"] for x in per[0]]
    if errors:
        row["errors"] = errors
    if "peak_location" in per[0][0]:
        row["peak_location"] = per[0][0]["peak_location"]
    return row


def _strategy(r: dict) -> str:
    return r.get("strategy", "single")  # rows written before strategies existed are single-process ones


def _world(r: dict) -> int:
    return r.get("world_size", 1)


def _group_key(r: dict) -> tuple:
    return r["shape"], _strategy(r), _world(r), r["dtype"], r["ckpt"], r.get("optimizer", False), r.get("seq")


def add_ratios(rows: list[dict]) -> list[dict]:
    """Set each measured row's `peak_vs_vanilla` and `saved_vs_vanilla`: its figure over vanilla's in the same
    shape, strategy, world size, dtype and checkpointing mode (None where that vanilla failed or saved bytes
    are missing). In place; returns `rows`."""
    bases = {_group_key(r): r for r in rows if r["variant"] == "vanilla" and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        b = bases.get(_group_key(r))
        r["peak_vs_vanilla"] = r["peak_mib"] / b["peak_mib"] if b and b["peak_mib"] else None
        r["saved_vs_vanilla"] = (r["saved_mib"] / b["saved_mib"]
                                 if b and r.get("saved_mib") is not None and b.get("saved_mib") else None)
    return rows


def markdown(rows: list[dict], meta: dict, max_batch: list[dict] | None = None) -> str:
    """The results page: the rows' tables (one section per shape, strategy and dtype), where the peaks occur
    (--trace), and the batch search's tables (`max_batch`, results.json's key of that name)."""
    rows = add_ratios([dict(r) for r in rows])
    lines = [f"# Real peak memory of one training step ({meta['title']})", "",
             meta["method"], "", meta["machine_line"], "", f"Command: `{meta['command']}`", ""]
    if meta.get("malloc_env"):
        lines += [f"glibc malloc settings of the runs: {meta['malloc_env']}.", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for strategy, ws in dict.fromkeys((_strategy(r), _world(r)) for r in rows if r["shape"] == shape):
            group = [r for r in rows if r["shape"] == shape and _strategy(r) == strategy and _world(r) == ws]
            multi = strategy != "single"
            for dtype in dict.fromkeys(r["dtype"] for r in group):
                head = f"## {shape}, {'fp32' if dtype == 'fp32' else 'fp32 weights, bf16 autocast'}"
                if multi:
                    head += f", {STRATEGY_TITLES.get(strategy, strategy)}, {ws} rank{'s' if ws != 1 else ''}"
                lines += [head, ""]
                if multi:
                    lines += ["Per rank: peak MiB is the largest over the ranks (median over repeats); `per rank` "
                              "lists each rank's median.", "",
                              "| checkpointing | variant | peak MiB (median) | x vanilla | saved MiB | x vanilla | "
                              "per rank | runs |", "|---|---|---:|---:|---:|---:|---|---|"]
                else:
                    lines += ["| checkpointing | variant | peak MiB (median) | x vanilla | saved MiB | x vanilla | "
                              "runs |",
                              "|---|---|---:|---:|---:|---:|---|"]
                notes = []
                for ckpt in dict.fromkeys([*CKPT_MODES, *(r["ckpt"] for r in group)]):
                    for r in sorted((r for r in group if r["dtype"] == dtype and r["ckpt"] == ckpt),
                                    key=lambda r: r.get("seq") or 0):
                        if "error" in r:
                            lines.append(f"| {ckpt} | {r['variant']} | error: {r['error'][:160]} | | | |"
                                         + (" |" if multi else "") + " |")
                            continue
                        ratio = "" if r["peak_vs_vanilla"] is None else f"{r['peak_vs_vanilla']:.2f}"
                        sratio = "" if r["saved_vs_vanilla"] is None else f"{r['saved_vs_vanilla']:.2f}"
                        if r.get("saved_mib") is None:
                            saved = "n/a"
                            notes.append(f"{ckpt} / {r['variant']}: saved bytes not measured: {r.get('saved_error')}")
                        else:
                            saved = f"{r['saved_mib']:.1f}"
                        runs = ", ".join(f"{x:.0f}" for x in r["peak_mib_runs"])
                        ranks = " / ".join(f"{x:.0f}" for x in r.get("peak_mib_ranks", []))
                        label = f"{ckpt}, {r['seq']} tokens" if r.get("seq") else ckpt
                        lines.append(f"| {label} | {r['variant']} | {r['peak_mib']:.0f} | {ratio} | {saved} | "
                                     f"{sratio} | " + (f"{ranks} | " if multi else "") + f"{runs} |")
                lines.append("")
                if notes:
                    lines += [f"- {n}" for n in notes] + [""]
    located = [r for r in rows if r.get("peak_location")]
    if located:
        lines += ["## Where the peak occurs (first repeat, rank 0)", "",
                  "| shape | strategy | dtype | checkpointing | variant | peak reached between | "
                  "RSS before, MiB above start |",
                  "|---|---|---|---|---|---|---:|"]
        for r in located:
            loc = r["peak_location"]
            lines.append(f"| {r['shape']} | {_strategy(r)} | {r['dtype']} | {r['ckpt']} | {r['variant']} | "
                         f"`{loc['between'][0]}` .. `{loc['between'][1]}` | {loc['rss_before_mib']} |")
        lines.append("")
    if max_batch:
        lines.append(search_markdown(max_batch))
    return "\n".join(lines)


# -- the largest batch within a budget: a search on real peaks ------------------------------------------------

def search_max_batch(measure, budget_mib: float, start: int = 1, limit: int = 256, log=None) -> dict:
    """The largest batch whose measured peak stays within `budget_mib`: double from `start` until a probe misses
    (its peak exceeds the budget, or it fails: out of memory, a timeout, any error) or the batch reaches `limit`,
    then bisect between the last fit and the first miss. `measure(batch)` runs one probe and returns a results
    row ({"peak_mib", "peak_mib_ranks", ...} or {"error": ...}); `log(probe)` is called after each probe.

    Returns {"max_batch" (0 when the first probe misses and so does every smaller one), "probes" (in probing
    order: batch, fits, peak_mib and peak_mib_ranks or error), "first_miss" (the smallest missing batch, None
    when the limit fitted), "limit_reached", "non_monotone", ...}: see `monotonicity`."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    probes = []

    def fits(batch: int) -> bool:
        row = measure(batch)
        probe = {"batch": batch}
        if "error" in row or row.get("peak_mib") is None:
            probe.update(fits=False, error=row.get("error") or "no peak measured")
        else:
            probe.update(fits=row["peak_mib"] <= budget_mib, peak_mib=round(row["peak_mib"], 1))
            for key in ("peak_mib_ranks", "saved_mib", "start_mib", "step_s", "peak_location"):
                if row.get(key) is not None:
                    probe[key] = round(row[key], 2) if isinstance(row[key], float) else row[key]
        probes.append(probe)
        if log is not None:
            log(probe)
        return probe["fits"]

    lo, hi, batch = 0, None, start
    while True:  # doubling: lo is the last fit, hi the first miss
        if not fits(batch):
            hi = batch
            break
        lo = batch
        if batch >= limit:
            break
        batch = min(2 * batch, limit)
    while hi is not None and hi - lo > 1:  # bisection inside (lo, hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    out = {"max_batch": lo, "first_miss": hi, "limit_reached": hi is None, "probes": probes}
    out.update(monotonicity(probes, lo))
    return out


def monotonicity(probes: list[dict], answer: int) -> dict:
    """What the probes say against a peak that grows with the batch (on a CPU the allocator's noise can break
    it): `fits_above` (probes above the answer that fitted), `misses_below` (probes at or below it that missed),
    `peak_drops` ([smaller batch, larger batch] pairs, adjacent among the measured probes, whose peak fell as
    the batch grew), and `non_monotone` (any of them). The search probes only inside (last fit, first miss), so
    its own probes never contradict its answer by fit or miss; a falling peak is how noise shows up in them."""
    fits_above = sorted(p["batch"] for p in probes if p["fits"] and p["batch"] > answer)
    misses_below = sorted(p["batch"] for p in probes if not p["fits"] and p["batch"] <= answer)
    measured = sorted((p["batch"], p["peak_mib"]) for p in probes if p.get("peak_mib") is not None)
    drops = [[a, b] for (a, pa), (b, pb) in zip(measured, measured[1:]) if b > a and pb < pa]
    return {"fits_above": fits_above, "misses_below": misses_below, "peak_drops": drops,
            "non_monotone": bool(fits_above or misses_below or drops)}


def _search_key(e: dict) -> tuple:
    return (e["shape"], e["strategy"], e["world_size"], e["dtype"], e["ckpt"], e.get("optimizer", False),
            e["budget_mib"])


def add_search_ratios(entries: list[dict]) -> list[dict]:
    """Set each search result's `vs_vanilla`: its largest batch over vanilla's of the same shape, strategy, world
    size, dtype, checkpointing mode and budget (None where vanilla's is 0 or missing). In place."""
    bases = {_search_key(e): e for e in entries if e["variant"] == "vanilla"}
    for e in entries:
        b = bases.get(_search_key(e))
        e["vs_vanilla"] = e["max_batch"] / b["max_batch"] if b and b["max_batch"] else None
    return entries


def _probe_text(p: dict) -> str:
    if "error" in p:
        return f"{p['batch']}: error"
    return f"{p['batch']}: {p['peak_mib']:.0f} {'fit' if p['fits'] else 'over'}"


def search_markdown(entries: list[dict]) -> str:
    """The search results: per shape, strategy and dtype a table of each variant's largest batch, its ratio to
    vanilla's and every probe; notes name the limit reached, errors and non-monotone peaks."""
    entries = add_search_ratios([dict(e) for e in entries])
    lines = []
    groups = dict.fromkeys((e["shape"], e["strategy"], e["world_size"], e["dtype"], e["budget_mib"]) for e in entries)
    for shape, strategy, ws, dtype, budget in groups:
        group = [e for e in entries if (e["shape"], e["strategy"], e["world_size"], e["dtype"], e["budget_mib"])
                 == (shape, strategy, ws, dtype, budget)]
        head = f"## {shape}, {'fp32' if dtype == 'fp32' else 'fp32 weights, bf16 autocast'}"
        if strategy != "single":
            head += f", {STRATEGY_TITLES.get(strategy, strategy)}, {ws} rank{'s' if ws != 1 else ''}"
        seq = group[0].get("seq")
        lines += [f"{head}: largest batch per rank within {budget:g} MiB (real peak, search)", "",
                  f"Batch x {seq} tokens per rank. Each probe: one fresh "
                  + ("process" if strategy == "single" else f"set of {ws} ranks")
                  + ", one repeat (no median), its peak above the step's start"
                  + (" (the largest rank)" if ws > 1 else "") + f" against {budget:g} MiB; "
                  f"doubling from {group[0]['batch_start']} (at most {group[0]['batch_limit']}) until a probe is "
                  "over the budget or fails, then bisection. Probes: batch: peak MiB, fit or over, in probing "
                  "order.", "",
                  "| variant | checkpointing | max batch | x vanilla | probes |", "|---|---|---:|---:|---|"]
        notes = []
        for e in sorted(group, key=lambda e: (list(CKPT_MODES).index(e["ckpt"]) if e["ckpt"] in CKPT_MODES
                                              else len(CKPT_MODES), e["variant"] != "vanilla")):
            ratio = "" if e["vs_vanilla"] is None else f"{e['vs_vanilla']:.2f}"
            probes = ", ".join(_probe_text(p) for p in e["probes"])
            answer = f"{e['max_batch']}" + (" (limit)" if e["limit_reached"] else "")
            lines.append(f"| {e['variant']} | {e['ckpt']} | {answer} | {ratio} | {probes} |")
            what = f"{e['variant']} / {e['ckpt']}"
            if e["limit_reached"]:
                notes.append(f"{what}: the limit {e['batch_limit']} fitted; the largest batch may be larger.")
            for p in e["probes"]:
                if "error" in p:
                    notes.append(f"{what}: batch {p['batch']} failed (counted as over): {p['error'][:200]}")
            if e["non_monotone"]:
                parts = []
                if e["fits_above"]:
                    parts.append(f"batch {', '.join(map(str, e['fits_above']))} above the answer fitted")
                if e["misses_below"]:
                    parts.append(f"batch {', '.join(map(str, e['misses_below']))} at or below it was over")
                if e["peak_drops"]:
                    parts.append("the peak fell from batch " + ", ".join(f"{a} to {b}" for a, b in e["peak_drops"]))
                notes.append(f"{what}: non-monotone peaks (allocator noise): {'; '.join(parts)}; the answer is "
                             "what this search's probes gave, not a bound.")
        lines.append("")
        if notes:
            lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def csv_list(text: str, name: str, allowed=None) -> list[str]:
    """A comma list from --NAME; every item one of `allowed` (else SystemExit naming the argument)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"--{name}: give at least one value")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise SystemExit(f"--{name}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="2 layers, 128 tokens, fp32 only, 1 repeat")
    p.add_argument("--roberta", action="store_true", help="the RoBERTa-base shape instead of SmolLM2's")
    p.add_argument("--shape", default="smollm2", choices=[k for k in SHAPES if k != "roberta-base"],
                   help="smollm2: 8 layers, vocabulary 8192, 4 x 512 tokens; smollm2-4k: the real vocabulary "
                        "(49152, tied), 8 layers, 1 x 4096 tokens")
    p.add_argument("--strategies", default="single", help=f"comma list of {', '.join(STRATEGIES)} (default single)")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the zero3 and fsdp2 runs (single: 1)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (default: both; --quick: fp32)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of preset names besides vanilla")
    p.add_argument("--ckpt", default=",".join(CKPT_MODES), help=f"comma list of {', '.join(CKPT_MODES)}")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration (default 3)")
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step in the measured region")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="every variant steps AdamW inside backward (fewbit_dist.optim.OptimizerInBackward, single "
                        "process only); measures the second step, after one that allocated AdamW's state")
    p.add_argument("--trace", action="store_true", help="record where in the step each peak occurs")
    p.add_argument("--zero3-config", default=None,
                   help="the DeepSpeed config of the zero3 runs (default configs/ds/zero3.json)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of a single process; each of N ranks gets threads // N (at least 1)")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the runs (bytes): allocations above it are mapped and "
                        "returned to the OS when freed, so heap fragmentation stops counting toward RSS")
    p.add_argument("--seqs", default=None,
                   help="comma list of sequence lengths to sweep instead of the shape's own (a row per length)")
    p.add_argument("--search-batch", action="store_true",
                   help="instead of the rows: per configuration, the largest per-rank batch whose real peak stays "
                        "within --budget-mib (doubling, then bisection; each probe one fresh run, one repeat)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="with --search-batch: the budget per rank, MiB of peak above the step's start")
    p.add_argument("--batch-start", type=int, default=1, help="with --search-batch: the first batch probed")
    p.add_argument("--batch-limit", type=int, default=256, help="with --search-batch: the largest batch probed")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (one process, or all ranks)")
    p.add_argument("--out", default=str(ROOT / "results" / "peak"))
    args = p.parse_args(argv)
    if args.child:
        return args
    args.strategies = csv_list(args.strategies, "strategies", STRATEGIES)
    args.dtypes = csv_list(args.dtypes or ("fp32" if args.quick else "fp32,bf16"), "dtypes", DTYPES)
    args.ckpt = csv_list(args.ckpt, "ckpt", CKPT_MODES)
    args.presets = [v.strip() for v in args.presets.split(",") if v.strip() and v.strip() != "vanilla"]
    if args.seqs is not None:
        try:
            args.seqs = [int(v) for v in args.seqs.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"--seqs takes a comma list of sequence lengths, got {args.seqs!r}") from None
        if not args.seqs or min(args.seqs) < 1 or args.quick:
            raise SystemExit(f"--seqs takes positive lengths (and not --quick, whose length is fixed), got "
                             f"{args.seqs}")
    for name in ("world_size", "threads", "repeats", "batch_start", "batch_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.search_batch:
        if args.budget_mib is None:
            raise SystemExit("--search-batch needs --budget-mib (the per-rank budget, MiB of peak above the step's "
                             "start)")
        if not args.budget_mib > 0:
            raise SystemExit(f"--budget-mib must be > 0, got {args.budget_mib}")
        if args.batch_limit < args.batch_start:
            raise SystemExit(f"--batch-limit ({args.batch_limit}) must be >= --batch-start ({args.batch_start})")
        if args.repeats not in (None, 1):
            raise SystemExit(f"--repeats: the search measures each probe once, got --repeats {args.repeats}")
    elif args.budget_mib is not None:
        raise SystemExit("--budget-mib applies only with --search-batch")
    if args.optimizer_in_backward and args.optimizer:
        raise SystemExit("--optimizer and --optimizer-in-backward exclude each other: pick the loop to measure")
    if args.optimizer_in_backward and args.strategies != ["single"]:
        raise SystemExit("--optimizer-in-backward measures a single process (--strategies single): under ZeRO-3 "
                         "and FSDP2 gradients must be reduced before the step")
    return args


def search_entry(spec: dict, args: argparse.Namespace, malloc_env: dict, seq: int, where: str, t0: float) -> dict:
    """One configuration's batch search (--search-batch), each probe measured as a row is (run_child, summarize)
    with one repeat: the results.json "max_batch" entry."""
    def measure(batch: int) -> dict:
        s = dict(spec, batch=batch)
        return summarize(s, [run_child(s, args.timeout, malloc_env)])

    def log(p: dict) -> None:
        what = (f"error: {p['error'][:160]}" if "error" in p else
                f"peak {p['peak_mib']:.0f} MiB {'fits' if p['fits'] else 'over'}")
        print(f"[{time.perf_counter() - t0:5.0f} s] {where} batch {p['batch']} x {seq}: {what}", flush=True)

    found = search_max_batch(measure, args.budget_mib, args.batch_start, args.batch_limit, log)
    print(f"[{time.perf_counter() - t0:5.0f} s] {where} largest batch {found['max_batch']}"
          + (" (the limit)" if found["limit_reached"] else "") + (" non-monotone" if found["non_monotone"] else ""),
          flush=True)
    entry = {k: spec[k] for k in ("shape", "dtype", "variant", "ckpt", "optimizer", "quick", "strategy",
                                  "world_size", "threads")}
    entry.update(seq=seq, budget_mib=args.budget_mib, batch_start=args.batch_start, batch_limit=args.batch_limit,
                 repeats_per_probe=1, **found)
    return entry


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        if spec.get("strategy", "single") == "single":
            print(json.dumps(child(spec)), flush=True)
        else:
            dist_child(spec)
        return

    from benchlib import machine_info

    shape = "roberta-base" if args.roberta else args.shape
    variants = ["vanilla"] + args.presets
    repeats = args.repeats or (1 if args.quick else 3)
    malloc_env = {} if args.mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    rows, searches, t0 = [], [], time.perf_counter()
    seq = QUICK_SEQ if args.quick else SHAPES[shape]["seq"]
    seqs = args.seqs or [None]  # None: the shape's own
    if args.seqs and args.search_batch:
        raise SystemExit("--seqs sweeps rows; --search-batch searches at the shape's own sequence length")
    for strategy, length in ((s, n) for s in args.strategies for n in seqs):
        ws = 1 if strategy == "single" else args.world_size
        threads = args.threads if strategy == "single" else max(1, args.threads // ws)
        for dtype in args.dtypes:
            for ckpt in args.ckpt:
                for variant in variants:
                    optimizer = "in-backward" if args.optimizer_in_backward else args.optimizer
                    spec = dict(shape=shape, dtype=dtype, variant=variant, ckpt=ckpt, optimizer=optimizer,
                                quick=args.quick, trace=args.trace, threads=threads, strategy=strategy,
                                world_size=ws, **({"seq": length} if length else {}))
                    if strategy == "zero3" and args.zero3_config:
                        spec["zero3_config"] = str(Path(args.zero3_config).resolve())
                    where = (f"{shape} {strategy} x{ws} {dtype} {ckpt:9s} {variant:10s}"
                             + (f" {length} tokens" if length else ""))
                    if args.search_batch:
                        searches.append(search_entry(spec, args, malloc_env, seq, where, t0))
                        continue
                    runs = []
                    for _ in range(repeats):
                        runs.append(run_child(spec, args.timeout, malloc_env))
                        if "error" in runs[-1]:
                            break  # a configuration that cannot run fails the same way every time
                    row = summarize(spec, runs)
                    rows.append(row)
                    what = row.get("error") or (
                        f"peak {row['peak_mib']:.0f} MiB (ranks {row['peak_mib_ranks']}), saved "
                        + ("n/a" if row["saved_mib"] is None else f"{row['saved_mib']:.1f} MiB"))
                    print(f"[{time.perf_counter() - t0:5.0f} s] {where} {what}", flush=True)

    info = machine_info("cpu")
    sizes = dict(SHAPES[shape]["config"], **(QUICK if args.quick else {}))
    multi = [s for s in args.strategies if s != "single"]
    tokens = (f"x {seq if not args.seqs else '/'.join(map(str, args.seqs))} tokens"
              f"{' per rank' if multi else ''}")
    batch_text = (f"the largest batch {tokens} within {args.budget_mib:g} MiB" if args.search_batch
                  else f"batch {SHAPES[shape]['batch']} {tokens}")
    title = (f"{shape}: {sizes['num_hidden_layers']} layers x {sizes['hidden_size']}, {batch_text}"
             f"{', quick' if args.quick else ''}")
    measured = ("the second training step's peak RSS above the step's start (forward + backward with AdamW "
                "stepping each parameter inside backward, fewbit_dist.optim.OptimizerInBackward; the first step "
                "allocated AdamW's state" if args.optimizer_in_backward else
                "the first training step's peak RSS above the step's start (forward + backward"
                + (" + AdamW step" if args.optimizer else ""))
    measured += ("; fewbit_dist.memory.PeakMemory, Linux high-water mark), parameters and data already resident.")
    if args.search_batch:
        method = ("Each probe of the search: one fresh process (or one set of fresh ranks), one repeat (no median), "
                  + measured + " x vanilla: the variant's largest batch over vanilla's in the same strategy, "
                  "checkpointing mode and dtype.")
    else:
        method = (f"Each row: the median over {repeats} fresh process(es) of " + measured + " x vanilla: against "
                  "vanilla in the same strategy, checkpointing mode and dtype. Saved MiB: saved-activation bytes of "
                  "one forward (fewbit_dist.memory.SavedTensorMeter).")
    method += (" Checkpointing: none; hf = gradient_checkpointing_enable(use_reentrant=False); boundary8 = HF "
               "checkpointing with 8-bit compressed block inputs (fewbit_dist.integrations.checkpointing).")
    if multi:
        per_rank = max(1, args.threads // args.world_size)
        method += (f" Strategies with {args.world_size} ranks (torchrun, gloo, CPU, {per_rank} thread(s) per rank, "
                   f"each rank its own batch{'' if args.search_batch else ' of the shape above'}): the model is "
                   "converted and checkpointing enabled "
                   "before wrapping; zero3 = built under deepspeed.zero.Init, "
                   "deepspeed.initialize with configs/ds/zero3.json and torch AdamW, step engine(**batch), "
                   "engine.backward(loss)" + (", engine.step()" if args.optimizer else "") + "; fsdp2 = "
                   "fully_shard per decoder block and the root, step model(**batch).loss.backward()"
                   + (", AdamW step" if args.optimizer else "") + ". Peak and saved MiB: the largest over the "
                   "ranks.")
    meta = {
        "title": title,
        "command": "python launch/bench_peak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "method": method,
        "strategies": args.strategies,
        "world_size": args.world_size if multi else 1,
        "malloc_env": malloc_env,
        **({"search": {"budget_mib": args.budget_mib, "batch_start": args.batch_start, "batch_limit": args.batch_limit,
                       "seq": seq, "repeats_per_probe": 1}} if args.search_batch else {}),
        "machine": info,
        "machine_line": f"Machine: {info['cpu']}, {info['cpu_count']} CPUs ({args.threads} threads"
                        + (f"; {max(1, args.threads // args.world_size)} per rank with {args.world_size} ranks"
                           if multi else "") + f"), torch {info['torch']}, git {info.get('git')}, {info['date']}.",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    data = {"meta": meta, "rows": rows}
    if args.search_batch:  # the rows stay empty: docs_figures.peak_block reads only rows
        data["max_batch"] = add_search_ratios(searches)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text(markdown(rows, meta, data.get("max_batch")))
    print(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
