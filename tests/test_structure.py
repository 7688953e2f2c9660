"""Dependencies point one way: kernels and ops know nothing of autograd or models; convert, config, models,
functional and nn import nothing from integrations/ (the training frameworks sit above convert)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fewbit_dist"
BELOW_INTEGRATIONS = ["convert.py", "config.py", "util.py", "memory.py", "chunks.py", "models", "functional", "nn",
                      "ops", "quant", "presets"]


def _imports(path: Path, root: Path = PKG.parent) -> set[str]:
    """Dotted module names imported by `path`, relative imports resolved against the package under `root`."""
    rel = path.relative_to(root).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _files(entry: str):
    path = PKG / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("entry", BELOW_INTEGRATIONS)
def test_nothing_below_integrations_imports_them(entry):
    for path in _files(entry):
        bad = sorted(m for m in _imports(path) if m.startswith("fewbit_dist.integrations"))
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_ops_import_no_autograd_layer():
    for path in _files("ops"):
        bad = sorted(m for m in _imports(path) if m.startswith(("fewbit_dist.functional", "fewbit_dist.nn",
                                                                "fewbit_dist.models", "fewbit_dist.convert")))
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_the_check_sees_a_violation(tmp_path):
    """The resolver catches relative and absolute imports of integrations, so the checks above can fail."""
    probe = tmp_path / "fewbit_dist" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..integrations import deepspeed\nimport fewbit_dist.integrations.fsdp\n")
    mods = _imports(probe, root=tmp_path)
    assert "fewbit_dist.integrations" in mods and "fewbit_dist.integrations.fsdp" in mods
