"""Benchmark JSONs record where they were measured: CPU model and the code's git commit."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from dfqvit.environment import REPO_ROOT, cpu_model, describe_environment, git_commit


def test_environment_names_the_cpu_and_the_commit():
    env = describe_environment(torch.device("cpu"))
    assert env["cpu_model"] == cpu_model() and env["cpu_model"]
    assert env["git_commit"] == git_commit()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_git_commit_is_the_checkouts_head():
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit = git_commit()
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", commit)
    assert head.startswith(commit.removesuffix("-dirty"))


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert git_commit(tmp_path) is None
