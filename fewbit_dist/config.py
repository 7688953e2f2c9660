"""FewBitConfig: what `fewbit_dist.convert` does to a model, from a dict, a JSON file or keywords."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .functional.lowbit import DEFAULT_GROUP_SIZE, check_lowbit_args
from .functional.sketch import DEFAULT_SKETCH, SKETCHES
from .nn.linear import check_projection_args
from .validation import check_bool, check_choice, check_int, check_optional_bits, check_optional_int

__all__ = ["FewBitConfig", "ConfigLike", "LAYER_FIELDS", "SECTIONS"]

# Fields an override may set for the modules it matches. Setting either linear method in an override
# replaces the linear method of those modules (the other method's fields fall back to their defaults).
LOWBIT_FIELDS = ("linear_bits", "linear_group_size", "linear_rounding")
SKETCH_FIELDS = ("proj_dim_ratio", "proj_dim", "proj_dim_min", "proj_dim_max", "sketch")
STRUCTURE_FIELDS = ("exact_linear", "norm_mode", "norm_bits", "gated_mlp_mode", "gated_mlp_bits")
LAYER_FIELDS = ("activation_bits", *LOWBIT_FIELDS, *SKETCH_FIELDS, "compress_dropout", *STRUCTURE_FIELDS)

STRUCTURE_MODES = ("exact", "compressed")

# The nested form of a config: one small sub-config per kind of module `convert` handles (see SECTIONS and
# FewBitConfig.section). Each nested key names a flat field; the flat form stays valid and is what
# keyword overrides use (`convert(model, activation_bits=3)`).
SECTIONS = {
    "activations": {"bits": "activation_bits", "convert_transformers": "convert_transformers"},
    "linear": {"bits": "linear_bits", "group_size": "linear_group_size", "rounding": "linear_rounding",
               "proj_dim_ratio": "proj_dim_ratio", "proj_dim": "proj_dim", "proj_dim_min": "proj_dim_min",
               "proj_dim_max": "proj_dim_max", "sketch": "sketch", "exact": "exact_linear"},
    "dropout": {"compress": "compress_dropout"},
    "norms": {"mode": "norm_mode", "bits": "norm_bits"},
    "gated_mlp": {"mode": "gated_mlp_mode", "bits": "gated_mlp_bits"},
    "loss": {"chunked": "chunked_loss", "chunk_rows": "loss_chunk_rows"},
    "checkpointing": {"boundary_bits": "checkpoint_boundary_bits"},
}


def _patterns(value, name) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a glob pattern or a list of non-empty glob patterns, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class FewBitConfig:
    """Fields:

    activation_bits: 1..8 bits per element saved by smooth activations (GELU, SiLU, ...), or None to leave
        activations alone. Piecewise-linear activations (ReLU, ...) always use 1 exact bit when converted.
    include: glob patterns over dotted module paths (``"encoder.layer.*"``); only matching modules (and
        their descendants) are converted. Empty: everything.
    exclude: glob patterns; matching modules and their descendants are left alone. Wins over include.
    convert_transformers: also convert the activation modules of Hugging Face transformers
        (GELUActivation, NewGELUActivation, QuickGELUActivation, SiLUActivation, ...).
    proj_dim_ratio / proj_dim: turn every matched nn.Linear into a RandomizedLinear whose weight gradient
        comes from a sketch of ceil(proj_dim_ratio * rows) rows (a ratio in (0, 1]) or of proj_dim rows.
        Both None (the default): linear layers stay nn.Linear.
    proj_dim_min / proj_dim_max: clamp the sketch size (rows).
    sketch: 'rownorm' (default), 'count', 'gaussian' or 'rademacher' (fewbit_dist.functional.sketch).
    linear_bits: 2..8: every matched nn.Linear becomes a LowBitLinear that saves its input at that many bits
        per element (stochastic rounding, per-group scales); None (default): no. A layer is either low-bit
        or sketched: setting both linear_bits and proj_dim_ratio/proj_dim is an error.
    linear_group_size: columns per (lo, scale) pair of LowBitLinear (default 128).
    linear_rounding: 'stochastic' (unbiased, default) or 'nearest'.
    compress_dropout: swap nn.Dropout for fewbit_dist.Dropout (a 1-bit saved mask). Default False.
    exact_linear: every matched nn.Linear that is neither low-bit nor sketched saves the Parameter instead of
        autocast's weight copy, and one input copy shared with the other layers reading the same tensor (or
        none, when a converted norm or gated MLP can rebuild it exactly). Gradients unchanged. Default False.
    norm_mode: None (default), "exact" or "compressed": Hugging Face RMSNorm modules (Llama, Qwen2/3,
        Mistral, Gemma styles) and torch.nn.LayerNorm (BERT, RoBERTa, MiniLM, GPT-2) save their input once
        plus per-row statistics ("exact", gradients unchanged) or their normalized input at norm_bits
        ("compressed"); the linear layers reading their output share it (rebuild it) instead of saving a copy.
    norm_bits: 2..8, for norm_mode "compressed" (default 8).
    gated_mlp_mode: None (default), "exact" or "compressed": gated MLPs (SwiGLU/GeGLU: Llama, Qwen2/3,
        Mistral, Gemma) compute act(gate) * up in one op that saves gate and up only ("exact") or at
        gated_mlp_bits ("compressed"); the down projection shares them instead of saving its input.
    gated_mlp_bits: 2..8, for gated_mlp_mode "compressed" (default 8).
    chunked_loss: a Hugging Face *ForCausalLM given labels computes its loss from the hidden states in
        chunks of loss_chunk_rows rows and returns logits=None (without labels it is unchanged): a fused
        linear cross-entropy that forms the head's gradients in forward when the head is a plain linear
        layer, else chunks under checkpointing (fewbit_dist.functional.loss). Default False.
    loss_chunk_rows: rows per chunk; None (default): as many as keep a chunk's float32 logits within 32 MiB.
    checkpoint_boundary_bits: None (default) or 2..8: with activation checkpointing on (train.py,
        fewbit_dist.integrations.checkpointing.enable), keep each checkpointed block's input at that many bits
        (nearest rounding); the forward is unchanged, gradients become estimates. `convert` itself does not
        switch checkpointing on.
    require_matches: every include/exclude/override pattern must match a module (default True). Presets set
        it False: a preset applies to any model, so its patterns that match nothing are skipped.
    overrides: a list of {"pattern": glob or [globs], <field>: value, ...}: for the modules a pattern matches
        (and their descendants) those fields replace the ones above. Fields: LAYER_FIELDS. An override that
        sets either linear method (linear_bits, or proj_dim_ratio/proj_dim) replaces the linear method: e.g.
        {"pattern": "*.attention.self", "proj_dim_ratio": 0.2} sketches the Q/K/V projections of a
        config whose linear_bits is 4, and {"pattern": "classifier", "linear_bits": null,
        "activation_bits": null} keeps the classifier exact. Two overrides that match one module and set
        one field differently (or choose different linear methods) are a conflict: `convert` raises and
        names the module and the overrides.

    `*` in a pattern matches any characters, dots included. Every pattern must match at least one module
    path of the model, or `convert` raises: a typo must not silently convert nothing.
    """

    activation_bits: Union[int, None] = 3
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    convert_transformers: bool = True
    proj_dim_ratio: Union[float, None] = None
    proj_dim: Union[int, None] = None
    proj_dim_min: Union[int, None] = None
    proj_dim_max: Union[int, None] = None
    sketch: str = DEFAULT_SKETCH
    linear_bits: Union[int, None] = None
    linear_group_size: int = DEFAULT_GROUP_SIZE
    linear_rounding: str = "stochastic"
    compress_dropout: bool = False
    exact_linear: bool = False
    norm_mode: Union[str, None] = None
    norm_bits: int = 8
    gated_mlp_mode: Union[str, None] = None
    gated_mlp_bits: int = 8
    chunked_loss: bool = False
    loss_chunk_rows: Optional[int] = None
    checkpoint_boundary_bits: Union[int, None] = None
    require_matches: bool = True
    overrides: tuple = ()

    def __post_init__(self):
        check_optional_bits(self.activation_bits, "activation_bits", 1, 8)
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        check_bool(self.convert_transformers, "convert_transformers")
        if self.randomized_linear:
            check_projection_args(self.proj_dim_ratio, self.proj_dim, self.proj_dim_min, self.proj_dim_max)
        elif self.proj_dim_min is not None or self.proj_dim_max is not None:
            raise ValueError("proj_dim_min/proj_dim_max need proj_dim_ratio or proj_dim (they clamp the sketch size)")
        check_choice(self.sketch, "sketch", (None, *sorted(SKETCHES)))
        if self.linear_bits is not None and self.randomized_linear:
            raise ValueError(f"linear_bits={self.linear_bits} and proj_dim_ratio/proj_dim (a sketch) are both set: a "
                             "linear layer is either low-bit or sketched; choose per layer with `overrides`")
        check_lowbit_args(4 if self.linear_bits is None else self.linear_bits, self.linear_group_size,
                          self.linear_rounding, names=LOWBIT_FIELDS)
        for name in ("compress_dropout", "exact_linear", "chunked_loss", "require_matches"):
            check_bool(getattr(self, name), name)
        for name in ("norm_mode", "gated_mlp_mode"):
            check_choice(getattr(self, name), name, (None, *STRUCTURE_MODES))
        for name in ("norm_bits", "gated_mlp_bits"):
            check_lowbit_args(getattr(self, name), self.linear_group_size, self.linear_rounding,
                              names=(name, "linear_group_size", "linear_rounding"))
        if self.checkpoint_boundary_bits is not None:
            check_lowbit_args(self.checkpoint_boundary_bits, self.linear_group_size, "nearest",
                              names=("checkpoint_boundary_bits", "linear_group_size", "rounding"))
        check_optional_int(self.loss_chunk_rows, "loss_chunk_rows", lo=1)
        object.__setattr__(self, "overrides", tuple(self._check_override(i, o) for i, o in enumerate(
            self._override_list(self.overrides))))

    @staticmethod
    def _override_list(value):
        if isinstance(value, Mapping) or isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError(f"overrides must be a list of {{'pattern': ..., <field>: value}} objects, got {value!r}")
        return value

    def _check_override(self, index: int, override) -> "Override":
        if isinstance(override, Override):
            override = override.as_dict()
        if not isinstance(override, Mapping):
            raise TypeError(f"overrides[{index}] must be an object {{'pattern': ..., <field>: value}}, got {override!r}")
        if "pattern" not in override:
            raise ValueError(f"overrides[{index}] needs a 'pattern' (a glob over module paths, or a list of them)")
        fields = {k: v for k, v in override.items() if k != "pattern"}
        unknown = sorted(set(fields) - set(LAYER_FIELDS))
        if unknown:
            raise ValueError(f"overrides[{index}]: unknown field(s) {unknown}; an override may set: "
                             f"{', '.join(LAYER_FIELDS)}")
        if not fields:
            raise ValueError(f"overrides[{index}] sets no field; an override may set: {', '.join(LAYER_FIELDS)}")
        result = Override(_patterns(override["pattern"], f"overrides[{index}].pattern"), tuple(sorted(fields.items())))
        if not result.patterns:
            raise ValueError(f"overrides[{index}].pattern must not be empty")
        try:  # its values must make a valid config on their own, applied to this one
            self.layer_config([result])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"overrides[{index}] {override!r}: {exc}") from None
        return result

    def layer_config(self, overrides) -> "FewBitConfig":
        """The settings for a module that `overrides` (a list of Override, in order) match: this config
        with their fields applied and no overrides. Raises ValueError on conflicting overrides."""
        fields = {name: getattr(self, name) for name in LAYER_FIELDS}
        set_by: dict[str, tuple[int, Any]] = {}
        method_by = None
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for i, ov in enumerate(overrides):
            values = dict(ov.fields)
            method = ov.linear_method()
            if method is not None:
                if method_by is not None and method_by[1] != method:
                    raise ValueError(f"conflicting overrides: {overrides[method_by[0]]} makes linear layers "
                                     f"{method_by[1]} and {ov} makes them {method}")
                method_by = (i, method)
                for name in (SKETCH_FIELDS if method == "low-bit" else LOWBIT_FIELDS):
                    fields[name] = defaults[name]  # the other method's settings no longer apply
            for name, value in values.items():
                if name in set_by and set_by[name][1] != value:
                    raise ValueError(f"conflicting overrides: {overrides[set_by[name][0]]} sets {name}="
                                     f"{set_by[name][1]!r} and {ov} sets {name}={value!r}")
                set_by[name] = (i, value)
                fields[name] = value
        if not overrides:
            return self if not self.overrides else dataclasses.replace(self, overrides=())
        return dataclasses.replace(self, overrides=(), **fields)

    @property
    def low_bit_linear(self) -> bool:
        """Whether matched nn.Linear layers become LowBitLinear."""
        return self.linear_bits is not None

    def lowbit_kwargs(self) -> dict:
        return {"bits": self.linear_bits, "group_size": self.linear_group_size, "rounding": self.linear_rounding}

    @property
    def randomized_linear(self) -> bool:
        """Whether matched nn.Linear layers become RandomizedLinear."""
        return self.proj_dim_ratio is not None or self.proj_dim is not None

    def linear_kwargs(self) -> dict:
        return {"proj_dim_ratio": self.proj_dim_ratio, "proj_dim": self.proj_dim,
                "proj_dim_min": self.proj_dim_min, "proj_dim_max": self.proj_dim_max, "sketch": self.sketch}

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FewBitConfig":
        """From the flat form ({"activation_bits": 3, ...}), the nested one ({"activations": {"bits": 3},
        "linear": {...}, ...}: SECTIONS), or a mix; a field given both ways must agree."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a fewbit config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        for section, keys in SECTIONS.items():
            if section not in data:
                continue
            values = data.pop(section)
            if values is None:
                continue
            if not isinstance(values, Mapping):
                raise TypeError(f"{section} must be an object with keys {sorted(keys)}, got {values!r}")
            unknown = sorted(set(values) - set(keys))
            if unknown:
                raise ValueError(f"{section}: unknown key(s) {unknown}; valid keys: {', '.join(keys)}")
            for key, value in values.items():
                flat = keys[key]
                if flat in data and data[flat] != value:
                    raise ValueError(f"{section}.{key}={value!r} disagrees with {flat}={data[flat]!r}")
                data[flat] = value
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown fewbit config key(s) {unknown}; valid keys: {', '.join(cls.field_names())} "
                             f"(or the sections {', '.join(SECTIONS)})")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str) -> "FewBitConfig":
        """A preset shipped with the package, by name (`fewbit_dist.presets.list_presets()`)."""
        from .presets import load_preset

        return load_preset(name)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "FewBitConfig":
        """Read a JSON object; a file with a top-level "fewbit" section (a training config) uses that."""
        try:
            with open(path) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("fewbit"), dict):
            data = data["fewbit"]
        return cls.from_dict(data)

    @classmethod
    def load(cls, config: "ConfigLike" = None, **overrides) -> "FewBitConfig":
        """A FewBitConfig from a FewBitConfig, a dict, a preset name, a JSON path or None (defaults), then
        `overrides`."""
        if config is None:
            base = cls()
        elif isinstance(config, cls):
            base = config
        elif isinstance(config, Mapping):
            base = cls.from_dict(config)
        elif isinstance(config, str) and _is_preset_name(config):
            base = cls.from_preset(config)
        elif isinstance(config, (str, os.PathLike)):
            if isinstance(config, str) and not os.path.exists(config) and not config.endswith(".json"):
                from .presets import list_presets

                raise ValueError(f"config {config!r} is neither a preset ({', '.join(list_presets())}) nor an "
                                 "existing JSON file")
            base = cls.from_json(config)
        else:
            raise TypeError(f"config must be a FewBitConfig, a dict, a JSON file path or None, "
                            f"got {type(config).__name__}")
        return base.replace(**overrides) if overrides else base

    def replace(self, **changes) -> "FewBitConfig":
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown fewbit config key(s) {unknown}; valid keys: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def section(self, name: str):
        """The sub-config of one kind of module (`SECTIONS`), as a read-only dict of its nested keys."""
        if name not in SECTIONS:
            raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {name!r}")
        return types.MappingProxyType({key: getattr(self, flat) for key, flat in SECTIONS[name].items()})

    def to_nested_dict(self) -> dict:
        """The nested form (SECTIONS), plus include/exclude/overrides/require_matches."""
        flat = self.to_dict()
        out = {name: {key: flat.pop(f) for key, f in keys.items()} for name, keys in SECTIONS.items()}
        out.update(flat)
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["overrides"] = [ov.as_dict() for ov in self.overrides]
        return d


@dataclass(frozen=True)
class Override:
    """One entry of FewBitConfig.overrides: glob patterns over module paths and the fields they set."""

    patterns: tuple[str, ...]
    fields: tuple[tuple[str, Any], ...]

    def linear_method(self):
        """'low-bit' or 'sketched' when this override chooses a linear method (a non-null linear_bits, or a
        non-null proj_dim_ratio/proj_dim), else None (null values only set those fields)."""
        values = dict(self.fields)
        lowbit = values.get("linear_bits") is not None
        sketch = values.get("proj_dim_ratio") is not None or values.get("proj_dim") is not None
        if lowbit and sketch:
            raise ValueError("an override sets both linear_bits and a sketch size: a linear layer is either "
                             "low-bit or sketched")
        return "low-bit" if lowbit else "sketched" if sketch else None

    def as_dict(self) -> dict:
        pattern = self.patterns[0] if len(self.patterns) == 1 else list(self.patterns)
        return {"pattern": pattern, **dict(self.fields)}

    def __str__(self) -> str:
        return json.dumps(self.as_dict())


ConfigLike = Union[FewBitConfig, Mapping[str, Any], str, os.PathLike, None]


def _is_preset_name(text: str) -> bool:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return False
    from .presets import list_presets

    return text in list_presets()
