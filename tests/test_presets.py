"""Presets shipped inside the package (fewbit_dist/presets): found by name everywhere a config is taken, applied
to any model (their patterns that match nothing are skipped, a user's own are not), and the nested config form."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fewbit_dist
from fewbit_dist import FewBitConfig
from fewbit_dist.presets import describe, list_presets, load_preset, preset_description

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

NAMES = ["exact", "safe", "max-saving", "fewbit-paper"]


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_list_presets():
    assert list_presets() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_loads_by_name_everywhere(name, llama):
    cfg = FewBitConfig.from_preset(name)
    assert isinstance(cfg, FewBitConfig) and not cfg.require_matches
    assert FewBitConfig.load(name) == cfg == load_preset(name)
    assert FewBitConfig.load(name, loss_chunk_rows=7) == cfg.replace(loss_chunk_rows=7)  # keywords apply on top
    model = fewbit_dist.convert(copy.deepcopy(llama), name)
    assert fewbit_dist.conversion_report(model).config == cfg
    assert preset_description(name).startswith(f"{name}:") and describe(name).startswith(f"{name}: ")
    # the same preset, written to a file as a user would keep it, loads to the same config
    assert FewBitConfig.from_dict(json.loads(json.dumps(cfg.to_nested_dict()))) == cfg


def test_preset_contents(llama):
    """What each preset promises: exact keeps everything exact; the others keep the LM head exact."""
    exact = FewBitConfig.from_preset("exact")
    assert exact.activation_bits is None and exact.linear_bits is None and not exact.randomized_linear
    assert (exact.norm_mode, exact.gated_mlp_mode, exact.exact_linear, exact.chunked_loss) == ("exact", "exact",
                                                                                                True, True)
    for name in ("safe", "max-saving"):
        model = fewbit_dist.convert(copy.deepcopy(llama), name)
        assert type(model.lm_head) is fewbit_dist.ExactLinear
        assert type(model.model.layers[0].mlp.down_proj) is fewbit_dist.LowBitLinear
    model = fewbit_dist.convert(copy.deepcopy(llama), "fewbit-paper")
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is fewbit_dist.RandomizedLinear


def test_preset_patterns_that_match_nothing_are_skipped_but_a_users_are_not(llama):
    preset = FewBitConfig.from_preset("max-saving")
    patterns = [p for ov in preset.overrides for p in ov.patterns]
    assert "classifier" in patterns and not any(name == "classifier" for name, _ in llama.named_modules())
    fewbit_dist.convert(copy.deepcopy(llama), "max-saving")  # no error
    own = {"activation_bits": 3, "overrides": [{"pattern": "classifier", "linear_bits": None}]}
    with pytest.raises(ValueError, match="classifier"):
        fewbit_dist.convert(copy.deepcopy(llama), own)
    with pytest.raises(ValueError, match="classifier"):
        fewbit_dist.convert(copy.deepcopy(llama), preset.to_dict() | {"require_matches": True})


def test_a_users_keyword_pattern_on_a_preset_must_match(llama):
    with pytest.raises(ValueError, match="lm_heed"):
        fewbit_dist.convert(copy.deepcopy(llama), "max-saving", exclude=["lm_heed"])
    model = fewbit_dist.convert(copy.deepcopy(llama), "max-saving", exclude=["lm_head"])  # one that matches
    assert type(model.lm_head) is torch.nn.Linear


def test_unknown_preset_names_the_presets(llama):
    for call in (lambda: FewBitConfig.from_preset("max-savings"), lambda: FewBitConfig.load("max-savings"),
                 lambda: fewbit_dist.convert(copy.deepcopy(llama), "max-savings")):
        with pytest.raises(ValueError) as info:
            call()
        assert "max-savings" in str(info.value) and all(n in str(info.value) for n in NAMES)


def test_nested_form_equals_the_flat_form():
    nested = FewBitConfig.from_dict({"activations": {"bits": 3}, "linear": {"bits": 8}})
    assert nested == FewBitConfig.from_dict({"activation_bits": 3, "linear_bits": 8})
    every = {"activations": {"bits": 2, "convert_transformers": False},
             "linear": {"bits": 4, "group_size": 64, "rounding": "nearest", "exact": True},
             "dropout": {"compress": True}, "norms": {"mode": "compressed", "bits": 6},
             "gated_mlp": {"mode": "exact", "bits": 5}, "loss": {"chunked": True, "chunk_rows": 256}}
    flat = FewBitConfig(activation_bits=2, convert_transformers=False, linear_bits=4, linear_group_size=64,
                        linear_rounding="nearest", exact_linear=True, compress_dropout=True, norm_mode="compressed",
                        norm_bits=6, gated_mlp_mode="exact", gated_mlp_bits=5, chunked_loss=True,
                        loss_chunk_rows=256)
    assert FewBitConfig.from_dict(every) == flat
    assert flat.to_nested_dict()["norms"] == {"mode": "compressed", "bits": 6}
    assert dict(flat.section("loss")) == {"chunked": True, "chunk_rows": 256}
    # a mix that agrees is fine
    assert FewBitConfig.from_dict({"activations": {"bits": 3}, "activation_bits": 3}).activation_bits == 3


def test_nested_form_in_a_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"fewbit": {"norms": {"mode": "exact"}, "loss": {"chunked": True}}}))
    cfg = FewBitConfig.load(path)
    assert cfg == FewBitConfig(norm_mode="exact", chunked_loss=True) and cfg.require_matches


def test_nested_form_errors():
    with pytest.raises(ValueError, match="disagrees"):
        FewBitConfig.from_dict({"activations": {"bits": 3}, "activation_bits": 4})
    with pytest.raises(ValueError, match="unknown key"):
        FewBitConfig.from_dict({"norms": {"bitz": 4}})
    with pytest.raises(TypeError, match="linear"):
        FewBitConfig.from_dict({"linear": 8})
    with pytest.raises(ValueError, match="norm_mode"):
        FewBitConfig.from_dict({"norms": {"mode": "fast"}})
    with pytest.raises(ValueError, match="section"):
        FewBitConfig().section("attention")
