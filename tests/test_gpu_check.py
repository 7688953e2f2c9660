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


def test_cuda_build_without_deepspeed_uses_cpp_extension(monkeypatch):
    """The script's build step loads the CUDA ops through the loader: where DeepSpeed is missing, the loader
    builds the same sources with torch.utils.cpp_extension instead of failing."""
    import torch.utils.cpp_extension as cpp

    from fewbit_dist.ops import builder, loader

    def no_deepspeed():
        raise ModuleNotFoundError("No module named 'deepspeed'")

    calls = []
    monkeypatch.setattr(builder, "jit_load_cuda", no_deepspeed)
    monkeypatch.setattr(builder, "clear_stale_lock", lambda name: None)
    monkeypatch.setattr(cpp, "load", lambda **kw: calls.append(kw) or "module")
    assert loader._jit_load("jit_load_cuda") == ("module", "jit (cpp_extension)")
    assert calls[0]["name"] == builder.CUDA_NAME and calls[0]["sources"] == builder.cuda_sources()
    assert not any("fast_math" in flag for flag in calls[0]["extra_cuda_cflags"])  # the reference's bytes

    def broken():
        raise ImportError("cannot import name 'x' from 'somewhere'")

    monkeypatch.setattr(builder, "jit_load_cuda", broken)  # other import errors are not hidden
    with pytest.raises(ImportError, match="somewhere"):
        loader._jit_load("jit_load_cuda")
