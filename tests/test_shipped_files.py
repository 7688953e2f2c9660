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
