"""benchmarks/native_isa_check.sh exits with the failing step's status (it always exited 0: its `exit 1` ran in a
pipeline's subshell and the script ended with `head`). Run on a copy, with a python3 stand-in on a bare PATH."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "native_isa_check.sh"
TOOLS = ("bash", "dirname", "mkdir", "grep", "cut", "nproc", "tee", "tail", "head", "timeout")
# python3 stand-in: cmake / ninja importable or not, then the pip build's and pytest's exit statuses
FAKE_PYTHON = """#!/bin/sh
case "$*" in
  *"import cmake"*) exit $CMAKE_RC ;;
  *"-m pip"*) exit $PIP_RC ;;
  *"-m pytest"*) echo "1 failed"; exit $PYTEST_RC ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None or not Path("/bin/sh").exists(), reason="needs bash and /bin/sh")
@pytest.mark.parametrize("cmake_rc, pip_rc, pytest_rc, status, message", [
    (1, 0, 0, 1, "cmake / ninja missing"),
    (0, 3, 0, 3, "pip install of the extension failed (exit 3)"),
    (0, 0, 1, 1, "pytest exit 1"),
    (0, 0, 0, 0, "pytest exit 0")])
def test_a_failing_step_fails_the_script(tmp_path, cmake_rc, pip_rc, pytest_rc, status, message):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks")
    bin_dir = tmp_path / "bin"  # no cmake / ninja on this PATH
    bin_dir.mkdir()
    for tool in TOOLS:
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = {"PATH": str(bin_dir), "OUT": str(tmp_path / "out"), "CXX": "true", "CMAKE_RC": str(cmake_rc),
           "PIP_RC": str(pip_rc), "PYTEST_RC": str(pytest_rc)}
    done = subprocess.run([shutil.which("bash"), str(tmp_path / "benchmarks" / "native_isa_check.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stdout + done.stderr
    assert message in (tmp_path / "out" / "native_isa_check.log").read_text()
