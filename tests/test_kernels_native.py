"""The optional native extension dfqvit._C packs bit for bit like packing.py (skipped when not built)."""
from __future__ import annotations

import importlib

import pytest
import torch

from dfqvit.kernels import reference


def _native():
    try:
        importlib.import_module("dfqvit._C")
    except ImportError:
        pytest.skip("dfqvit._C not built (DFQVIT_BUILD_EXT=1 pip install -e . builds it)")
    return torch.ops.dfqvit


@pytest.mark.parametrize("bits,group_k", [(4, 16), (4, 64), (3, 32), (3, 128)])
@pytest.mark.parametrize("k", [1, 40, 100, 129])
def test_native_packing_matches_reference(bits, group_k, k):
    ops = _native()
    codes = torch.randint(0, 2 ** bits, (17, k), generator=torch.Generator().manual_seed(k)).to(torch.uint8)
    packed = ops.native_pack_weight(codes, bits, group_k)
    assert torch.equal(packed, reference.pack_weight_reference(codes, bits, group_k))
    assert torch.equal(ops.native_unpack_weight(packed, bits, k, group_k), codes)


def test_native_packing_rejects_bad_arguments():
    ops = _native()
    with pytest.raises(RuntimeError, match="storage_bits=5"):
        ops.native_pack_weight(torch.zeros(2, 16, dtype=torch.uint8), 5, 16)
