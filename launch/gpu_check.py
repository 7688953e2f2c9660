"""Per-preset peak memory and step time on one GPU (the measuring half of scripts/gpu_check.sh).

    python launch/gpu_check.py OUT_DIR              # CUDA: FewBit's RoBERTa-base table and SmolLM2 in bf16
    python launch/gpu_check.py OUT_DIR --dry-run    # the same code path on the CPU with tiny models (seconds)

Configurations:
- roberta-base, fp32: RobertaForSequenceClassification with roberta-base sizes (12 layers), batch 128 x 128
  tokens, as in FewBit's own table (their figures: 11.30 GiB vanilla, 7.60 GiB with 3-bit GELU + 20% sketches);
- smollm2, bf16 autocast (fp32 master weights): a SmolLM2-135M-shaped LlamaForCausalLM (30 layers), batch
  8 x 512 tokens with labels.
Variants: vanilla and every preset (`fewbit_dist.convert(model, name)`); a preset that does not resolve or
apply, or runs out of memory, is recorded with its error. Weights are random (no network needed).

Memory: each variant alone on the device (built, one warm-up step, then torch.cuda.max_memory_allocated after
reset_peak_memory_stats around one step: `peak_bytes`, and `peak_above_start_bytes` above what was allocated
before the step: weights, and nothing else). On the CPU (dry run) the step's peak RSS instead. Beside it, the
memory planner's prediction of the same quantity (`planned_above_start_bytes`, fewbit_dist.plan, traced on the
CPU under FakeTensorMode): the planner's check against torch.cuda.max_memory_allocated.
Time: all variants resident, one step each per round, interleaved, after a warm-up round; median seconds and
the median of the per-round ratios to vanilla. Rounds stop early when --budget-s is spent (at least 2).
Writes OUT_DIR/results.json and OUT_DIR/results.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_step import PRESETS, make_batch, make_variant, train_step, versions  # noqa: E402
from benchlib import machine_info, ratio_stats, sync  # noqa: E402

CONFIGS = [
    dict(model="roberta-base", dtype="fp32", layers=12, batch=128, seq=128),
    dict(model="smollm2", dtype="bf16", layers=30, batch=8, seq=512),
]
DRY = dict(layers=2, batch=2, seq=16)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
GIB = 2.0 ** 30


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_memory(cfg: dict, name: str, device, tiny: bool) -> dict:
    """Peak memory of one training step of one variant, alone on the device."""
    from fewbit_dist.memory import peak_memory_bytes, reset_peak_memory

    model, err = make_variant(cfg["model"], None if name == "vanilla" else name, cfg["layers"], tiny, device)
    if err is not None:
        return {"status": "error", "error": err}
    try:
        batch = make_batch(cfg["model"], model, cfg["batch"], cfg["seq"], device)
        train_step(model, batch, AUTOCAST[cfg["dtype"]])  # warm-up: kernels built, caches filled
        sync(device.type)
        _free(device)
        start = torch.cuda.memory_allocated(device) if device.type == "cuda" else peak_memory_bytes("cpu")
        reset_peak_memory(device)
        train_step(model, batch, AUTOCAST[cfg["dtype"]])
        sync(device.type)
        peak = peak_memory_bytes(device)
        return {"status": "ok", "peak_bytes": peak, "peak_above_start_bytes": peak - start,
                **planned(cfg, name, model.config)}
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "error", "error": f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"}
    finally:
        del model
        _free(device)


def planned(cfg: dict, name: str, config) -> dict:
    """The memory planner's prediction for the same step (fewbit_dist.plan: traced on the CPU under
    FakeTensorMode, no optimizer, no checkpointing), to set beside the measured peak above start; its error
    is recorded instead of failing the check."""
    try:
        from fewbit_dist.plan import PlanSpec, plan

        spec = PlanSpec(model=config, batch=cfg["batch"], seq=cfg["seq"],
                        dtype="bf16-autocast" if cfg["dtype"] == "bf16" else "fp32", optimizer="none",
                        checkpointing="none")
        return {"planned_above_start_bytes": plan(spec, name).peak_above_start}
    except Exception as exc:  # the measurement stands without the prediction
        return {"planned_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def measure_time(cfg: dict, names: list[str], device, tiny: bool, repeats: int, budget_s: float) -> dict:
    """{name: seconds per step}, all variants resident, interleaved rounds."""
    models, batch = {}, None
    for name in names:
        model, err = make_variant(cfg["model"], None if name == "vanilla" else name, cfg["layers"], tiny, device)
        if err is None:
            models[name] = model
            batch = batch or make_batch(cfg["model"], model, cfg["batch"], cfg["seq"], device)
    samples = {name: [] for name in models}
    start = time.perf_counter()
    for r in range(1 + repeats):
        for name, model in models.items():
            sync(device.type)
            t0 = time.perf_counter()
            train_step(model, batch, AUTOCAST[cfg["dtype"]])
            sync(device.type)
            if r:
                samples[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    del models
    _free(device)
    return samples


def run_config(cfg: dict, presets: list[str], device, tiny: bool, repeats: int, budget_s: float) -> list[dict]:
    names = ["vanilla", *presets]
    memory = {}
    for name in names:
        try:
            memory[name] = measure_memory(cfg, name, device, tiny)
        except Exception as exc:  # record and go on: one broken preset must not hide the others
            memory[name] = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    ok = [n for n in names if memory[n]["status"] == "ok"]
    samples = measure_time(cfg, ok, device, tiny, repeats, budget_s) if "vanilla" in ok else {}
    rows = []
    for name in names:
        row = {"config": dict(cfg, device=str(device), tiny=tiny), "variant": name} | memory[name]
        if name in samples and samples[name]:
            xs = sorted(samples[name])
            row |= {"median_s": xs[len(xs) // 2], "samples_s": samples[name],
                    "ratio": ratio_stats(samples[name], samples["vanilla"])}
        rows.append(row)
    vanilla = memory["vanilla"].get("peak_bytes")
    for row in rows:
        if vanilla and row.get("peak_bytes"):
            row["peak_vs_vanilla"] = row["peak_bytes"] / vanilla
    return rows


def markdown(rows: list[dict], header: str) -> str:
    unit, scale = ("GiB", GIB) if any(r["config"]["device"].startswith("cuda") for r in rows) else ("MiB", 2.0 ** 20)
    lines = [header, "",
             f"| model | dtype | batch x seq | variant | peak ({unit}) | above start ({unit}) | planned above start "
             f"({unit}) | planned / measured | peak / vanilla | step (s) | time / vanilla [q25, q75] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        head = f"| {c['model']} ({c['layers']} layers) | {c['dtype']} | {c['batch']} x {c['seq']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{head} - | - | - | - | - | - | {r['error'][:150]} |")
            continue
        time_cells = "- | -"
        if "median_s" in r:
            q = r["ratio"]
            time_cells = f"{r['median_s']:.3f} | {q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]"
        rel = f"{r['peak_vs_vanilla']:.3f}" if "peak_vs_vanilla" in r else "-"
        plan_cells = "- | -"
        if r.get("planned_above_start_bytes") is not None:
            measured = r["peak_above_start_bytes"]
            plan_cells = (f"{r['planned_above_start_bytes'] / scale:.2f} | "
                          + (f"{r['planned_above_start_bytes'] / measured:.2f}" if measured > 0 else "-"))
        lines.append(f"{head} {r['peak_bytes'] / scale:.2f} | {r['peak_above_start_bytes'] / scale:.2f} | "
                     f"{plan_cells} | {rel} | {time_cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for results.json and results.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models (2 layers, 2 x 16 tokens)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 2 in a dry run)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="time for all timed rounds, shared by configs")
    ap.add_argument("--note", action="append", default=[], help="KEY=VALUE recorded in results.json (the script's "
                                                                "build and test outcome)")
    args = ap.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny models: threads only add overhead (and spin on a busy machine)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("no CUDA device: run with --dry-run for the CPU code path")
    presets = [p for p in args.presets.split(",") if p]
    repeats = args.repeats or (2 if args.dry_run else 5)
    configs = [dict(c, **DRY) if args.dry_run else dict(c) for c in CONFIGS]
    from fewbit_dist.ops import native

    started = time.perf_counter()
    rows = []
    for i, cfg in enumerate(configs):
        budget = (args.budget_s - (time.perf_counter() - started)) / (len(configs) - i)
        rows += run_config(cfg, presets, device, args.dry_run, repeats, max(budget, 0.0))
    info = {"machine": machine_info(str(device)), "versions": versions(), "dry_run": args.dry_run,
            "native": native.native_state(device.type), "notes": dict(n.split("=", 1) for n in args.note),
            "seconds": time.perf_counter() - started, "command": "python launch/gpu_check.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(info | {"rows": rows}, indent=1, sort_keys=True) + "\n")
    gpu = info["machine"].get("gpu", "CPU (dry run)")
    header = (f"# GPU check: peak memory and step time per preset\n\n{gpu}, torch {torch.__version__}, "
              f"{info['machine']['date']}; native {device.type} ops: {info['native']}; notes: {info['notes']}")
    text = markdown(rows, header)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
