"""A replaced module keeps what users attached to it (fewbit_dist.util.carry_over): hooks of every kind, accelerate's
hook, parametrizations, requires_grad, training mode, device, extra attributes. Each kind is a real hook on a
real module (nn.GELU, nn.Linear), converted with convert_linear / carry_over and with fewbit_dist.convert."""

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import fewbit_dist
from fewbit_dist import LowBitLinear
from fewbit_dist.util import carry_over, convert_linear


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    monkeypatch.setenv("FEWBIT_NATIVE", "0")  # these tests are about modules, not kernels


def gelu_pair():
    old = nn.GELU()
    return old, fewbit_dist.GELU(bits=3)


def linear_pair(**kw):
    torch.manual_seed(0)
    old = nn.Linear(6, 5, **kw)
    return old, lambda: convert_linear(old, LowBitLinear, bits=8)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, 8), act=nn.GELU(), fc2=nn.Linear(8, 4)))


def convert_model(model):
    return fewbit_dist.convert(model, activation_bits=3, linear_bits=8)


# ------------------------------------------------------------------------------------------ forward hooks

def test_forward_hook_on_gelu_fires_on_the_replacement_with_its_arguments():
    old, new = gelu_pair()
    calls = []
    old.register_forward_hook(lambda m, args, out: calls.append((m, args, out)))
    carry_over(old, new)
    x = torch.randn(3, 4)
    y = new(x)
    assert len(calls) == 1
    module, args, out = calls[0]
    assert module is new and args[0] is x and out is y


def test_forward_hook_on_linear_via_convert_linear():
    old, convert = linear_pair()
    calls = []
    old.register_forward_hook(lambda m, args, out: calls.append((type(m), args[0].shape, out.shape)))
    new = convert()
    assert isinstance(new, LowBitLinear)
    new(torch.randn(2, 6))
    assert calls == [(LowBitLinear, torch.Size([2, 6]), torch.Size([2, 5]))]


def test_forward_hook_with_kwargs_and_a_returned_output():
    old, new = gelu_pair()
    seen = {}

    def hook(module, args, kwargs, output):
        seen["kwargs"] = kwargs
        return output + 1

    old.register_forward_hook(hook, with_kwargs=True)
    carry_over(old, new)
    x = torch.randn(5)
    torch.testing.assert_close(new(input=x), torch.nn.functional.gelu(x) + 1)
    assert set(seen["kwargs"]) == {"input"}


def test_always_called_forward_hook_fires_when_forward_raises():
    old, convert = linear_pair()
    calls = []
    old.register_forward_hook(lambda m, args, out: calls.append(type(m)), always_call=True)
    new = convert()
    with pytest.raises(RuntimeError):
        new(torch.randn(2, 7))  # wrong width
    assert calls == [LowBitLinear]


def test_forward_pre_hooks_change_the_input_and_keep_their_order():
    old, new = gelu_pair()
    order = []

    def double(module, args):
        order.append("double")
        return (args[0] * 2,)

    def first(module, args, kwargs):
        order.append("first")
        return None

    old.register_forward_pre_hook(double)
    old.register_forward_pre_hook(first, with_kwargs=True, prepend=True)
    carry_over(old, new)
    x = torch.randn(4)
    torch.testing.assert_close(new(x), torch.nn.functional.gelu(2 * x))
    assert order == ["first", "double"]


def test_handles_taken_before_conversion_still_remove_the_hooks():
    old, convert = linear_pair()
    calls = []
    handle = old.register_forward_hook(lambda m, args, out: calls.append(1))
    pre = old.register_forward_pre_hook(lambda m, args: calls.append(0))
    new = convert()
    new(torch.randn(1, 6))
    handle.remove()
    pre.remove()
    new(torch.randn(1, 6))
    assert calls == [0, 1]
    assert not new._forward_hooks and not new._forward_pre_hooks


def test_carrying_twice_does_not_fire_hooks_twice():
    old, new = gelu_pair()
    calls = []
    old.register_forward_hook(lambda m, args, out: calls.append(1))
    carry_over(old, new)
    carry_over(old, new)
    new(torch.randn(3))
    assert calls == [1]


def test_the_replacements_own_hooks_run_after_the_users():
    old, new = gelu_pair()
    order = []
    old.register_forward_hook(lambda m, a, o: order.append("user"))
    new.register_forward_hook(lambda m, a, o: order.append("own"))
    carry_over(old, new)
    new(torch.randn(3))
    assert order == ["user", "own"]


# ----------------------------------------------------------------------------------------- backward hooks

def test_full_backward_hook_and_backward_pre_hook():
    old, new = gelu_pair()
    grads = {}
    old.register_full_backward_pre_hook(lambda m, grad_out: grads.update(pre=(m, grad_out[0].clone())))
    old.register_full_backward_hook(lambda m, grad_in, grad_out: grads.update(post=(m, grad_in[0].clone())))
    carry_over(old, new)
    x = torch.randn(6, requires_grad=True)
    g = torch.randn(6)
    new(x).backward(g)
    assert grads["pre"][0] is new and grads["post"][0] is new
    torch.testing.assert_close(grads["pre"][1], g)
    torch.testing.assert_close(grads["post"][1], x.grad)
    assert new._is_full_backward_hook is True


def test_legacy_backward_hook_keeps_its_kind():
    old, convert = linear_pair()
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch discourages register_backward_hook
        old.register_backward_hook(lambda m, gi, go: calls.append(type(m)))
    new = convert()
    assert new._is_full_backward_hook is False
    new(torch.randn(2, 6, requires_grad=True)).sum().backward()
    assert calls == [LowBitLinear]
    with pytest.raises(RuntimeError, match="Cannot use both regular backward hooks and full backward hooks"):
        new.register_full_backward_hook(lambda m, gi, go: None)  # torch's own rule, still enforced


# --------------------------------------------------------------------------------------- state-dict hooks

def test_state_dict_hooks_run_on_the_replacement():
    old, convert = linear_pair()
    seen = []
    old.register_state_dict_pre_hook(lambda m, prefix, keep_vars: seen.append(("pre", m)))
    old.register_state_dict_post_hook(lambda m, sd, prefix, meta: seen.append(("post", m, sorted(sd))))
    old.register_load_state_dict_pre_hook(lambda m, sd, prefix, *rest: seen.append(("load-pre", m)))
    old.register_load_state_dict_post_hook(lambda m, incompatible: seen.append(("load-post", m)))
    new = convert()
    del old  # the load pre-hook held it weakly: it must now refer to the replacement
    sd = new.state_dict()
    new.load_state_dict(sd)
    assert seen == [("pre", new), ("post", new, ["bias", "weight"]), ("load-pre", new), ("load-post", new)]


# ---------------------------------------------------------------------------------------- accelerate hooks

def test_accelerate_model_hook_is_carried():
    hooks = pytest.importorskip("accelerate.hooks")

    class Shift(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return (args[0] + 1,), kwargs

        def post_forward(self, module, output):
            return output * 3

    old, convert = linear_pair()
    hooks.add_hook_to_module(old, Shift())
    x = torch.randn(2, 6)
    expected = old(x)
    torch.testing.assert_close(expected, nn.functional.linear(x + 1, old.weight, old.bias) * 3)
    new = convert()
    assert new._hf_hook is old._hf_hook
    torch.testing.assert_close(new(x), expected)
    hooks.remove_hook_from_module(new)  # and accelerate can take it off again
    torch.testing.assert_close(new(x), nn.functional.linear(x, old.weight, old.bias))


def test_accelerate_offloading_hook_is_carried():
    hooks = pytest.importorskip("accelerate.hooks")
    old, convert = linear_pair()
    hooks.add_hook_to_module(old, hooks.AlignDevicesHook(execution_device="cpu", offload=True))
    assert old.weight.device.type == "meta"  # the weights live in the hook's weights_map between calls
    x = torch.randn(3, 6)
    expected = old(x)
    new = convert()
    torch.testing.assert_close(new(x), expected)
    assert new.weight.device.type == "meta"
    hooks.remove_hook_from_module(new)  # detaching restores the weights to where they were before offloading
    assert new.weight.device.type == "cpu"
    torch.testing.assert_close(new(x), expected)


# --------------------------------------------------------------------------------------- parametrizations

class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def test_parametrized_linear_is_converted_and_keeps_its_parametrization():
    torch.manual_seed(0)
    old = nn.Linear(5, 5)
    parametrize.register_parametrization(old, "weight", Symmetric())
    original = old.parametrizations.weight.original
    x = torch.randn(4, 5)
    expected = old(x)
    new = convert_linear(old, LowBitLinear, bits=8)
    assert isinstance(new, LowBitLinear) and parametrize.is_parametrized(new, "weight")
    assert new.parametrizations.weight.original is original
    torch.testing.assert_close(new.weight, new.weight.T)
    torch.testing.assert_close(new(x), expected)
    assert sorted(new.state_dict()) == sorted(old.state_dict())
    new(x).sum().backward()
    assert original.grad is not None and new.bias.grad is not None


def test_weight_norm_parametrization_is_carried_and_loads_old_checkpoints():
    torch.manual_seed(0)
    old = parametrizations.weight_norm(nn.Linear(6, 3))
    x = torch.randn(2, 6)
    expected = old(x)
    checkpoint = {k: v.clone() for k, v in old.state_dict().items()}
    new = convert_linear(old, LowBitLinear, bits=8)
    torch.testing.assert_close(new(x), expected)
    with torch.no_grad():
        new.parametrizations.weight.original0.mul_(2)  # change g, then restore it from the checkpoint
    new.load_state_dict(checkpoint)
    torch.testing.assert_close(new(x), expected)


def test_deprecated_weight_norm_linear_is_left_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = nn.utils.weight_norm(nn.Linear(4, 4))  # weight recomputed into a plain attribute by a pre-hook
    assert convert_linear(old, LowBitLinear, bits=8) is old


# ----------------------------------------------------------------------- parameters, mode, device, attributes

def test_requires_grad_and_training_mode_are_kept():
    old, convert = linear_pair()
    old.weight.requires_grad_(False)
    old.eval()
    new = convert()
    assert new.weight is old.weight and not new.weight.requires_grad and new.bias.requires_grad
    assert new.training is False


def test_new_tensors_follow_the_old_modules_device():
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4.0))

    old = nn.Linear(3, 3, device="meta")
    new = carry_over(old, WithTable())
    assert new.table.device.type == "meta"


def test_extra_attributes_are_copied_and_bound_methods_rebound():
    old, new = gelu_pair()
    old.tag = "encoder.act"
    old._is_hf_initialized = True
    old.describe = (lambda self: f"{type(self).__name__}").__get__(old)
    old.bits = 99  # the replacement's own attribute wins
    carry_over(old, new)
    assert new.tag == "encoder.act" and new._is_hf_initialized is True
    assert new.describe() == "GELU" and new.describe.__self__ is new
    assert new.bits == 3


def test_a_forward_replaced_on_the_instance_gives_a_warning():
    old, new = gelu_pair()
    old.forward = lambda x: x
    with pytest.warns(RuntimeWarning, match="forward was replaced on the instance"):
        carry_over(old, new)
    assert "forward" not in new.__dict__


def test_bad_arguments():
    old, new = gelu_pair()
    with pytest.raises(TypeError, match="old and new must be nn.Modules"):
        carry_over(old, lambda x: x)
    with pytest.raises(ValueError, match="new contains old"):
        carry_over(old, nn.Sequential(old))
    assert carry_over(old, old) is old


# --------------------------------------------------------------------------------------- through convert

def test_convert_keeps_hooks_on_activations_and_linears():
    model = small_model()
    calls = []
    model.act.register_forward_hook(lambda m, args, out: calls.append(("act", type(m), out.shape)))
    model.fc1.register_forward_pre_hook(lambda m, args: calls.append(("fc1", type(m), args[0].shape)))
    model.fc2.register_full_backward_hook(lambda m, gi, go: calls.append(("fc2-backward", type(m), go[0].shape)))
    convert_model(model)
    assert isinstance(model.act, fewbit_dist.GELU) and isinstance(model.fc1, LowBitLinear)
    model(torch.randn(3, 6)).sum().backward()
    assert calls == [("fc1", LowBitLinear, (3, 6)), ("act", fewbit_dist.GELU, (3, 8)),
                     ("fc2-backward", LowBitLinear, (3, 4))]


def test_convert_keeps_accelerate_hooks_and_attributes():
    hooks = pytest.importorskip("accelerate.hooks")
    model = small_model()
    x = torch.randn(3, 6)
    hooks.add_hook_to_module(model.fc2, hooks.AlignDevicesHook(execution_device="cpu", offload=True))
    model.act.tag = "mlp"
    expected = model(x)
    convert_model(model)
    assert isinstance(model.fc2, LowBitLinear) and model.fc2.weight.device.type == "meta"
    assert model.act.tag == "mlp"
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
