"""Converting a model that a distributed wrapper already took over is an error; recognized with the real wrappers
(DDP, FSDP1, FSDP2's fully_shard, DeepSpeed's engine and ZeRO-3 hooks) in a one-process gloo group. A model whose
parameters `deepspeed.zero.Init` partitioned is not hooked yet: it converts, and then trains under ZeRO-3."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fewbit_dist
from fewbit_dist.integrations.sharding import check_not_sharded, sharding_wrapper, zero_partitioned

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (a file store: no port to collide with)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def test_plain_model_is_not_sharded():
    model = mlp()
    assert sharding_wrapper(model) is None and not zero_partitioned(model)
    check_not_sharded(model)


def test_ddp(process_group):
    from torch.nn.parallel import DistributedDataParallel

    inner = mlp()
    wrapped = DistributedDataParallel(inner)
    assert sharding_wrapper(wrapped) == "DistributedDataParallel"
    with pytest.raises(ValueError, match="already wrapped by DistributedDataParallel; convert it first"):
        fewbit_dist.convert(wrapped)
    outer = nn.Sequential(wrapped, nn.ReLU())  # a wrapper anywhere inside counts
    assert sharding_wrapper(outer) == "DistributedDataParallel"
    assert sharding_wrapper(inner) is None  # the module DDP wraps is not itself changed


def test_fsdp1(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(mlp(), device_id=torch.device("cpu"))
    assert sharding_wrapper(wrapped) == "FSDP (FullyShardedDataParallel)"
    with pytest.raises(ValueError, match=r"FSDP \(FullyShardedDataParallel\)"):
        fewbit_dist.convert(wrapped)


def test_fsdp2_fully_shard(process_group):
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    model = mlp()
    fully_shard(model[0])
    assert isinstance(model[0], FSDPModule) and isinstance(model[0].weight, DTensor)
    assert sharding_wrapper(model) == "FSDP2 (fully_shard)"
    with pytest.raises(ValueError, match="FSDP2"):
        fewbit_dist.convert(model, activation_bits=3)


def test_dtensor_parameters_without_a_wrapper(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = mlp()
    model[2].weight = nn.Parameter(distribute_tensor(model[2].weight.detach(), mesh, [Shard(0)]))
    assert sharding_wrapper(model) == "a DTensor-sharded model (FSDP2 / tensor parallel)"


ZERO3 = textwrap.dedent("""
    import os, sys
    import torch
    from torch import nn
    import deepspeed
    import fewbit_dist
    from fewbit_dist.integrations.sharding import sharding_wrapper, zero_partitioned

    deepspeed.init_distributed(dist_backend="gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1000000}
    with deepspeed.zero.Init(config_dict_or_path=config):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    weight = model[0].weight
    assert weight.numel() == 0 and weight.ds_numel == 128  # partitioned: the data lives in ds_tensor
    assert zero_partitioned(model) and sharding_wrapper(model) is None

    fewbit_dist.convert(model, activation_bits=3, linear_bits=8)  # fine before the hooks
    assert type(model[0]) is fewbit_dist.LowBitLinear and model[0].weight is weight
    assert type(model[1]) is fewbit_dist.GELU

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config,
                                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert sharding_wrapper(engine) == "deepspeed.initialize (DeepSpeedEngine)", sharding_wrapper(engine)
    assert sharding_wrapper(engine.module) == "DeepSpeed ZeRO-3 (its module hooks are installed)"
    try:
        fewbit_dist.convert(engine.module)
    except ValueError as exc:
        assert "ZeRO-3" in str(exc), exc
    else:
        raise AssertionError("converting a ZeRO-3-hooked model was accepted")

    x, target = torch.randn(2, 8), torch.randn(2, 4)
    losses = []
    for _ in range(3):  # the converted layers train under ZeRO-3 (gathered by the hooks on the new modules)
        loss = nn.functional.mse_loss(engine(x), target)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    print("ZERO3-OK", losses)
""")


@pytest.mark.slow
def test_zero_init_model_converts_and_a_hooked_one_is_refused(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", FEWBIT_NATIVE="0", PYTHONWARNINGS="ignore",
               LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    out = subprocess.run([sys.executable, "-c", ZERO3, str(tmp_path / "store")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0 and "ZERO3-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-5000:]


def test_sharding_detection_imports_no_framework():
    code = ("import sys, torch, fewbit_dist\n"
            "from fewbit_dist.integrations.sharding import sharding_wrapper\n"
            "m = torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
            "assert sharding_wrapper(m) is None\n"
            "print(sorted(k for k in ('deepspeed', 'torch.distributed.fsdp') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
