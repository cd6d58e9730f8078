"""The GPU check's scripts on the CPU: they run on a lent GPU machine for minutes at most, so a Python
error found only there costs the whole run. The probe's smoke mode and the shell script's no-GPU path
must work here."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_step_probe_runs_and_finds_no_host_read_in_a_step(tmp_path):
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "bench.gpu_probe", "--device", "cpu", "--smoke", "--json", str(out),
                    "--markdown", str(tmp_path / "probe.md")], cwd=REPO, check=True, capture_output=True, timeout=300)
    probe = json.loads(out.read_text())
    assert set(probe["steps"]) == {"off", "5 dead", "128 dead"}
    for name, step in probe["steps"].items():
        assert step["python_reads"] == 0, (name, step["reads_by_kind"])
        assert step["synced_ms"] > 0 and step["rows_per_s"] > 0
    assert probe["feed"]["loader_rows_per_s"] > 0
    assert "| off |" in (tmp_path / "probe.md").read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_check_without_a_gpu_says_so_and_writes_its_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device" in result.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "| env | no CUDA device or triton |" in summary
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"][0]["part"] == "env"
