"""scripts/gpu_check.sh: its CPU dry run (tiny models, the measuring code path of the GPU check) writes results
for every configuration and variant; bad arguments are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args, timeout=240):
    # FEWBIT_NATIVE=0: the dry run checks the harness, not the kernels (and never waits for a native build)
    env = dict(os.environ, PYTHON=sys.executable, FEWBIT_NATIVE="0")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_dry_run_writes_every_config_and_variant(tmp_path):
    out = run(str(tmp_path / "gpu"), "--dry-run")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu" / "results.json").read_text())
    assert result["dry_run"] is True and result["machine"]["device"] == "cpu"
    rows = result["rows"]
    assert {(r["config"]["model"], r["config"]["dtype"]) for r in rows} == {("roberta-base", "fp32"),
                                                                             ("smollm2", "bf16")}
    for model in ("roberta-base", "smollm2"):
        variants = {r["variant"]: r for r in rows if r["config"]["model"] == model}
        assert set(variants) == {"vanilla", "exact", "safe", "max-saving", "fewbit-paper"}
        for name, r in variants.items():
            assert r["config"]["layers"] == 2 and (r["config"]["batch"], r["config"]["seq"]) == (2, 16)
            if r["status"] == "ok":  # a preset that does not resolve is recorded with its error instead
                assert r["peak_bytes"] > 0 and r["median_s"] > 0 and len(r["samples_s"]) >= 2
                assert r.get("planned_above_start_bytes", 0) > 0, r.get("planned_error")  # the planner beside it
                assert r["ratio"]["q25"] <= r["ratio"]["median"] <= r["ratio"]["q75"]
            else:
                assert r["error"], name
        assert variants["vanilla"]["status"] == "ok" and variants["vanilla"]["ratio"]["median"] == 1.0
    text = (tmp_path / "gpu" / "results.md").read_text()
    assert "| roberta-base (2 layers) | fp32 | 2 x 16 | vanilla |" in text
    assert "| smollm2 (2 layers) | bf16 | 2 x 16 | max-saving |" in text


def test_bad_arguments_print_the_usage(tmp_path):
    for args in ((), (str(tmp_path), "--dryrun"), (str(tmp_path), "--dry-run", "x")):
        out = run(*args, timeout=30)
        assert out.returncode == 2 and "usage:" in out.stderr, args


def test_cuda_build_without_deepspeed_uses_cpp_extension(monkeypatch, tmp_path):
    """The script's build step loads the CUDA ops through the loader: where DeepSpeed is missing, the builder
    builds the same (staged) sources with torch.utils.cpp_extension instead of failing."""
    import torch.utils.cpp_extension as cpp

    from fewbit_dist.ops import builder

    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(builder, "_route", lambda: "torch")
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw) or "module")
    module, info = builder.jit_load("cuda")
    assert module == "module" and info["route"] == "torch" and info["compiled"]
    assert calls[0]["name"] == info["name"] and info["name"].startswith(builder.CUDA_NAME)
    assert calls[0]["sources"] == builder.cuda_sources(info["folder"] / "src")
    assert not any("fast_math" in flag for flag in calls[0]["extra_cuda_cflags"])  # the reference's bytes
    assert f"-DFEWBIT_BUILD_HASH={info['build_hash']}" in calls[0]["extra_cuda_cflags"]
