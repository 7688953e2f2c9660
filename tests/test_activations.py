import inspect
import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fewbit_dist
import fewbit_dist.functional as FF
from fewbit_dist.memory import SavedTensorMeter
from fewbit_dist.quant import table

from conftest import awkward_inputs
from utils import table_lookup_grad

# (name, constructor kwargs, table name and params or None for piecewise)
CASES = [
    ("GELU", {}, ("gelu", {})),
    ("GELU", {"approximate": "tanh"}, ("gelu", {"approximate": "tanh"})),
    ("CELU", {"alpha": 2.0}, ("celu", {"alpha": 2.0})),
    ("ELU", {}, ("elu", {})),
    ("ELU", {"alpha": 0.5}, ("elu", {"alpha": 0.5})),
    ("Hardswish", {}, ("hardswish", {})),
    ("LogSigmoid", {}, ("logsigmoid", {})),
    ("Mish", {}, ("mish", {})),
    ("SELU", {}, ("selu", {})),
    ("Sigmoid", {}, ("sigmoid", {})),
    ("SiLU", {}, ("silu", {})),
    ("Softplus", {}, ("softplus", {})),
    ("Softplus", {"beta": 2.0, "threshold": 5.0}, ("softplus", {"beta": 2.0, "threshold": 5.0})),
    ("Softsign", {}, ("softsign", {})),
    ("Tanh", {}, ("tanh", {})),
    ("Tanhshrink", {}, ("tanhshrink", {})),
    ("ReLU", {}, None),
    ("LeakyReLU", {}, None),
    ("LeakyReLU", {"negative_slope": 0.2}, None),
    ("Threshold", {"threshold": 0.1, "value": 20.0}, None),
    ("Hardsigmoid", {}, None),
    ("Hardtanh", {}, None),
    ("Hardtanh", {"min_val": -2.0, "max_val": 3.0}, None),
    ("ReLU6", {}, None),
    ("Hardshrink", {}, None),
    ("Hardshrink", {"lambd": 0.3}, None),
    ("Softshrink", {"lambd": 0.7}, None),
]
IDS = [f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in kw.items()) if kw else ''}" for n, kw, _ in CASES]
SMOOTH = [c for c in CASES if c[2] is not None]
PIECEWISE = [c for c in CASES if c[2] is None]


def pair(name, kwargs, bits=3):
    ours = getattr(fewbit_dist, name)(**kwargs, **({"bits": bits} if name in fewbit_dist.SMOOTH_ACTIVATIONS else {}))
    return ours, getattr(nn, name)(**kwargs)


def test_all_21_activations_are_exported():
    assert len(fewbit_dist.SMOOTH_ACTIVATIONS) == 13 and len(fewbit_dist.PIECEWISE_ACTIVATIONS) == 8
    for name in fewbit_dist.SMOOTH_ACTIVATIONS + fewbit_dist.PIECEWISE_ACTIVATIONS:
        cls = getattr(fewbit_dist, name)
        assert issubclass(cls, getattr(nn, name))
        assert callable(getattr(FF, cls.__name__.lower().replace("leakyrelu", "leaky_relu")))


@pytest.mark.parametrize("name,kwargs,tab", CASES, ids=IDS)
def test_forward_identical_to_torch(name, kwargs, tab, dtype):
    ours, ref = pair(name, kwargs)
    for case, x in awkward_inputs(dtype).items():
        for requires_grad in (False, True):
            xi = x.clone().requires_grad_(requires_grad)
            try:
                expected = ref(x.clone())
            except RuntimeError:  # torch lacks this dtype: we must fail the same way
                with pytest.raises(RuntimeError):
                    ours(xi)
                continue
            got = ours(xi)
            assert got.dtype == expected.dtype and got.shape == expected.shape, case
            assert torch.equal(got, expected), (case, requires_grad)


@pytest.mark.parametrize("name,kwargs,tab", CASES, ids=IDS)
def test_functional_matches_torch_functional(name, kwargs, tab):
    fname = {"LeakyReLU": "leaky_relu", "ReLU6": "relu6"}.get(name, name.lower())
    ours, ref = getattr(FF, fname), getattr(TF, fname) if hasattr(TF, fname) else getattr(torch, fname)
    x = torch.randn(257, dtype=torch.float64, requires_grad=True) * 4
    args = list(kwargs.values()) if name == "Threshold" else []
    kw = {} if name == "Threshold" else kwargs
    assert torch.equal(ours(x, *args, **kw), ref(x, *args, **kw))


@pytest.mark.parametrize("name,kwargs,tab", PIECEWISE, ids=[i for i, c in zip(IDS, CASES) if c[2] is None])
def test_piecewise_gradients_exact(name, kwargs, tab, dtype):
    ours, ref = pair(name, kwargs)
    for case, x in awkward_inputs(dtype, seed=1).items():
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        try:
            ref(b).backward(g)
        except RuntimeError:
            continue
        ours(a).backward(g)
        assert torch.equal(a.grad, b.grad), case


@pytest.mark.parametrize("name,kwargs,tab", SMOOTH, ids=[i for i, c in zip(IDS, CASES) if c[2] is not None])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_smooth_gradient_is_the_table_lookup(name, kwargs, tab, bits, dtype):
    ours, ref = pair(name, kwargs, bits)
    t = table(tab[0], bits, **tab[1])
    for case, x in awkward_inputs(dtype, seed=2).items():
        a = x.clone().requires_grad_(True)
        g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        try:
            ref(x.clone())
        except RuntimeError:  # torch lacks this dtype for this op: ours must refuse it too, not compute it
            with pytest.raises(RuntimeError):
                ours(a).backward(g)
            continue
        ours(a).backward(g)
        assert a.grad.dtype == dtype
        assert torch.equal(a.grad, table_lookup_grad(t, x, g)), case


@pytest.mark.parametrize("name", ["GELU", "SiLU", "Tanh", "Sigmoid", "ELU", "Mish", "Softplus"])
def test_smooth_gradient_error_falls_with_bits(name):
    x = torch.randn(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    xe = x.clone().requires_grad_(True)
    getattr(nn, name)()(xe).sum().backward()
    errors = []
    for bits in range(1, 9):
        xq = x.clone().requires_grad_(True)
        getattr(fewbit_dist, name)(bits=bits)(xq).sum().backward()
        errors.append(((xq.grad - xe.grad).norm() / xe.grad.norm()).item())
    assert errors[1] > errors[2] > errors[3], errors  # 2 -> 3 -> 4 bits, strictly
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Measured (x ~ N(0, 4)): 3 bits 0.06-0.13 relative error, 8 bits below 0.005.
    assert errors[2] < 0.15 and errors[7] < 0.01, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gelu_saves_exactly_the_packed_codes(bits, dtype):
    n = 1_000_003
    x = torch.randn(n, dtype=dtype, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = fewbit_dist.GELU(bits=bits)(x)
    assert meter.nbytes == math.ceil(n * bits / 8)
    assert [r.dtype for r in meter.records] == [torch.uint8]
    y.sum().backward()  # and the graph still works


def test_relu_saves_one_bit_per_element():
    n = 1_000_003
    x = torch.randn(n, requires_grad=True)
    with SavedTensorMeter() as meter:
        fewbit_dist.ReLU()(x)
    assert meter.nbytes == math.ceil(n / 8)
    with SavedTensorMeter() as meter:
        nn.ReLU()(x)
    assert meter.nbytes == 4 * n  # what torch keeps: the fp32 output


@pytest.mark.parametrize("name,kwargs,tab", CASES, ids=IDS)
def test_every_activation_saves_ceil_n_bits_over_8(name, kwargs, tab):
    for bits in ([1, 2, 5, 8] if tab else [1]):
        ours, _ = pair(name, kwargs, bits)
        for n in (1, 7, 9, 1001):
            x = torch.randn(n, requires_grad=True)
            with SavedTensorMeter() as meter:
                ours(x)
            assert meter.nbytes == math.ceil(n * bits / 8), (bits, n)


def test_nothing_saved_without_autograd():
    x = torch.randn(100)
    with SavedTensorMeter() as meter:
        fewbit_dist.GELU()(x)
        fewbit_dist.GELU()(x.requires_grad_(True).detach())
        with torch.no_grad():
            fewbit_dist.GELU()(torch.randn(10, requires_grad=True))
    assert meter.nbytes == 0 and meter.saved_count == 0


INPLACE = [n for n in fewbit_dist.SMOOTH_ACTIVATIONS + fewbit_dist.PIECEWISE_ACTIVATIONS
           if "inplace" in inspect.signature(getattr(nn, n)).parameters]


@pytest.mark.parametrize("name", INPLACE)
def test_inplace_is_honoured(name):
    kwargs = {"threshold": 0.1, "value": -2.0} if name == "Threshold" else {}
    ours = getattr(fewbit_dist, name)(inplace=True, **kwargs)
    ref = getattr(nn, name)(**kwargs)
    leaf = torch.randn(50, dtype=torch.float64, requires_grad=True)
    x = leaf * 1.0
    out = ours(x)
    assert out is x and torch.equal(x, ref(leaf.detach()))
    g = torch.randn(50, dtype=torch.float64)
    out.backward(g)
    if name in fewbit_dist.PIECEWISE_ACTIVATIONS:  # exact: torch's own gradient
        exact = leaf.detach().clone().requires_grad_(True)
        ref(exact).backward(g)
        assert torch.equal(leaf.grad, exact.grad)
    else:  # the few-bit gradient of the input, not of the output that overwrote it
        assert torch.equal(leaf.grad, table_lookup_grad(table(name.lower(), 3), leaf, g))
    # Like torch: in place on a leaf that requires grad is an error, not a silent copy.
    with pytest.raises(RuntimeError, match="leaf Variable"):
        ours(torch.randn(5, requires_grad=True))
    # Without autograd the input itself is overwritten.
    y = torch.randn(20)
    expected = ref(y.clone())
    assert ours(y) is y and torch.equal(y, expected)


def test_inplace_only_where_torch_has_it():
    with pytest.raises(TypeError):
        fewbit_dist.GELU(inplace=True)
    with pytest.raises(TypeError):
        FF.tanh(torch.randn(3), inplace=True)


@pytest.mark.parametrize("name", fewbit_dist.SMOOTH_ACTIVATIONS + fewbit_dist.PIECEWISE_ACTIVATIONS)
def test_constructor_signature_matches_torch(name):
    ours = inspect.signature(getattr(fewbit_dist, name).__init__).parameters
    theirs = inspect.signature(getattr(nn, name).__init__).parameters
    plain = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)  # nn.Module.__init__(*args, **kwargs)
    expected = [(p.name, p.default) for p in theirs.values() if p.name != "self" and p.kind not in plain]
    got = [(p.name, p.default) for p in ours.values() if p.name not in ("self", "bits")]
    assert got == expected
    if name in fewbit_dist.SMOOTH_ACTIVATIONS:
        assert ours["bits"].kind is inspect.Parameter.KEYWORD_ONLY and ours["bits"].default == 3
    else:
        assert "bits" not in ours


def test_module_repr_state_and_attributes():
    m = fewbit_dist.ELU(alpha=0.5, bits=2)
    assert repr(m) == "ELU(alpha=0.5, bits=2)" and m.alpha == 0.5 and m.bits == 2
    assert m.state_dict() == {} and isinstance(m, nn.ELU)
    assert repr(fewbit_dist.ReLU()) == "ReLU(bits=1)"
    m.alpha = 2.0  # attributes stay live, as in torch
    x = torch.randn(10)
    assert torch.equal(m(x), TF.elu(x, 2.0))


@pytest.mark.parametrize("bits", [2, 6])
def test_nan_gets_code_zero(bits):
    x = torch.tensor([float("nan"), 0.5, -0.5], requires_grad=True)
    fewbit_dist.SiLU(bits=bits)(x).sum().backward()
    assert x.grad[0].item() == torch.tensor(table("silu", bits).levels[0], dtype=torch.float32).item()


def test_double_backward_is_refused():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = fewbit_dist.GELU()(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("bad,exc,msg", [(0, ValueError, "bits must be an int in 1..8"),
                                         (9, ValueError, "bits must be an int in 1..8"),
                                         (2.5, TypeError, "bits must be an int"), (True, TypeError, "bits must be an int")])
def test_bad_bits(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        fewbit_dist.GELU(bits=bad)
    with pytest.raises(exc, match=msg):
        FF.silu(torch.randn(3, requires_grad=True), bits=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fewbit_dist.GELU("erf")
    with pytest.raises(ValueError, match="max_val .* must be >= min_val"):
        fewbit_dist.Hardtanh(2.0, 1.0)
    with pytest.raises(ValueError, match="lambd must be >= 0"):
        fewbit_dist.Softshrink(-1.0)
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        fewbit_dist.LeakyReLU("0.1")
    with pytest.raises(ValueError, match="alpha must be non-zero"):
        fewbit_dist.CELU(alpha=0.0)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fewbit_dist.GELU()([1.0, 2.0])
    with pytest.raises(TypeError, match="inplace must be a bool"):
        FF.relu(torch.randn(3), inplace="yes")
