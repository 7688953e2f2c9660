"""`import fewbit_dist` (and its convert, presets and report entry points) stays lean: no DeepSpeed, transformers,
accelerate or PEFT in sys.modules, and CUDA not initialized. Checked in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "transformers", "accelerate", "peft")

CHECK = """
import json, sys
import fewbit_dist
import fewbit_dist.convert
import fewbit_dist.presets
from fewbit_dist.integrations.sharding import sharding_wrapper
import torch

names = fewbit_dist.presets.list_presets()
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
assert sharding_wrapper(model) is None
fewbit_dist.convert(model, activation_bits=3)  # a conversion needs none of them either
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"heavy": heavy, "cuda_initialized": torch.cuda.is_initialized(), "presets": names}))
"""


def test_import_pulls_in_no_framework_and_no_cuda():
    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps(HEAVY)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], f"importing fewbit_dist imported {result['heavy']}"
    assert result["cuda_initialized"] is False
    assert result["presets"], "no presets found"


@pytest.mark.slow
@pytest.mark.parametrize("framework", HEAVY)
def test_the_check_sees_a_framework_that_is_imported(framework):
    """The same check run after importing a framework reports it (so the check above can fail)."""
    pytest.importorskip(framework)
    out = subprocess.run([sys.executable, "-c", f"import {framework}\n" + CHECK, json.dumps(HEAVY)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert framework in json.loads(out.stdout.strip().splitlines()[-1])["heavy"]
