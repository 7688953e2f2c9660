"""Few-bit activation kernels against torch: forward, backward and both, per function, bit-width and dtype.

    python launch/bench_kernels.py                      # CPU, GELU and SiLU, bits 1-4, fp32 and bf16, 16M elements
    python launch/bench_kernels.py --device cuda
    python launch/bench_kernels.py --quantize           # LowBitLinear's input quantization: fused one-pass kernel
                                                        # against the current path (8192 x 1024, bits 4 and 8)

Each configuration times torch.nn.<Act> and fewbit_dist.<Act>(bits=b) with the native kernels and with the
pure-PyTorch reference (FEWBIT_NATIVE=0), interleaved in one run; ratios are per-round ratios to torch,
median and quartiles. fwd: the forward with autograd recording; bwd: backward alone (the forward run
untimed before it); both: the two together. Rows are appended to results/results.jsonl.

--quantize times fewbit_dist.ops.native.quantize_groups (ranges, counter-based stochastic rounding and packing in
one pass, seed as a tensor) against the current path of fewbit_dist.functional.lowbit.quantize_input
(group_ranges, torch.rand noise from a seeded generator, quantize_pack), interleaved; ratio fused / current.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import append_results, machine_info, ratio_stats, sync, time_interleaved  # noqa: E402
import fewbit_dist  # noqa: E402
from fewbit_dist.ops import native  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Variant:
    """One module under test, with the FEWBIT_NATIVE mode it runs in."""

    def __init__(self, module, mode):
        self.module, self.mode = module, mode

    def __enter__(self):
        self.saved = os.environ.get("FEWBIT_NATIVE")
        if self.mode is not None:
            os.environ["FEWBIT_NATIVE"] = self.mode
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("FEWBIT_NATIVE", None)
        else:
            os.environ["FEWBIT_NATIVE"] = self.saved


def make_fns(variant, x, g, device):
    def fwd():
        with variant:
            return variant.module(x.detach().requires_grad_(True))

    state = {}

    def prepare_bwd():
        with variant:
            xi = x.detach().requires_grad_(True)
            state["y"] = variant.module(xi)

    def bwd():
        with variant:
            state["y"].backward(g)

    def both():
        with variant:
            xi = x.detach().requires_grad_(True)
            variant.module(xi).backward(g)

    return fwd, prepare_bwd, bwd, both


def bench(name, bits, dtype, numel, device, repeats):
    torch.manual_seed(0)
    x = torch.randn(numel, device=device, dtype=dtype)
    g = torch.randn(numel, device=device, dtype=dtype)
    variants = {"torch": Variant(getattr(torch.nn, name)(), None),
                "native": Variant(getattr(fewbit_dist, name)(bits=bits), ""),
                "reference": Variant(getattr(fewbit_dist, name)(bits=bits), "0")}
    fns = {k: make_fns(v, x, g, device) for k, v in variants.items()}
    timings = {}
    timings["fwd"] = time_interleaved({k: f[0] for k, f in fns.items()}, repeats=repeats, device=device)
    timings["both"] = time_interleaved({k: f[3] for k, f in fns.items()}, repeats=repeats, device=device)
    # Backward alone: run each forward untimed right before its timed backward, interleaved.
    bwd = {k: [] for k in fns}
    for _ in range(repeats + 1):
        for k, f in fns.items():
            f[1]()
            sync(device)
            t = time_interleaved({k: f[2]}, repeats=1, warmup=0, device=device)[k]["samples"][0]
            bwd[k].append(t)
    timings["bwd"] = {k: {"samples": v[1:]} for k, v in bwd.items()}
    rows = []
    for phase, tm in timings.items():
        for impl in ("native", "reference"):
            rows.append({"bench": "kernels", "activation": name, "bits": bits, "dtype": str(dtype).replace("torch.", ""),
                         "numel": numel, "phase": phase, "impl": impl,
                         "time_torch_ms": 1e3 * sorted(tm["torch"]["samples"])[len(tm["torch"]["samples"]) // 2],
                         "ratio_to_torch": ratio_stats(tm[impl]["samples"], tm["torch"]["samples"])})
    return rows


def bench_quantize(rows, cols, bits, dtype, device, repeats, group_size=128):
    """The fused quantizer (native, and its reference) against the current quantize_input path."""
    from fewbit_dist.functional.lowbit import quantize_input

    torch.manual_seed(0)
    x = torch.randn(rows, cols, device=device, dtype=dtype)
    seed = torch.tensor([12345], dtype=torch.int64)

    def current():
        return quantize_input(x, bits, group_size, "stochastic", 12345)

    def fused(mode):
        def fn():
            with Variant(None, mode):
                return native.quantize_groups(x, bits, group_size, seed)
        return fn

    tm = time_interleaved({"current": current, "fused": fused(""), "fused_reference": fused("0")}, repeats=repeats,
                          device=device)
    rows_out = []
    for impl in ("fused", "fused_reference"):
        rows_out.append({"bench": "quantize", "shape": [rows, cols], "bits": bits, "group_size": group_size,
                         "dtype": str(dtype).replace("torch.", ""), "impl": impl,
                         "time_current_ms": 1e3 * tm["current"]["median"], "time_ms": 1e3 * tm[impl]["median"],
                         "ratio_to_current": ratio_stats(tm[impl]["samples"], tm["current"]["samples"])})
    return rows_out


def main_quantize(args, argv, info) -> int:
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for dt in args.dtypes.split(","):
            rows += bench_quantize(8192, 1024, bits, DTYPES[dt], args.device, args.repeats)
    print("| shape | bits | dtype | current ms | fused ms | fused / current (median [q25, q75]) | reference / current |")
    print("|---|---|---|---|---|---|---|")
    for fused, ref in zip(rows[::2], rows[1::2]):
        q = fused["ratio_to_current"]
        print(f"| {fused['shape'][0]} x {fused['shape'][1]} | {fused['bits']} | {fused['dtype']} | "
              f"{fused['time_current_ms']:.1f} | {fused['time_ms']:.1f} | {q['median']:.3f} [{q['q25']:.3f}, "
              f"{q['q75']:.3f}] | {ref['ratio_to_current']['median']:.2f} |")
    for r in rows:
        r.update(info)
        r["command"] = "python launch/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.no_save:
        append_results(rows)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activations", default="GELU,SiLU")
    ap.add_argument("--bits", default="1,2,3,4")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--numel", type=int, default=16 * 2**20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--quantize", action="store_true", help="time the fused LowBitLinear quantizer instead "
                                                            "(--bits default 4,8 then)")
    args = ap.parse_args(argv)
    if args.quantize:
        if args.bits == ap.get_default("bits"):
            args.bits = "4,8"
        info = machine_info(args.device) | {"native": native.native_state(torch.device(args.device).type)}
        return main_quantize(args, argv, info)
    if not native.native_available(torch.device(args.device).type):
        print(f"native kernels unavailable on {args.device}: {native.native_state()}; 'native' rows time the reference")
    info = machine_info(args.device) | {"native": native.native_state()}
    rows = []
    for name in args.activations.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            for dt in args.dtypes.split(","):
                rows += bench(name, bits, DTYPES[dt], args.numel, args.device, args.repeats)
    print("| activation | bits | dtype | phase | torch ms | native / torch (median [q25, q75]) | reference / torch |")
    print("|---|---|---|---|---|---|---|")
    by_key = {}
    for r in rows:
        by_key.setdefault((r["activation"], r["bits"], r["dtype"], r["phase"]), {})[r["impl"]] = r
    for (act, bits, dt, phase), d in by_key.items():
        n, ref = d["native"]["ratio_to_torch"], d["reference"]["ratio_to_torch"]
        print(f"| {act} | {bits} | {dt} | {phase} | {d['native']['time_torch_ms']:.1f} | "
              f"{n['median']:.2f} [{n['q25']:.2f}, {n['q75']:.2f}] | {ref['median']:.2f} |")
    for r in rows:
        r.update(info)
        r["command"] = "python launch/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.no_save:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
