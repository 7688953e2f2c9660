"""fewbit_dist.validation: a wrong type raises TypeError, a wrong value of the right type ValueError, and every
message names the argument, what is allowed and what was given; the same rule holds at the public entry points."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import fewbit_dist
import fewbit_dist.functional as FF
from fewbit_dist import FewBitConfig
from fewbit_dist.functional.dropout import check_dropout_p
from fewbit_dist.functional.gated import gated_product
from fewbit_dist.functional.layer_norm import layer_norm
from fewbit_dist.functional.lowbit import check_lowbit_args
from fewbit_dist.functional.norm import rms_norm
from fewbit_dist.nn.linear import check_projection_args
from fewbit_dist.quant import packing
from fewbit_dist.quant.tables import table
from fewbit_dist.validation import (check_bits, check_bool, check_callable, check_choice, check_generator, check_int,
                                    check_optional_bits, check_optional_int, check_real, check_tensor)

# ------------------------------------------------------------------------------------------ each validator

# (validator with its settings, the argument's name, what the message says is allowed, values of the wrong
# type, values of the right type but out of range)
VALIDATORS = [
    (lambda v: check_int(v, "rows", 1, 8), "rows", "an int in 1..8", [3.0, True, "3", None], [0, 9, -1]),
    (lambda v: check_int(v, "size", lo=1), "size", "a positive int", [2.5, False], [0, -4]),
    (lambda v: check_int(v, "n", lo=0), "n", "an int >= 0", [0.0], [-1]),
    (lambda v: check_optional_int(v, "proj_dim", lo=1), "proj_dim", "a positive int or None", [2.5, True, "4"], [0]),
    (lambda v: check_bits(v), "bits", "an int in 1..8", [3.0, True], [0, 9]),
    (lambda v: check_bits(v, "linear_bits", 2, 8), "linear_bits", "an int in 2..8", [4.0, "4"], [1, 9]),
    (lambda v: check_optional_bits(v, "activation_bits"), "activation_bits", "an int in 1..8 or None", ["3"], [9]),
    (lambda v: check_real(v, "p", 0, 1), "p", "a number in [0, 1]", ["0.5", True, None, [0.5]],
     [-0.1, 1.5, float("nan"), float("inf")]),
    (lambda v: check_real(v, "ratio", 0, 1, lo_open=True), "ratio", "a number in (0, 1]", [False], [0, 0.0, 2]),
    (lambda v: check_real(v, "x", 0, 1, hi_open=True), "x", "a number in [0, 1)", [b"1"], [1, 1.0]),
    (lambda v: check_real(v, "eps", lo=0), "eps", "a finite number >= 0", ["1e-5"], [-1e-9, float("inf")]),
    (lambda v: check_real(v, "t", lo=0, lo_open=True), "t", "a finite number > 0", [None], [0.0]),
    (lambda v: check_bool(v, "inplace"), "inplace", "a bool", [1, "yes", None], []),
    (lambda v: check_choice(v, "rounding", ("stochastic", "nearest")), "rounding", "one of ('stochastic', 'nearest')",
     [1, None, ["nearest"]], ["floor", "Nearest"]),
    (lambda v: check_choice(v, "mode", (None, "exact")), "mode", "one of (None, 'exact')", [0, True], ["fast"]),
    (lambda v: check_choice(v, "width", (2, 4)), "width", "one of (2, 4)", [True, 2.0, "2"], [3]),
    (lambda v: check_callable(v, "act"), "act", "callable", [3, "relu", None], []),
    (lambda v: check_tensor(v, "x", min_dim=1), "x", "a tensor", [[1.0], 1.0, None], [torch.tensor(1.0)]),
    (lambda v: check_tensor(v, "bias", optional=True), "bias", "a tensor or None", [[0.0], np.zeros(3)], []),
    (lambda v: check_generator(v), "generator", "a torch.Generator or None", [3, "cpu", torch.device("cpu")], []),
]
VALIDATOR_IDS = [f"{i}-{case[1]}" for i, case in enumerate(VALIDATORS)]


@pytest.mark.parametrize("check,name,allowed,bad_types,bad_values", VALIDATORS, ids=VALIDATOR_IDS)
def test_a_wrong_type_is_a_type_error(check, name, allowed, bad_types, bad_values):
    for value in bad_types:
        with pytest.raises(TypeError) as info:
            check(value)
        msg = str(info.value)
        assert msg.startswith(f"{name} must be {allowed}"), msg
        assert f"got {type(value).__name__}" in msg, msg  # what was given: its type


@pytest.mark.parametrize("check,name,allowed,bad_types,bad_values", VALIDATORS, ids=VALIDATOR_IDS)
def test_a_wrong_value_is_a_value_error(check, name, allowed, bad_types, bad_values):
    for value in bad_values:
        with pytest.raises(ValueError) as info:
            check(value)
        msg = str(info.value)
        assert msg.startswith(f"{name} must "), msg
        if not isinstance(value, torch.Tensor):
            assert msg.startswith(f"{name} must be {allowed}") and msg.endswith(f"got {value!r}"), msg


def test_good_values_come_back():
    assert check_int(3, "n", 1, 8) == 3 and type(check_int(np.int64(3), "n", 1, 8)) is int
    assert check_optional_int(None, "n", lo=1) is None and check_optional_int(5, "n", lo=1) == 5
    assert check_bits(1) == 1 and check_bits(8) == 8 and check_bits(2, "b", 2, 8) == 2
    assert check_optional_bits(None) is None and check_optional_bits(3) == 3
    for value, expected in ((0, 0.0), (1, 1.0), (0.25, 0.25), (np.float32(0.5), 0.5)):
        got = check_real(value, "p", 0, 1)
        assert got == expected and type(got) is float
    assert check_real(1e-12, "r", 0, 1, lo_open=True) == 1e-12 and check_real(-5, "any") == -5.0
    assert check_bool(False, "flag") is False
    assert check_choice("nearest", "r", ("stochastic", "nearest")) == "nearest"
    assert check_choice(None, "mode", (None, "exact")) is None and check_choice(4, "w", (2, 4)) == 4
    assert check_callable(len, "f") is len
    t = torch.zeros(2)
    assert check_tensor(t, "x", min_dim=1) is t and check_tensor(None, "w", optional=True) is None
    g = torch.Generator()
    assert check_generator(g) is g and check_generator(None) is None


def test_long_values_are_cut_in_messages():
    with pytest.raises(TypeError) as info:
        check_int("x" * 1000, "n")
    assert len(str(info.value)) < 150 and str(info.value).endswith("...")


def test_the_module_imports_nothing_from_the_package():
    """ops (below autograd) use the validators too, so validation.py must sit below everything."""
    path = Path(fewbit_dist.__file__).with_name("validation.py")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("fewbit_dist"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("fewbit_dist") for a in node.names)


# ------------------------------------------------------------------ the existing validators delegate

@pytest.mark.parametrize("call,name,bad_type,bad_value", [
    (lambda v: packing.check_bits(v), "bits", 2.0, 9),
    (lambda v: packing.check_bits(v, "code_bits"), "code_bits", True, 0),
    (lambda v: check_lowbit_args(v, 128, "nearest"), "bits", 4.0, 1),
    (lambda v: check_lowbit_args(4, v, "nearest"), "group_size", True, 0),
    (lambda v: check_lowbit_args(4, 128, v), "rounding", 0, "floor"),
    (lambda v: check_lowbit_args(v, 1, "nearest", names=("norm_bits", "g", "r")), "norm_bits", "8", 12),
    (lambda v: check_projection_args(proj_dim_ratio=v), "proj_dim_ratio", "0.2", 1.5),
    (lambda v: check_projection_args(proj_dim=v), "proj_dim", 2.5, 0),
    (lambda v: check_projection_args(proj_dim=4, proj_dim_max=v), "proj_dim_max", 3.0, -1),
    (lambda v: check_dropout_p(v), "dropout probability p", None, 1.01),
])
def test_existing_validators_follow_the_rule(call, name, bad_type, bad_value):
    with pytest.raises(TypeError, match=f"^{name} must be"):
        call(bad_type)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        call(bad_value)


def test_inconsistent_combinations_are_value_errors():
    with pytest.raises(ValueError, match="exactly one of proj_dim_ratio"):
        check_projection_args()
    with pytest.raises(ValueError, match=r"proj_dim_min \(8\) must be <= proj_dim_max \(4\)"):
        check_projection_args(proj_dim_ratio=0.5, proj_dim_min=8, proj_dim_max=4)
    with pytest.raises(ValueError, match="either low-bit or sketched"):
        FewBitConfig(linear_bits=4, proj_dim_ratio=0.2)


# ---------------------------------------------------------------------------- end to end, public entry points

def _x():
    return torch.randn(2, 8, requires_grad=True)


NA = object()  # no value makes this kind of mistake for that argument

# (what is called, the argument's name as the caller calls it, a value of the wrong type, a value out of range)
ENTRY_POINTS = [
    ("LowBitLinear.bits", lambda v: fewbit_dist.LowBitLinear(4, 4, bits=v), "bits", 4.0, 9),
    ("LowBitLinear.group_size", lambda v: fewbit_dist.LowBitLinear(4, 4, group_size=v), "group_size", True, 0),
    ("LowBitLinear.rounding", lambda v: fewbit_dist.LowBitLinear(4, 4, rounding=v), "rounding", 1, "floor"),
    ("LowBitLinear.generator", lambda v: fewbit_dist.LowBitLinear(4, 4, generator=v), "generator", 7, NA),
    ("RandomizedLinear.proj_dim", lambda v: fewbit_dist.RandomizedLinear(4, 4, proj_dim=v), "proj_dim", 2.5, 0),
    ("RandomizedLinear.proj_dim_ratio", lambda v: fewbit_dist.RandomizedLinear(4, 4, proj_dim_ratio=v),
     "proj_dim_ratio", "0.2", 1.5),
    ("RandomizedLinear.proj_dim_min", lambda v: fewbit_dist.RandomizedLinear(4, 4, proj_dim_ratio=0.2, proj_dim_min=v),
     "proj_dim_min", 2.0, 0),
    ("RandomizedLinear.sketch", lambda v: fewbit_dist.RandomizedLinear(4, 4, proj_dim=2, sketch=v), "sketch", 3, "dct"),
    ("Dropout.p", lambda v: fewbit_dist.Dropout(v), "p", "0.5", 1.5),
    ("GELU.bits", lambda v: fewbit_dist.GELU(bits=v), "GELU: bits", 2.5, 0),
    ("SiLU.bits", lambda v: fewbit_dist.SiLU(bits=v), "SiLU: bits", True, 9),
    ("functional.gelu.bits", lambda v: FF.gelu(_x(), bits=v), "gelu: bits", "3", 12),
    ("functional.relu.inplace", lambda v: FF.relu(_x(), inplace=v), "relu: inplace", "yes", NA),
    ("FewBitActivation.source", lambda v: fewbit_dist.nn.activations.FewBitActivation(v), "source", 3, NA),
    ("rms_norm.mode", lambda v: rms_norm(_x(), torch.ones(8), 1e-6, mode=v), "mode", 1, "fast"),
    ("rms_norm.style", lambda v: rms_norm(_x(), torch.ones(8), 1e-6, style=v), "style", None, "layernorm"),
    ("rms_norm.eps", lambda v: rms_norm(_x(), torch.ones(8), v), "eps", "1e-6", -1.0),
    ("rms_norm.bits", lambda v: rms_norm(_x(), torch.ones(8), 1e-6, mode="compressed", bits=v), "bits", 8.0, 1),
    ("rms_norm.x", lambda v: rms_norm(v, torch.ones(8), 1e-6), "x", [1.0] * 8, NA),
    ("gated_product.mode", lambda v: gated_product(_x(), _x(), torch.sigmoid, mode=v), "mode", 1, "fast"),
    ("gated_product.act", lambda v: gated_product(_x(), _x(), v), "act", "silu", NA),
    ("gated_product.bits", lambda v: gated_product(_x(), _x(), torch.sigmoid, bits=v), "bits", True, 9),
    ("gated_product.generator", lambda v: gated_product(_x(), _x(), torch.sigmoid, generator=v), "generator", 1, NA),
    ("layer_norm.mode", lambda v: layer_norm(_x(), None, None, mode=v), "mode", 2, "fast"),
    ("layer_norm.eps", lambda v: layer_norm(_x(), None, None, v), "eps", None, float("nan")),
    ("layer_norm.group_size", lambda v: layer_norm(_x(), None, None, group_size=v), "group_size", 1.5, 0),
    ("layer_norm.weight", lambda v: layer_norm(_x(), v, None), "weight", [1.0] * 8, torch.ones(7)),
    ("table.weight", lambda v: table("gelu", 3, weight=v), "weight", 1, "cauchy"),
    ("table.bits", lambda v: table("gelu", v), "bits", 3.0, 9),
    ("table.domain", lambda v: table("gelu", 3, domain=(v, 1.0)), "domain's lo", "-1", float("-inf")),
]
for _field, _bad_type, _bad_value in [
        ("activation_bits", "3", 9), ("linear_bits", 4.0, 1), ("linear_group_size", True, 0),
        ("linear_rounding", 0, "up"), ("norm_mode", 1, "fast"), ("norm_bits", 8.0, 9), ("gated_mlp_mode", True, "x"),
        ("gated_mlp_bits", "8", 1), ("loss_chunk_rows", 2.5, 0), ("checkpoint_boundary_bits", 4.0, 9),
        ("proj_dim_ratio", "0.2", 0.0), ("proj_dim", 2.5, -3), ("sketch", 3, "dct"), ("compress_dropout", 1, NA),
        ("exact_linear", "no", NA), ("convert_transformers", None, NA)]:
    ENTRY_POINTS.append((f"FewBitConfig.{_field}", lambda v, f=_field: FewBitConfig(**{f: v}), _field, _bad_type,
                         _bad_value))
ENTRY_POINTS.append(("FewBitConfig.overrides", lambda v: FewBitConfig(overrides=[{"pattern": "a", "linear_bits": v}]),
                     "linear_bits", 4.0, 12))
ENTRY_POINTS.append(("FewBitConfig.from_dict", lambda v: FewBitConfig.from_dict({"linear": {"group_size": v}}),
                     "linear_group_size", "128", -1))


@pytest.mark.parametrize("label,call,name,bad_type,bad_value", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_entry_points_follow_the_rule(label, call, name, bad_type, bad_value):
    with pytest.raises(TypeError) as info:
        call(bad_type)
    assert f"{name} must be" in str(info.value), str(info.value)
    if bad_value is not NA:
        with pytest.raises(ValueError) as info:
            call(bad_value)
        assert f"{name} must" in str(info.value), str(info.value)
