"""Real peak memory of one training step, as a user measures it: each configuration in a fresh process.

    python launch/bench_peak.py                      # SmolLM2 shape, fp32 and bf16 autocast, 3 repeats
    python launch/bench_peak.py --quick              # a fast check (2 layers, 128 tokens, fp32, 1 repeat)
    python launch/bench_peak.py --roberta            # the RoBERTa-base shape (sequence classification, 4 x 128)
    python launch/bench_peak.py --optimizer --trace  # include the AdamW step; locate each peak

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

--trace: each process also records VmRSS and VmHWM at every module's forward and backward boundary (module
hooks), so the results say between which two events the step's peak occurred and how high the resident set
stood before it.

Writes --out/results.json (one row per configuration, every repeat's figures included) and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

MIB = 2**20
SHAPES = {
    "smollm2": dict(family="llama", batch=4, seq=512, config=dict(
        vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=False)),
    "roberta-base": dict(family="roberta", batch=4, seq=128, config=dict(
        vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=514, type_vocab_size=1, num_labels=2)),
}
QUICK = {"num_hidden_layers": 2}
QUICK_SEQ = 128
CKPT_MODES = ("none", "hf", "boundary8")
PRESETS = ("exact", "safe", "max-saving")


# -- one configuration, in this (fresh) process ------------------------------------------------------------

def build(spec: dict):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    shape = SHAPES[spec["shape"]]
    cfg = dict(shape["config"], **(QUICK if spec["quick"] else {}))
    torch.manual_seed(0)
    if shape["family"] == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    else:
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg))
    seq = QUICK_SEQ if spec["quick"] else shape["seq"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg["vocab_size"], (shape["batch"], seq), generator=g)
    labels = ids if shape["family"] == "llama" else torch.randint(0, 2, (shape["batch"],), generator=g)
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
    """VmRSS / VmHWM at every module's forward and backward boundary (the peak's location)."""

    def __init__(self, model):
        from fewbit_dist import memory

        self.memory, self.events, self.handles = memory, [], []
        for name, m in model.named_modules():
            name = name or "<model>"
            self.handles += [
                m.register_forward_pre_hook(lambda *_, n=name: self.mark(f"fwd> {n}")),
                m.register_forward_hook(lambda *_, n=name: self.mark(f"fwd< {n}")),
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


def child(spec: dict) -> dict:
    import torch

    import fewbit_dist
    from fewbit_dist.memory import PeakMemory, SavedTensorMeter

    torch.set_num_threads(spec["threads"])
    fewbit_dist.ops.native.native_module("cpu")  # every variant loads the kernels: their RSS cancels out
    model, batch = build(spec)
    try:
        prepare(model, spec)
    except Exception as exc:  # noqa: BLE001 - a preset that does not resolve yet: record it
        return {"error": f"{type(exc).__name__}: {exc}"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec["optimizer"] else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16")
    tracer = Tracer(model) if spec["trace"] else None
    t0 = time.perf_counter()
    with PeakMemory("cpu") as pm:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
    seconds = time.perf_counter() - t0
    out = {"peak_bytes": pm.peak_bytes, "start_bytes": pm.start_bytes, "end_bytes": pm.end_bytes,
           "loss": loss.item(), "step_s": round(seconds, 3)}
    if tracer is not None:
        out["peak_location"] = tracer.peak_location(pm.start_bytes)
        tracer.close()
    del loss
    model.zero_grad(set_to_none=True)
    with autocast, SavedTensorMeter(model) as meter:
        model(**batch)
    out["saved_bytes"] = meter.nbytes
    return out


# -- the harness ---------------------------------------------------------------------------------------------

def run_child(spec: dict, timeout: float, malloc_env: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu", **malloc_env)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {out.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def summarize(spec: dict, runs: list[dict]) -> dict:
    row = {k: spec[k] for k in ("shape", "dtype", "variant", "ckpt", "optimizer", "quick")}
    errors = [r["error"] for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    if errors and not good:
        row["error"] = errors[0]
        return row
    row.update(peak_mib=statistics.median(r["peak_bytes"] for r in good) / MIB,
               peak_mib_runs=[round(r["peak_bytes"] / MIB, 1) for r in good],
               saved_mib=statistics.median(r["saved_bytes"] for r in good) / MIB,
               start_mib=statistics.median(r["start_bytes"] for r in good) / MIB,
               loss=good[0]["loss"], step_s=statistics.median(r["step_s"] for r in good), repeats=len(good))
    if errors:
        row["errors"] = errors
    if "peak_location" in good[0]:
        row["peak_location"] = good[0]["peak_location"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Real peak memory of one training step ({meta['title']})", "",
             meta["method"], "", meta["machine_line"], "", f"Command: `{meta['command']}`", ""]
    if meta.get("malloc_env"):
        lines += [f"glibc malloc settings of the runs: {meta['malloc_env']}.", ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["shape"] == shape):
            lines += [f"## {shape}, {'fp32' if dtype == 'fp32' else 'fp32 weights, bf16 autocast'}", "",
                      "| checkpointing | variant | peak MiB (median) | x vanilla | saved MiB | x vanilla | runs |",
                      "|---|---|---:|---:|---:|---:|---|"]
            for ckpt in CKPT_MODES:
                sel = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype and r["ckpt"] == ckpt]
                base = next((r for r in sel if r["variant"] == "vanilla" and "error" not in r), None)
                for r in sel:
                    if "error" in r:
                        lines.append(f"| {ckpt} | {r['variant']} | error: {r['error'][:120]} | | | | |")
                        continue
                    ratio = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else ""
                    sratio = f"{r['saved_mib'] / base['saved_mib']:.2f}" if base else ""
                    lines.append(f"| {ckpt} | {r['variant']} | {r['peak_mib']:.0f} | {ratio} | {r['saved_mib']:.1f} | "
                                 f"{sratio} | {', '.join(f'{x:.0f}' for x in r['peak_mib_runs'])} |")
            lines.append("")
    located = [r for r in rows if r.get("peak_location")]
    if located:
        lines += ["## Where the peak occurs (first repeat)", "",
                  "| shape | dtype | checkpointing | variant | peak reached between | RSS before, MiB above start |",
                  "|---|---|---|---|---|---:|"]
        for r in located:
            loc = r["peak_location"]
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['ckpt']} | {r['variant']} | "
                         f"`{loc['between'][0]}` .. `{loc['between'][1]}` | {loc['rss_before_mib']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="2 layers, 128 tokens, fp32 only, 1 repeat")
    p.add_argument("--roberta", action="store_true", help="the RoBERTa-base shape instead of SmolLM2's")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, bf16 (default: both; --quick: fp32)")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of preset names besides vanilla")
    p.add_argument("--ckpt", default=",".join(CKPT_MODES), help=f"comma list of {CKPT_MODES}")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration (default 3)")
    p.add_argument("--optimizer", action="store_true", help="include an AdamW step in the measured region")
    p.add_argument("--trace", action="store_true", help="record where in the step each peak occurs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the runs (bytes): allocations above it are mapped and "
                        "returned to the OS when freed, so heap fragmentation stops counting toward RSS")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(ROOT / "results" / "peak"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    from benchlib import machine_info

    shape = "roberta-base" if args.roberta else "smollm2"
    dtypes = (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    ckpts = args.ckpt.split(",")
    for bad in [d for d in dtypes if d not in ("fp32", "bf16")] + [c for c in ckpts if c not in CKPT_MODES]:
        raise SystemExit(f"unknown dtype or checkpointing mode {bad!r}: dtypes fp32, bf16; modes {CKPT_MODES}")
    variants = ["vanilla"] + [v for v in args.presets.split(",") if v]
    repeats = args.repeats or (1 if args.quick else 3)
    malloc_env = {} if args.mmap_threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    rows, t0 = [], time.perf_counter()
    for dtype in dtypes:
        for ckpt in ckpts:
            for variant in variants:
                spec = dict(shape=shape, dtype=dtype, variant=variant, ckpt=ckpt, optimizer=args.optimizer,
                            quick=args.quick, trace=args.trace, threads=args.threads)
                runs = []
                for _ in range(repeats):
                    runs.append(run_child(spec, args.timeout, malloc_env))
                    if "error" in runs[-1] and "peak_bytes" not in runs[-1]:
                        break  # a variant that cannot be built fails the same way every time
                row = summarize(spec, runs)
                rows.append(row)
                what = row.get("error") or f"peak {row['peak_mib']:.0f} MiB, saved {row['saved_mib']:.1f} MiB"
                print(f"[{time.perf_counter() - t0:5.0f} s] {shape} {dtype} {ckpt:9s} {variant:10s} {what}", flush=True)

    info = machine_info("cpu")
    sizes = dict(SHAPES[shape]["config"], **(QUICK if args.quick else {}))
    seq = QUICK_SEQ if args.quick else SHAPES[shape]["seq"]
    title = (f"{shape}: {sizes['num_hidden_layers']} layers x {sizes['hidden_size']}, batch "
             f"{SHAPES[shape]['batch']} x {seq} tokens{', quick' if args.quick else ''}")
    meta = {
        "title": title,
        "command": "python launch/bench_peak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "method": (f"Each row: the median over {repeats} fresh process(es) of the first training step's peak RSS above "
                   "the step's start (forward + backward" + (" + AdamW step" if args.optimizer else "") +
                   "; fewbit_dist.memory.PeakMemory, Linux high-water mark), parameters and data already resident. "
                   "x vanilla: against vanilla in the same checkpointing mode and dtype. Saved MiB: saved-activation "
                   "bytes of one forward (fewbit_dist.memory.SavedTensorMeter). Checkpointing: none; hf = "
                   "gradient_checkpointing_enable(use_reentrant=False); boundary8 = HF checkpointing with 8-bit "
                   "compressed block inputs (fewbit_dist.integrations.checkpointing)."),
        "malloc_env": malloc_env,
        "machine": info,
        "machine_line": f"Machine: {info['cpu']}, {info['cpu_count']} CPUs ({args.threads} threads), torch "
                        f"{info['torch']}, git {info.get('git')}, {info['date']}.",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(rows, meta))
    print(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
