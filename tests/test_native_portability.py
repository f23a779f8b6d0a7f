"""The native extension's portable code (every CPU but x86-64) still compiles.

``kernels/csrc`` guards its x86 code (intrinsics, target attributes, AMX) with ``DFQVIT_X86``; a name used outside
those guards but declared inside them, or an x86-only attribute left unguarded, breaks the build on other CPUs
(aarch64 builds had both on 2026-12-02, found with a cross compiler). ``-DDFQVIT_NO_X86`` turns the x86 code off on
this host too, so the host compiler checks the names and guards of the portable code; an x86-only attribute left
outside the guards is still valid here (only a cross compiler shows that). A full build with the flag passed the
native tests on the scalar rung (README, "Native CPU backend").
"""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "kernels" / "csrc"
# The translation units with x86 code or that include headers with it (bindings.cpp and module.cpp have none).
SOURCES = ["cpu_isa.cpp", "packing.cpp", "qgemm_cpu.cpp", "attention_cpu.cpp", "act_quant_cpu.cpp"]


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler on PATH")
    return cxx


def test_native_sources_compile_without_x86_code():
    import torch.utils.cpp_extension as cpp

    cxx = _compiler()
    flags = ["-fsyntax-only", "-DDFQVIT_NO_X86", "-std=gnu++20", "-fopenmp", "-Wall",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(__import__('torch')._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-I{p}" for p in cpp.include_paths()]

    def check(name):
        done = subprocess.run([cxx, *flags, str(CSRC / name)], capture_output=True, text=True)
        return name, done.returncode, done.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(check, SOURCES))
    failed = {name: err[-3000:] for name, rc, err in results if rc != 0}
    assert not failed, f"the portable (non-x86) build of dfqvit._C does not compile: {failed}"
