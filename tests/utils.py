"""Helpers that several test files share (fixtures and the dtype -> tolerance table live in conftest.py)."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch
from torch import nn

from fewbit_dist.ops import native

from conftest import TOL


def in_ci() -> bool:
    """True under continuous integration (CI set to anything but '', '0', 'false' or 'no')."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_unless_installed(installed: bool, what: str) -> None:
    """Skip a test whose real weights or text are missing (`what`, e.g. "SmolLM2 weights"); under CI, where
    FEWBIT_REAL setup installs them, fail instead."""
    if installed:
        return
    msg = f"{what} not installed (FEWBIT_REAL=1 bash scripts/setup.sh)"
    if in_ci():
        pytest.fail(msg + " but CI must run this test")
    pytest.skip(msg)


def require_native(device_type: str = "cpu"):
    """The loaded native module for `device_type`. A test that needs it is skipped under FEWBIT_NATIVE=0 (the
    reference asked for); where the kernels did not build it fails under CI, where they must build, and is
    skipped elsewhere."""
    if os.environ.get("FEWBIT_NATIVE", "").strip() == "0":
        pytest.skip("native kernels disabled by FEWBIT_NATIVE=0")
    mod = native.native_module(device_type)
    if mod is None:
        msg = f"native {device_type} kernels unavailable: {native.native_state(device_type)}"
        if in_ci():
            pytest.fail(f"{msg} (CI is set: a failed native build fails the run)")
        pytest.skip(msg)
    return mod


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the few-bit kernels compute in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def table_lookup_grad(tab, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A few-bit activation's gradient written out: levels[number of borders <= x] * grad, in opmath(x.dtype),
    returned in x's dtype (NaN gets code 0)."""
    om = opmath(x.dtype)
    xs = x.detach().to(om).contiguous()
    code = torch.searchsorted(torch.tensor(tab.borders, dtype=om), xs, right=True).masked_fill_(xs.isnan(), 0)
    return (torch.tensor(tab.levels, dtype=om)[code] * grad.to(om)).to(x.dtype)


def linear_pair(cls, n_in: int, n_out: int, dtype=torch.float32, **kwargs):
    """(cls(n_in, n_out, ...), an nn.Linear holding the same weight and bias), built after torch.manual_seed(0)."""
    torch.manual_seed(0)
    layer = cls(n_in, n_out, dtype=dtype, **kwargs)
    ref = nn.Linear(n_in, n_out, dtype=dtype)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def lowbit_saved_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """LowBitLinear's documented saved bytes: the packed codes plus a float32 (lo, scale) per group."""
    return math.ceil(rows * cols * bits / 8) + 8 * rows * math.ceil(cols / group_size)


def assert_product_close(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype=None) -> None:
    """`got` is the matrix product a @ b computed in `dtype` (default: got's): within TOL[dtype] of the float64
    product, the relative part taken of |a| @ |b| (the scale of a rounded dot product, cancellation or not)."""
    rtol, atol = TOL[dtype or got.dtype]
    a, b = a.detach().double(), b.detach().double()
    err = (got.detach().double() - a @ b).abs()
    allowed = atol + rtol * (a.abs() @ b.abs())
    assert got.shape == err.shape and (err <= allowed).all(), f"max error / allowed {(err / allowed).max().item():.3g}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def run_checked(cmd, cwd, env=None, timeout=1200) -> subprocess.CompletedProcess:
    """Run `cmd` (a list; items become str) in `cwd`; a non-zero exit fails the test with the output's tail."""
    cmd = [str(c) for c in cmd]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def check_autocast_exact_parts(y, y_ref, lin, ref, a, b):
    """Under bf16 autocast, a compressed linear `lin` on input `a` against nn.Linear `ref` on a copy `b`: the
    outputs are equal, the gradients come back in the fp32 of the leaves, and grad x and grad bias match
    within the bf16 tolerance. Backpropagates a random bf16 gradient through both and returns it."""
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn(*y.shape, dtype=torch.bfloat16)
    y.backward(g)
    y_ref.backward(g)
    for p in (a, lin.weight, lin.bias):
        assert p.grad.dtype == torch.float32
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=rtol, atol=atol)
    return g


def load_launch_script(name: str):
    """launch/NAME.py as a module (launch/ is a folder of scripts, not a package; its siblings importable)."""
    import importlib.util
    import sys
    from pathlib import Path

    launch = Path(__file__).resolve().parents[1] / "launch"
    if str(launch) not in sys.path:
        sys.path.insert(0, str(launch))
    spec = importlib.util.spec_from_file_location(name, launch / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
