"""ruff over src, tests and bench, with the rules in pyproject.toml ([tool.ruff])."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed, and CI must lint: pip install -e '.[test]'")
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "src", "tests",
               "bench"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"ruff check src tests bench:\n{result.stdout}{result.stderr}"
