"""The one benchmark harness: interleaved timing with medians and quantiles, machine info, and one
long-format results file (results/results.jsonl, one JSON object per measurement, appended)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "results.jsonl"

__all__ = ["machine_info", "time_interleaved", "append_results", "RESULTS", "sync"]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine_info(device: str = "cpu") -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    try:
        import fewbit_dist

        info["fewbit_dist"] = fewbit_dist.__version__
    except ImportError:  # pragma: no cover - the benchmarks run from the repo
        pass
    return info


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                     device: str = "cpu") -> dict[str, dict]:
    """Run every fn once per round, in turn, `repeats` rounds after `warmup`; seconds per call as
    {name: {"median", "q25", "q75", "samples"}}. Interleaving makes the ratios robust to machine noise."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                samples[name].append(time.perf_counter() - t0)
    out = {}
    for name, xs in samples.items():
        qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out[name] = {"median": statistics.median(xs), "q25": qs[0], "q75": qs[2], "samples": xs}
    return out


def ratio_stats(samples: list[float], base: list[float]) -> dict:
    """Per-round ratios of two interleaved series: their median and quartiles."""
    ratios = [a / b for a, b in zip(samples, base)]
    qs = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q25": qs[0], "q75": qs[2]}


def append_results(rows: list[dict], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
