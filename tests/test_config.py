import json

import pytest

from fewbit_dist import FewBitConfig


def test_defaults_and_round_trip(tmp_path):
    cfg = FewBitConfig()
    assert cfg.activation_bits == 3 and cfg.include == () and cfg.exclude == () and cfg.convert_transformers
    cfg = FewBitConfig.from_dict({"activation_bits": 2, "include": "encoder.*", "exclude": ["a", "b"]})
    assert cfg.include == ("encoder.*",) and cfg.exclude == ("a", "b")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert FewBitConfig.load(path) == cfg == FewBitConfig.load(str(path)) == FewBitConfig.load(cfg.to_dict())
    assert FewBitConfig.load(None, activation_bits=None).activation_bits is None


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown fewbit config key\(s\) \['bits'\]; valid keys: activation_bits, "):
        FewBitConfig.from_dict({"bits": 3})
    with pytest.raises(ValueError, match="valid keys"):
        FewBitConfig().replace(activation_bit=3)
    path = tmp_path / "bad.json"
    path.write_text('{"fewbit": {"actvation_bits": 3}}')
    with pytest.raises(ValueError, match="actvation_bits"):
        FewBitConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FewBitConfig.load(path)


@pytest.mark.parametrize("field,value,exc,msg", [
    ("activation_bits", 0, ValueError, "activation_bits must be an int in 1..8 or None"),
    ("activation_bits", 9, ValueError, "activation_bits must be an int in 1..8 or None"),
    ("activation_bits", "3", TypeError, "activation_bits must be an int"),
    ("activation_bits", True, TypeError, "activation_bits must be an int"),
    ("include", 3, TypeError, "include must be a glob pattern"),
    ("exclude", [""], TypeError, "exclude must be a glob pattern"),
    ("convert_transformers", "yes", TypeError, "convert_transformers must be a bool"),
    ("proj_dim_ratio", 0.0, ValueError, r"proj_dim_ratio must be a number in \(0, 1\]"),
    ("proj_dim_ratio", 2, ValueError, r"proj_dim_ratio must be a number in \(0, 1\]"),
    ("proj_dim", -3, ValueError, "proj_dim must be a positive int"),
    ("proj_dim_min", 4, ValueError, "proj_dim_min/proj_dim_max need proj_dim_ratio or proj_dim"),
    ("sketch", "dct", ValueError, "sketch must be one of"),
    ("linear_bits", 1, ValueError, r"linear_bits must be an int in 2..8"),
    ("linear_bits", 9, ValueError, r"linear_bits must be an int in 2..8"),
    ("linear_group_size", 0, ValueError, "linear_group_size must be a positive int"),
    ("linear_rounding", "up", ValueError, "linear_rounding must be one of"),
    ("compress_dropout", "yes", TypeError, "compress_dropout must be a bool"),
    ("overrides", {"pattern": "a", "linear_bits": 4}, TypeError, "overrides must be a list"),
    ("overrides", ["a"], TypeError, r"overrides\[0\] must be an object"),
    ("overrides", [{"linear_bits": 4}], ValueError, r"overrides\[0\] needs a 'pattern'"),
    ("overrides", [{"pattern": "a"}], ValueError, r"overrides\[0\] sets no field"),
    ("overrides", [{"pattern": "a", "bits": 4}], ValueError, r"overrides\[0\]: unknown field\(s\) \['bits'\]; an "
                                                             r"override may set: activation_bits, linear_bits"),
    ("overrides", [{"pattern": "a", "linear_bits": 12}], ValueError, r"overrides\[0\] .*linear_bits must be an int"),
    ("overrides", [{"pattern": "a", "linear_bits": 4, "proj_dim": 3}], ValueError, "either low-bit or sketched"),
    ("overrides", [{"pattern": "", "linear_bits": 4}], TypeError, r"overrides\[0\].pattern must be a glob"),
])
def test_bad_values(field, value, exc, msg):
    with pytest.raises(exc, match=msg):
        FewBitConfig(**{field: value})


def test_both_projection_sizes_is_an_error():
    with pytest.raises(ValueError, match="exactly one of proj_dim_ratio"):
        FewBitConfig(proj_dim_ratio=0.2, proj_dim=16)
    cfg = FewBitConfig(proj_dim_ratio=0.2, proj_dim_min=8, sketch="rownorm")
    assert cfg.randomized_linear and cfg.linear_kwargs()["sketch"] == "rownorm"
    assert not FewBitConfig().randomized_linear


def test_bad_sources():
    with pytest.raises(TypeError, match="config must be a FewBitConfig, a dict, a JSON file path or None"):
        FewBitConfig.load(3)
    with pytest.raises(TypeError, match="must be a mapping"):
        FewBitConfig.from_dict([("activation_bits", 3)])


def test_low_bit_and_sketch_on_one_layer_is_an_error():
    with pytest.raises(ValueError, match="a linear layer is either low-bit or sketched; choose per layer with"):
        FewBitConfig(linear_bits=4, proj_dim_ratio=0.2)
    cfg = FewBitConfig(linear_bits=4)
    assert cfg.low_bit_linear and not cfg.randomized_linear
    assert cfg.lowbit_kwargs() == {"bits": 4, "group_size": 128, "rounding": "stochastic"}


def test_overrides_resolve_per_layer_and_round_trip(tmp_path):
    cfg = FewBitConfig(linear_bits=4, compress_dropout=True, overrides=[
        {"pattern": "*.attention.self", "proj_dim_ratio": 0.2},
        {"pattern": ["classifier", "pooler"], "linear_bits": None, "activation_bits": None},
        {"pattern": "*.output", "linear_bits": 8},
    ])
    attn = cfg.layer_config([cfg.overrides[0]])
    assert attn.randomized_linear and not attn.low_bit_linear and attn.compress_dropout and attn.overrides == ()
    head = cfg.layer_config([cfg.overrides[1]])
    assert not head.low_bit_linear and not head.randomized_linear and head.activation_bits is None
    # a later override that picks the same method with another value for a field is a conflict
    two = FewBitConfig(overrides=[{"pattern": "a", "linear_bits": 4}, {"pattern": "b", "linear_bits": 8}])
    with pytest.raises(ValueError, match=r"conflicting overrides: .*linear_bits=4 and .* sets linear_bits=8"):
        two.layer_config(list(two.overrides))
    with pytest.raises(ValueError, match="makes linear layers low-bit and .* makes them sketched"):
        cfg.layer_config([cfg.overrides[2], cfg.overrides[0]])
    assert cfg.layer_config([cfg.overrides[1], cfg.overrides[1]]) == head  # agreeing twice is fine
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"description": "a preset", "fewbit": cfg.to_dict()}))
    assert FewBitConfig.load(path) == cfg


def test_shipped_presets_load():
    from fewbit_dist import presets

    assert set(presets.list_presets()) >= {"exact", "safe", "max-saving", "fewbit-paper"}
    for name in presets.list_presets():
        assert presets.preset_description(name).startswith(name + ":")
        assert FewBitConfig.load(name) == FewBitConfig.from_preset(name)
