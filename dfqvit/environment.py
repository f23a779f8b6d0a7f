"""Where a measurement was taken: device, CPU, library versions and the code's git commit, recorded in every
benchmark JSON."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = REPO_ROOT) -> Optional[str]:
    """The checkout's commit (12 hex digits, "-dirty" when tracked files differ from it); None outside a git
    checkout or without git (an installed wheel)."""
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's processor or machine elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> dict:
    """The record of where a measurement on ``device`` was taken: the CUDA device's name, "cpu (<processor>)", or
    any other device as torch names it; CPU model, threads, versions and the git commit."""
    import timm

    import dfqvit

    device = torch.device(device)  # a name such as "cuda:0" as well
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"cpu ({platform.processor() or platform.machine()})"
    else:  # named as given: every non-CUDA device used to be recorded as "cpu"
        name = str(device)
    return {"device": name, "device_type": device.type, "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "triton": triton_version,
            "dfqvit": dfqvit.__version__, "git_commit": git_commit(), "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.version.cuda}
