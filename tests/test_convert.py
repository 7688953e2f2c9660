import copy
import json

import pytest
import torch
from torch import nn

import fewbit_dist
from fewbit_dist import FewBitConfig, conversion_report, convert
from fewbit_dist.memory import SavedTensorMeter
from fewbit_dist.util import convert_linear, map_module

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        cfg = transformers.BertConfig(max_position_embeddings=64, **common)
        return transformers.BertForSequenceClassification(cfg), {"GELUActivation": 2, "Tanh": 1}  # + the pooler
    if kind == "roberta":
        cfg = transformers.RobertaConfig(max_position_embeddings=64, **common)
        return transformers.RobertaForSequenceClassification(cfg), {"GELUActivation": 2}
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), {"NewGELUActivation": 2}
    if kind == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=1, max_position_embeddings=64, **common)
        return transformers.LlamaForCausalLM(cfg), {"SiLUActivation": 2}
    raise ValueError(kind)


def logits(model, ids):
    return model(input_ids=ids).logits


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama"])
def test_convert_hugging_face_models(kind):
    model, expected = tiny(kind)
    model.eval()  # dropout off: outputs must be identical
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))

    out = convert(model, activation_bits=3)
    assert out is model
    report = conversion_report(model)
    assert report.counts() == expected
    for path, before, after in report.swapped:
        new = model.get_submodule(path)
        assert isinstance(new, fewbit_dist.FewBitActivation if before != "Tanh" else fewbit_dist.Tanh)
        assert after == repr(new)
    assert list(model.state_dict()) == keys  # parameters and keys untouched

    y, y_ref = logits(model, ids), logits(ref, ids)
    assert torch.equal(y, y_ref)

    # Gradients: close to exact (3-bit derivative of the MLP activation only).
    y.float().pow(2).mean().backward()
    y_ref.float().pow(2).mean().backward()
    g, g_ref = flat_grad(model), flat_grad(ref)
    cos = torch.nn.functional.cosine_similarity(g, g_ref, dim=0).item()
    assert cos > 0.98, cos

    # And saved-activation bytes fall.
    with SavedTensorMeter(ref) as before:
        logits(ref, ids)
    with SavedTensorMeter(model) as after:
        logits(model, ids)
    assert after.nbytes < before.nbytes

    # The converted model's state_dict loads into an unconverted one, strictly.
    fresh, _ = tiny(kind)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    assert torch.equal(logits(fresh, ids), y_ref)


def test_include_and_exclude_globs():
    model, _ = tiny("roberta")
    convert(model, include=["roberta.encoder.layer.0*"])
    assert [p for p, _, _ in conversion_report(model).swapped] == ["roberta.encoder.layer.0.intermediate.intermediate_act_fn"]

    model, _ = tiny("roberta")
    convert(model, exclude="*.layer.1")  # a pattern selects the module and everything below it
    assert [p for p, _, _ in conversion_report(model).swapped] == ["roberta.encoder.layer.0.intermediate.intermediate_act_fn"]

    model, _ = tiny("roberta")
    convert(model, include=["*encoder*"], exclude=["*layer.0.*"])  # exclude wins
    assert [p for p, _, _ in conversion_report(model).swapped] == ["roberta.encoder.layer.1.intermediate.intermediate_act_fn"]


def test_patterns_that_match_nothing_are_errors():
    model, _ = tiny("bert")
    with pytest.raises(ValueError, match=r"include pattern 'encoder\.layers\.\*' matches no module path"):
        convert(model, include="encoder.layers.*")
    with pytest.raises(ValueError, match="exclude pattern 'clasifier' matches no module path"):
        convert(model, exclude=["clasifier"])


ALL_TORCH = [nn.GELU(approximate="tanh"), nn.CELU(2.0), nn.ELU(0.5), nn.Hardswish(), nn.LogSigmoid(), nn.Mish(),
             nn.SELU(), nn.Sigmoid(), nn.SiLU(), nn.Softplus(2.0, 10.0), nn.Softsign(), nn.Tanh(), nn.Tanhshrink(),
             nn.ReLU(), nn.LeakyReLU(0.2), nn.Threshold(0.1, 20.0), nn.Hardsigmoid(), nn.Hardtanh(-2.0, 3.0),
             nn.ReLU6(), nn.Hardshrink(0.3), nn.Softshrink(0.7)]


def test_convert_every_torch_activation():
    model = nn.Sequential(*[copy.deepcopy(m) for m in ALL_TORCH])
    x = torch.randn(4, 9, dtype=torch.float64)
    ref = model(x)
    convert(model, {"activation_bits": 4})
    assert len(conversion_report(model).swapped) == 21
    for old, new in zip(ALL_TORCH, model):
        assert type(new) is getattr(fewbit_dist, type(old).__name__)  # ReLU6 stays ReLU6, not Hardtanh
        assert new.extra_repr().startswith(old.extra_repr())
        assert new.bits == (4 if type(old).__name__ in fewbit_dist.SMOOTH_ACTIVATIONS else 1)
    assert torch.equal(model(x), ref)


def test_convert_keeps_training_mode_shared_modules_and_subclasses():
    class MyGELU(nn.GELU):  # a user's subclass may change forward: not ours to replace
        def forward(self, x):
            return super().forward(x) * 2

    act = nn.SiLU()
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act, MyGELU())
    model.eval()
    convert(model)
    assert model[1] is model[3] and isinstance(model[1], fewbit_dist.SiLU)
    assert not model[1].training and type(model[4]) is MyGELU
    assert len(conversion_report(model).swapped) == 1


def test_convert_a_bare_activation_and_no_op_configs():
    assert isinstance(convert(nn.GELU()), fewbit_dist.GELU)
    model = nn.Sequential(nn.GELU())
    convert(model, activation_bits=None)
    assert type(model[0]) is nn.GELU and conversion_report(model).swapped == []
    model = nn.Sequential(transformers.activations.GELUActivation())
    convert(model, convert_transformers=False)
    assert type(model[0]) is transformers.activations.GELUActivation
    with pytest.raises(ValueError, match="was not converted"):
        conversion_report(nn.Linear(2, 2))


def test_quick_and_clipped_gelu_get_their_own_tables():
    acts = transformers.activations
    model = nn.Sequential(acts.QuickGELUActivation(), acts.ClippedGELUActivation(-10, 10), acts.FastGELUActivation())
    x = torch.randn(1000, dtype=torch.float64) * 3
    ref = model(x)
    convert(model, activation_bits=3)
    assert all(isinstance(m, fewbit_dist.FewBitActivation) for m in model)
    assert torch.equal(model(x), ref)
    quick = model[0].spec().table
    assert quick is not None and quick.borders != fewbit_dist.quant.table("gelu", 3).borders
    # The gradient follows the QuickGELU derivative's table.
    xq = x.clone().requires_grad_(True)
    model[0](xq).sum().backward()
    xe = x.clone().requires_grad_(True)
    (xe * torch.sigmoid(1.702 * xe)).sum().backward()
    assert ((xq.grad - xe.grad).norm() / xe.grad.norm()) < 0.15


def test_config_sources(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"fewbit": {"activation_bits": 2, "exclude": ["classifier"]}, "model": {}}))
    model, _ = tiny("bert")
    convert(model, str(path))
    assert conversion_report(model).config == FewBitConfig(activation_bits=2, exclude=("classifier",))
    model, _ = tiny("bert")
    convert(model, FewBitConfig(activation_bits=2), activation_bits=5)  # keyword overrides win
    assert all(m.bits == 5 for m in model.modules() if isinstance(m, fewbit_dist.FewBitActivation))


def test_map_module_semantics():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(shared, nn.Tanh()), shared)
    seen = []

    def fn(module, path):
        seen.append(path)
        return nn.Identity() if isinstance(module, nn.ReLU) else module

    out = map_module(model, fn)
    assert out is model
    assert seen == ["0", "1.0", "1.1", "1", ""]  # children first; a shared module is visited once
    assert isinstance(model[1][0], nn.Identity) and model[1][0] is model[2]

    seen.clear()
    map_module(model, fn, pattern=r"1\.")
    assert seen == ["1.0", "1.1"]  # re.match on the dotted path
    assert isinstance(map_module(nn.ReLU(), lambda m, p: nn.Identity()), nn.Identity)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        map_module(model, lambda m, p: None)
    with pytest.raises(ValueError, match="valid regular expression"):
        map_module(model, fn, pattern="(")
    with pytest.raises(TypeError, match="root must be an nn.Module"):
        map_module([model], fn)


def test_convert_linear_shares_parameters():
    class Recorder(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, tag=None):
            super().__init__(in_features, out_features, bias, device, dtype)
            self.tag = tag

    lin = nn.Linear(4, 3).double()
    new = convert_linear(lin, Recorder, tag="x")
    assert isinstance(new, Recorder) and new.tag == "x"
    assert new.weight is lin.weight and new.bias is lin.bias and new.weight.dtype == torch.float64
    assert new.state_dict().keys() == lin.state_dict().keys()
    nobias = convert_linear(nn.Linear(4, 3, bias=False), Recorder)
    assert nobias.bias is None
    other = nn.Conv1d(2, 2, 1)
    assert convert_linear(other, Recorder) is other
    mha_out = nn.MultiheadAttention(4, 2).out_proj  # an nn.Linear subclass: left alone
    assert convert_linear(mha_out, Recorder) is mha_out
    model = map_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), lambda m, p: convert_linear(m, Recorder))
    assert isinstance(model[0], Recorder)


POLICY = {"activation_bits": 3, "linear_bits": 4, "compress_dropout": True, "overrides": [
    {"pattern": "*.attention.self", "proj_dim_ratio": 0.5},
    {"pattern": "classifier", "linear_bits": None, "activation_bits": None},
]}


def test_per_pattern_policy_on_a_hugging_face_model():
    model, _ = tiny("roberta")
    keys = list(model.state_dict())
    convert(model, POLICY)
    layer = model.roberta.encoder.layer[0]
    assert all(isinstance(getattr(layer.attention.self, n), fewbit_dist.RandomizedLinear)
               for n in ("query", "key", "value"))
    assert isinstance(layer.attention.output.dense, fewbit_dist.LowBitLinear)
    assert isinstance(layer.intermediate.dense, fewbit_dist.LowBitLinear) and layer.intermediate.dense.bits == 4
    assert type(model.classifier.dense) is nn.Linear and type(model.classifier.out_proj) is nn.Linear
    assert isinstance(layer.output.dropout, fewbit_dist.Dropout)
    assert isinstance(model.classifier.dropout, fewbit_dist.Dropout)  # compress_dropout is not overridden there
    assert list(model.state_dict()) == keys
    report = conversion_report(model)
    assert report.counts() == {"GELUActivation": 2, "Linear": 12, "Dropout": 8}
    assert "attention (2 modules): sdpa -> fewbit" in str(report)


def test_conflicting_overrides_name_the_module():
    model, _ = tiny("roberta")
    with pytest.raises(ValueError, match=r"module 'roberta.encoder.layer.0.attention.self.query': conflicting "
                                         r"overrides: .* makes linear layers low-bit and .* makes them sketched"):
        convert(model, overrides=[{"pattern": "*.layer.0", "linear_bits": 4},
                                  {"pattern": "*.attention.self", "proj_dim": 8}])
    with pytest.raises(ValueError, match=r"overrides\[0\] pattern 'clasifier' matches no module path"):
        convert(tiny("roberta")[0], overrides=[{"pattern": "clasifier", "linear_bits": 8}])


def test_compress_dropout_same_model_less_memory():
    """1-bit dropout everywhere (the nn.Dropout modules and the attention probabilities): the same loss and
    gradients as the unconverted model under the same RNG state, and less saved."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    ref = transformers.RobertaForSequenceClassification(cfg)
    model = convert(copy.deepcopy(ref), activation_bits=None, compress_dropout=True)
    assert model.config._attn_implementation == "fewbit_sdpa" and ref.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 96, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, 12:] = 0
    labels = torch.tensor([0, 1, 1])
    model.eval(), ref.eval()
    assert torch.equal(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
    model.train(), ref.train()
    results = []
    for m in (model, ref):
        torch.manual_seed(5)
        with SavedTensorMeter(m) as meter:
            loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), flat_grad(m), meter.nbytes))
    (loss, grad, saved), (loss_ref, grad_ref, saved_ref) = results
    assert torch.equal(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-8)
    # per layer: 2 hidden-dropout masks and one attention mask go from 4 bytes to 1 bit per element, and the
    # attention keeps q, k, v instead of probabilities, noise and dropped probabilities
    assert saved < 0.75 * saved_ref


def test_eager_attention_is_left_alone_and_said_so():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    model = convert(transformers.RobertaForSequenceClassification(cfg), compress_dropout=True)
    assert model.config._attn_implementation == "eager"
    assert "left as 'eager'" in str(conversion_report(model))


def test_a_converted_model_is_freed_without_the_cycle_collector():
    """convert leaves no reference cycle holding the model: it is freed as soon as the last reference goes
    (a cycle made models accumulate until the cyclic GC ran, gigabytes in a benchmark loop)."""
    import gc
    import weakref

    for overrides in ({"activation_bits": None}, {"activation_bits": 3, "linear_bits": 4, "compress_dropout": True},
                      {"proj_dim_ratio": 0.5}):
        model, _ = tiny("roberta")
        enabled = gc.isenabled()
        gc.disable()
        try:
            convert(model, **overrides)
            model.train()
            model(input_ids=torch.randint(3, 96, (2, 7))).logits.sum().backward()
            ref = weakref.ref(model)
            del model
            assert ref() is None, overrides
        finally:
            if enabled:
                gc.enable()
