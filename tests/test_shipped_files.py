import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_builtin_tables_and_docs_are_up_to_date():
    """The shipped tables and docs/tables.md equal a fresh recomputation (about 40 s)."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "make_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_demo_runs_and_reports_memory():
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "saved-activation memory:" in out.stdout and "after conversion" in out.stdout


def test_generated_figures_in_benchmarks_md_are_current():
    """BENCHMARKS.md's generated blocks equal what launch/docs_figures.py renders from the results files."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "docs_figures.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docs_figures_replaces_only_its_blocks(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import docs_figures

    doc = tmp_path / "B.md"
    doc.write_text("before 0.5x\n<!-- figures:decoder -->\n| typed by hand | 0.1x |\n<!-- /figures:decoder -->\n"
                   "between\n<!-- figures:finetune -->\n<!-- /figures:finetune -->\nafter\n")
    assert docs_figures.main(["--doc", str(doc), "--check"]) == 1  # the hand-typed row is stale
    assert docs_figures.main(["--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "typed by hand" not in text and text.startswith("before 0.5x\n") and text.endswith("\nafter\n")
    assert docs_figures.decoder_block() in text and docs_figures.finetune_block() in text
    assert docs_figures.main(["--doc", str(doc), "--check"]) == 0
    doc.write_text("no blocks here\n")
    with pytest.raises(ValueError, match="figures:decoder"):
        docs_figures.main(["--doc", str(doc)])
