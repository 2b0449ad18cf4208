"""`make gpu-check` (bench/gpu_check.py) on a machine without a GPU: every check reports FAIL or SKIP
with its reason in one table (never a traceback), and the exit code says a check failed. On a GPU
machine the same script runs the checks for real (README, "On a GPU")."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="checks the no-GPU report; on a GPU machine run `make gpu-check`")
def test_gpu_check_without_a_gpu_reports_each_check():
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "env,throughput,train-2step",
                          "--budget-s", "120"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table[1:]}
    assert rows == {"env": "FAIL", "throughput": "SKIP", "train-2step": "SKIP"}, out.stdout + out.stderr
    assert "torch sees no CUDA GPU" in out.stdout
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr


def test_gpu_check_refuses_unknown_checks():
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "env,warp-drive"], check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "warp-drive" in out.stderr
