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
    ("activation_bits", 0, ValueError, "activation_bits must be in 1..8 or None"),
    ("activation_bits", 9, ValueError, "activation_bits must be in 1..8 or None"),
    ("activation_bits", "3", TypeError, "activation_bits must be an int"),
    ("activation_bits", True, TypeError, "activation_bits must be an int"),
    ("include", 3, TypeError, "include must be a glob pattern"),
    ("exclude", [""], TypeError, "exclude must be a glob pattern"),
    ("convert_transformers", "yes", TypeError, "convert_transformers must be a bool"),
    ("proj_dim_ratio", 0.0, ValueError, r"proj_dim_ratio must be in \(0, 1\]"),
    ("proj_dim_ratio", 2, ValueError, r"proj_dim_ratio must be in \(0, 1\]"),
    ("proj_dim", -3, ValueError, "proj_dim must be a positive int"),
    ("proj_dim_min", 4, ValueError, "proj_dim_min/proj_dim_max need proj_dim_ratio or proj_dim"),
    ("sketch", "dct", ValueError, "sketch must be one of"),
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
