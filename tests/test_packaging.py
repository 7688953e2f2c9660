"""The package as installed: package data in the wheel, the native sources found by the builder, the report's
list of native ops, and (slow) scripts/wheel_smoke.sh, which installs the wheel outside the source tree and
uses it from there."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fewbit_dist import report
from fewbit_dist.ops import builder

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"exact", "safe", "max-saving", "fewbit-paper"}


def source_copy(dest: Path) -> Path:
    """The files of the checkout (tracked and untracked, minus what git ignores), so that no build/ folder of
    the checkout is reused and concurrent builds do not share one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the sources from")
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-q", "-w", str(tmp / "out")], check=True, cwd=tmp)
    (wheel,) = (tmp / "out").glob("fewbit_dist-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_carries_the_native_sources_presets_and_tables(wheel_names):
    csrc = [p.relative_to(ROOT / "csrc").as_posix() for p in (ROOT / "csrc").rglob("*")
            if p.is_file() and p.suffix in (".h", ".cpp", ".cu")]
    assert csrc, "no native sources in the checkout"
    missing = [f for f in csrc if f"fewbit_dist/csrc/{f}" not in wheel_names]
    assert not missing, f"native sources missing from the wheel: {missing}"
    assert "fewbit_dist/quant/builtin_tables.json" in wheel_names
    presets = sorted(p.name for p in (ROOT / "fewbit_dist" / "presets").glob("*.json"))
    if not presets:
        pytest.xfail("the presets are not in fewbit_dist/presets/ yet")
    assert PRESETS <= {Path(p).stem for p in presets}
    assert not [p for p in presets if f"fewbit_dist/presets/{p}" not in wheel_names]


def test_builder_finds_the_sources_of_a_checkout():
    # In a source checkout (editable install) the package folder has no csrc/: the repository's is used.
    assert builder.find_csrc() == ROOT / "csrc"
    for src in builder.cpu_sources() + builder.cuda_sources() + builder.include_paths():
        assert Path(src).exists(), src


def test_report_lists_every_registered_op_and_the_cpu_binding_implements_it():
    ops = report.registered_ops()
    assert {"fewbit::encode_pack", "fewbit::unpack_scale", "fewbit::quantize_pack",
            "fewbit::unpack_dequantize"} <= set(ops)
    binding = set(re.findall(r'm\.def\("(\w+)"', (ROOT / "csrc" / "cpu" / "fewbit_cpu.cpp").read_text()))
    assert {op.split("::")[1] for op in ops} <= binding, "a registered op has no native CPU function"
    text = report.report(build=False)
    for op in ops:
        assert re.search(rf"^\s+cpu\s+{re.escape(op)} \.+ ", text, re.M), f"{op} missing from the report:\n{text}"


@pytest.mark.slow
def test_wheel_installed_outside_the_sources_works():
    """Builds the wheel, installs it (and a plain `pip install .`) into temporary folders and uses it from an
    empty folder: presets by name, the native JIT build, the report, hooks kept by convert."""
    if os.environ.get("FEWBIT_WHEEL_SMOKE_PASSED") == "1":
        pytest.skip("scripts/test.sh ran scripts/wheel_smoke.sh before pytest, and it passed")
    if shutil.which("git") is None:
        pytest.skip("needs git to copy the sources")
    env = dict(os.environ, FEWBIT_VENV=str(Path(sys.executable).parents[1]))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "wheel_smoke.sh")], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[wheel-smoke] passed" in out.stderr
