"""tests/vae_kernels_cases.py (the fused IWAE output op's Triton kernels against the eager model,
finite differences and a loop over jobs) in a process of its own: Triton's interpreter, which
runs the kernels on a CPU, breaks once torch.compile has run in the process, as other test files
do. The cases' own pass/fail lines are the assertion message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("vae_kernels_cases.py")


@pytest.mark.parametrize("marker", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_the_kernels_cases_pass_in_a_process_of_their_own(marker):
    pytest.importorskip("triton", reason="triton is not installed")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", marker, str(CASES)],
                          cwd=CASES.parent.parent, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
