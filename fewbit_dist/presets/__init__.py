"""Presets shipped with the package, found by name: `fewbit_dist.convert(model, "max-saving")`.

Each preset is a JSON file beside this module: {"description": ..., "fewbit": <a FewBitConfig>}. A preset
applies to any model: its patterns (e.g. a `classifier` head kept exact) that match no module of the model
are skipped (`require_matches` False), while a user's own patterns that match nothing stay an error.

What each preset was measured to save, and at which gradient cosine, is in `measured.json` beside it,
written by `python launch/bench_decoder.py` (see BENCHMARKS.md); `describe(name)` prints both.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["list_presets", "load_preset", "preset_description", "preset_measurements", "describe"]

_ORDER = ("exact", "safe", "max-saving", "fewbit-paper")


def _files():
    return resources.files(__name__)


def list_presets() -> list[str]:
    """Names of the shipped presets, from the safest to the most aggressive, then any others."""
    names = sorted(p.name[:-5] for p in _files().iterdir() if p.name.endswith(".json") and p.name != "measured.json")
    return [n for n in _ORDER if n in names] + [n for n in names if n not in _ORDER]


def _read(name: str) -> dict:
    if not isinstance(name, str) or name not in list_presets():
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return json.loads(_files().joinpath(f"{name}.json").read_text())


def load_preset(name: str):
    """The FewBitConfig of preset `name`."""
    from ..config import FewBitConfig

    data = dict(_read(name)["fewbit"])
    data.setdefault("require_matches", False)
    return FewBitConfig.from_dict(data)


def preset_settings(name: str) -> dict:
    """The preset's settings as stored (its "fewbit" mapping): what a measurement records to stay current."""
    return json.loads(json.dumps(_read(name)["fewbit"]))


def preset_description(name: str) -> str:
    return _read(name)["description"]


def preset_measurements(name: str, include_stale: bool = False) -> dict:
    """Measured figures of preset `name` per model ({} if none were recorded). A figure counts only if it
    records the preset's settings ("config") and they are today's: a preset changed since it was measured has
    no figures until `launch/bench_decoder.py --write-presets` measures it again (`include_stale` shows the
    old ones, marked "stale": true)."""
    current = preset_settings(name)
    path = _files().joinpath("measured.json")
    if not path.is_file():
        return {}
    out = {}
    for model, fig in json.loads(path.read_text()).get(name, {}).items():
        fresh = fig.get("config") == current
        if fresh or include_stale:
            out[model] = {k: v for k, v in fig.items() if k != "config"} | ({} if fresh else {"stale": True})
    return out


def describe(name: str) -> str:
    """The description and the measured figures, as text."""
    lines = [preset_description(name)]  # it starts with the name
    figures = preset_measurements(name)
    for model, fig in figures.items():
        parts = ", ".join(f"{k} {v}" for k, v in fig.items())
        lines.append(f"  measured on {model}: {parts}")
    if not figures:
        lines.append("  not measured with these settings yet (launch/bench_decoder.py --write-presets)")
    return "\n".join(lines)
