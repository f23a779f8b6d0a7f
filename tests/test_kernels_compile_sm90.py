"""Every Triton kernel variant compiles for an H100/H200 (sm_90) on this GPU-less machine.

The interpreter accepts code the GPU compiler rejects; this test caught two such bugs (a constexpr-branch
early return that compiled an fp16 x int8 tl.dot, and attention tiles that took minutes to compile). It runs
``python -m dfqvit.kernels.compile_check`` in a child process without ``TRITON_INTERPRET`` (the kernels are
fixed as interpreted or compiled at import), using the ``ptxas`` shipped in the triton wheel, and checks
each kernel's resources from its cubin (spills, register file, shared memory per block, wgmma) with the
``cuobjdump`` beside it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from dfqvit.kernels.compile_check import _cuobjdump


def _ptxas_available() -> bool:
    return any((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))


@pytest.mark.skipif(not _ptxas_available(), reason="this triton wheel has no bundled ptxas")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "dfqvit.kernels.compile_check", "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=1200)
    print(result.stdout[-3000:])
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0 and not failed, "\n".join(failed) or result.stderr[-3000:]
    assert "0 failed" in result.stdout
    if _cuobjdump() is None:
        return
    # Resources were read for every variant (the cuobjdump beside ptxas), and the tiles meant for wgmma got it.
    ok = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert ok and all(" spill=0 B " in line for line in ok), ok[:3]
    assert any("W4A8 fp16+residual 128x128x128/w8s3" in line and "mma=wgmma" in line for line in ok)
    # Triton pipelines wgmma across K steps only with an fp32 accumulator and both operands from the pipelined
    # copies: the dense weight-only GEMM (unpack-first), not the int8 ones nor the in-loop unpack.
    assert any("W4A16 unpack-first" in line and "mma=wgmma-async" in line for line in ok)


def _resources(**changes):
    from dfqvit.kernels.compile_check import Resources

    fields = dict(registers=128, spill_bytes=0, shared_bytes=96 * 1024, num_warps=8, mma="wgmma")
    return Resources(**{**fields, **changes})


def test_resource_limits_name_what_would_fail_on_the_gpu():
    from dfqvit.kernels.compile_check import resource_problems

    assert resource_problems(_resources(), 90, expect_wgmma=True) == []
    assert resource_problems(_resources(registers=255), 90, expect_wgmma=True) == []  # 255 x 256 fits 65536
    spill, = resource_problems(_resources(spill_bytes=24), 90, expect_wgmma=False)
    assert "spills 24 bytes" in spill
    regs, = resource_problems(_resources(registers=255, num_warps=16), 90, expect_wgmma=False)
    assert "register file" in regs
    # 227 KiB is sm_90's per-block opt-in limit, 163 KiB sm_80's; unknown architectures are not judged.
    assert resource_problems(_resources(shared_bytes=232448), 90, expect_wgmma=False) == []
    smem, = resource_problems(_resources(shared_bytes=232448 + 1024), 90, expect_wgmma=False)
    assert "shared memory" in smem and "sm_90" in smem
    assert resource_problems(_resources(shared_bytes=200 * 1024), 80, expect_wgmma=False)
    assert resource_problems(_resources(shared_bytes=10 ** 6), 75, expect_wgmma=False) == []
    # A tile meant for wgmma that fell back to mma.sync halves the MMA rate on Hopper (not a problem on sm_80).
    mma, = resource_problems(_resources(mma="mma.sync"), 90, expect_wgmma=True)
    assert "not wgmma" in mma
    assert resource_problems(_resources(mma="mma.sync"), 80, expect_wgmma=True) == []
    assert resource_problems(_resources(mma="mma.sync"), 90, expect_wgmma=False) == []
    assert resource_problems(_resources(mma="wgmma-async"), 90, expect_wgmma=True) == []
