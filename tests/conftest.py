import os

import pytest
import torch

# Reproducible and quiet on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Central tolerance table: (rtol, atol) per dtype, for comparisons that are not bitwise by design.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3),
       torch.bfloat16: (8e-3, 8e-3)}


def awkward_inputs(dtype, seed=0):
    """Odd sizes, empty, one element, non-contiguous, numel not a multiple of 8, boundary values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 13, generator=g, dtype=torch.float64) * 3
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 0.5, -0.5, 20.0, -20.0, 1e-3], dtype=torch.float64)
    cases = {
        "odd": base,
        "empty": torch.empty(0, 5, dtype=torch.float64),
        "one": torch.tensor([0.7], dtype=torch.float64),
        "noncontig": base.t(),
        "strided": base[:, ::3],
        "prime": torch.randn(1009, generator=g, dtype=torch.float64) * 4,
        "boundaries": special,
        "3d": torch.randn(3, 5, 7, generator=g, dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in cases.items()}


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# Test files in the order of their total time on 2 cores (longest first, from `--durations`): scripts/test.sh runs
# the suite on two pytest-xdist workers that take whole files in collection order, so starting the long files
# first keeps one worker from finishing a long file alone at the end. Other files follow in their usual order.
LONGEST_FIRST = ("test_distributed.py", "test_trainer.py", "test_bench_peak.py", "test_benchmarks.py",
                 "test_train_hf.py", "test_native_build.py", "test_shipped_files.py", "test_linear.py",
                 "test_sharding.py", "test_plan.py", "test_bench_finetune.py", "test_decoder.py",
                 "test_decoder_distributed.py", "test_op_peaks.py", "test_compile.py", "test_checkpoint_boundaries.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
