"""FewBitConfig: what `fewbit_dist.convert` does to a model, from a dict, a JSON file or keywords."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .functional.sketch import DEFAULT_SKETCH, sketch_for
from .nn.linear import check_projection_args

__all__ = ["FewBitConfig", "ConfigLike"]


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
    sketch: 'count' (default), 'rownorm', 'gaussian' or 'rademacher' (fewbit_dist.functional.sketch).

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

    def __post_init__(self):
        bits = self.activation_bits
        if bits is not None:
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise TypeError(f"activation_bits must be an int in 1..8 or None, got {bits!r}")
            if not 1 <= bits <= 8:
                raise ValueError(f"activation_bits must be in 1..8 or None, got {bits}")
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if not isinstance(self.convert_transformers, bool):
            raise TypeError(f"convert_transformers must be a bool, got {self.convert_transformers!r}")
        if self.randomized_linear:
            check_projection_args(self.proj_dim_ratio, self.proj_dim, self.proj_dim_min, self.proj_dim_max)
        elif self.proj_dim_min is not None or self.proj_dim_max is not None:
            raise ValueError("proj_dim_min/proj_dim_max need proj_dim_ratio or proj_dim (they clamp the sketch size)")
        sketch_for(self.sketch)

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
        if not isinstance(data, Mapping):
            raise TypeError(f"a fewbit config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown fewbit config key(s) {unknown}; valid keys: {', '.join(cls.field_names())}")
        return cls(**dict(data))

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
        """A FewBitConfig from a FewBitConfig, a dict, a JSON path or None (defaults), then `overrides`."""
        if config is None:
            base = cls()
        elif isinstance(config, cls):
            base = config
        elif isinstance(config, Mapping):
            base = cls.from_dict(config)
        elif isinstance(config, (str, os.PathLike)):
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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d


ConfigLike = Union[FewBitConfig, Mapping[str, Any], str, os.PathLike, None]
