"""The README quick start runs as written."""

import runpy
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_runs():
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"))
