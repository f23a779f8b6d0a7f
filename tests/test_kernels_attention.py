"""Quantized attention: P codes exact vs the reference, output within tolerance, Swin bias/mask, op, errors.

Tolerances: with softmax_math="exact" (the interpreter's default) P codes are compared with ``torch.equal`` (the
kernel and reference run the same portable fp32 softmax: polynomial exp2, fixed-point row sum, exact log2
rounding; under the interpreter every operation matches). On a GPU the compiler may contract multiply-adds into
FMAs, so codes may move by one level on at most 0.1% of entries. softmax_math="fast" (log-domain codes, the CUDA
default) may move a code by one level on at most 1e-4 of entries in the kernel tests and 1e-5 in the claim test
(measured ~1e-6 with hardware-sized exp2 errors). The output differs only in the fp32 summation order of P.V and
the order of the final scale: relative max-abs error <= 1e-5 for fp32 output, and <= one fp16 ulp (2**-10
relative) for fp16 output; where fast codes differ, SQNR >= 40 dB.
"""
from __future__ import annotations

import math

import pytest
import torch

from dfqvit.kernels import KernelInputError, reference
from dfqvit.kernels.attention import attention_linear_triton, attention_log2_triton
from kernel_utils import TRITON_DEVICE, gpu, random_int8, requires_triton, sqnr_db

GEN = torch.Generator().manual_seed(11)


def _qkv(b, h, n, d):
    return random_int8((b, h, n, d), GEN), random_int8((b, h, n, d), GEN), random_int8((b, h, n, d), GEN)


def _scales(d):
    # Logits of a few units after sm_scale, as in a calibrated ViT: probabilities spread over many levels.
    return dict(q_scale=0.03, q_zero=3, k_scale=0.025, k_zero=-5, v_scale=0.05, v_zero=1, sm_scale=d ** -0.5)


def _run_log2(q, k, v, s, bias, mask, p_bits, out_dtype, block_m=None, softmax_math=None):
    args = (q, k, v, s["q_scale"], s["q_zero"], s["k_scale"], s["k_zero"], s["v_scale"], s["v_zero"], s["sm_scale"],
            bias, mask)
    dev = [None if t is None else t.to(TRITON_DEVICE) for t in (q, k, v, bias, mask)]
    dargs = (*dev[:3], *args[3:10], dev[3], dev[4])
    out, codes = attention_log2_triton(*dargs, 1.0, p_bits, out_dtype, return_codes=True, block_m=block_m,
                                       softmax_math=softmax_math)
    ref_codes = reference.attention_log2_codes_reference(q, k, s["q_scale"], s["q_zero"], s["k_scale"], s["k_zero"],
                                                         s["sm_scale"], bias, mask, 1.0, p_bits)
    ref_out = reference.attention_log2_reference(*args, 1.0, p_bits, out_dtype)
    return out.cpu(), codes.cpu(), ref_out, ref_codes


def _assert_out_close(out, ref):
    scale = float(ref.float().abs().max())
    tol = 1e-5 if out.dtype == torch.float32 else 2.0 ** -10
    assert float((out.float() - ref.float()).abs().max()) <= tol * scale


@requires_triton
# 8-bit log2 has no representable ratio floor in fp32 (2**-258 -> 0): log2(0) = -inf -> the underflow code,
# exactly as in the reference; numpy (the interpreter) warns about it.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # rint(inf)
@pytest.mark.parametrize("b,h,n,d", [(2, 3, 65, 16), (1, 2, 17, 24), (2, 1, 197, 64), (1, 2, 33, 80)])
@pytest.mark.parametrize("p_bits", [3, 4, 8])
def test_log2_codes_exact_and_output_close(b, h, n, d, p_bits):
    q, k, v = _qkv(b, h, n, d)
    out_dtype = torch.float16 if p_bits == 4 else torch.float32
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, _scales(d), None, None, p_bits, out_dtype, block_m=16)
    assert codes.dtype == torch.int16 and codes.shape == (b, h, n, n)
    assert len(codes.unique()) >= min(2 ** p_bits, 6)  # probabilities spread over many levels
    if p_bits <= 4:
        assert bool((codes == 2 ** p_bits).any())  # the underflow code occurs too
    assert torch.equal(codes, ref_codes)
    _assert_out_close(out, ref_out)


@requires_triton
@pytest.mark.parametrize("p_bits", [3, 4])
def test_log2_codes_exact_when_every_tile_takes_the_divisions(monkeypatch, p_bits):
    """The fast ratio's fallback: with a margin covering every mantissa, each tile runs the two IEEE divisions."""
    from dfqvit.kernels import attention

    monkeypatch.setattr(attention, "FAST_RATIO_NEAR_ULPS", 2 ** 23)
    q, k, v = _qkv(2, 2, 37, 16)
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, _scales(16), None, None, p_bits, torch.float32, block_m=16)
    assert torch.equal(codes, ref_codes)
    _assert_out_close(out, ref_out)


def test_fast_log2_ratio_gives_the_reference_code_away_from_the_boundary():
    """The claim behind attention._log2_ratio_fast, in fp32 PyTorch (IEEE round-to-nearest like the GPU): the
    product e * RN(RN(1/s) * RN(1/delta)) is within 6 * 2**-24 (relative) of RN(RN(e / s) / delta), and when its
    mantissa is more than 16 ulps from sqrt(2)'s the two give the same round(-log2) code (2**-64 floor, 6 bits)."""
    from dfqvit.kernels import portable_math

    gen = torch.Generator().manual_seed(2)
    n = 2_000_000
    e = portable_math.exp2(-torch.rand(n, generator=gen) * 70)
    s = 1 + torch.rand(n, generator=gen) * 255
    delta = torch.exp2(-torch.rand(n, generator=gen) * 12)
    exact = (e / s) / delta
    fast = e * ((1 / s) * (1 / delta))
    assert float(((fast.double() - exact.double()) / exact.double()).abs().max()) <= 6 * 2.0 ** -24
    floor = torch.tensor(2.0 ** -66)
    codes = [torch.clamp(portable_math.round_neg_log2(torch.maximum(r, floor)), 0, 64) for r in (fast, exact)]
    mantissa = torch.maximum(fast, floor).view(torch.int32) & 0x7FFFFF
    near = (mantissa - 0x3504F4).abs() <= 16
    assert torch.equal(codes[0][~near], codes[1][~near])
    assert int(near.sum()) < n * 1e-4  # the fallback is rare


@requires_triton
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
def test_log2_codes_exact_at_the_largest_accumulator():
    """d = 64 and (q - q_zero)(k - k_zero) = -255 * 255 in every term: |acc| = 4,161,600, just under the 2**22
    up to which the kernel converts the int32 accumulator to fp32 through the magic constant."""
    q, k, v = _qkv(1, 2, 40, 64)
    q[:, :, :5] = -128
    k[:, :, :3] = 127
    s = dict(q_scale=2e-4, q_zero=127, k_scale=2e-4, k_zero=-128, v_scale=0.05, v_zero=1, sm_scale=0.125)
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, s, None, None, 4, torch.float32, block_m=16)
    assert torch.equal(codes, ref_codes)
    _assert_out_close(out, ref_out)


def _fast_logits_on_gpu(acc, s):
    """d = t - max t as the CUDA kernel computes it for ViT rows (no bias or mask): f = magic + acc in fp32 (exact),
    the row maximum of f, then one FFMA per element, fma(f, s, -RN(max f * s)), emulated in float64 (f * s has 48
    significant bits, and its difference from the fp32 constant is exact there too), rounded once to fp32."""
    f = acc.to(torch.float32) + 12582912.0
    s32 = torch.tensor(s, dtype=torch.float32)
    m = (f.amax(-1, keepdim=True) * s32).double()  # RN(max f * s) in fp32
    return (f.double() * s32.double() - m).float()


def _fast_codes_emulated(d, delta, p_bits, gen, rel_err):
    """_log2_codes_fast in fp32 PyTorch from d = t - max t, each exp2 off by up to ``rel_err`` (relative) and the
    row's log2 by up to ``rel_err`` (absolute), at random: the GPU's ex2.approx is within 2**-22 relative."""
    e = torch.exp2(d) * (1 + (torch.rand(d.shape, generator=gen) * 2 - 1) * rel_err)
    c = torch.log2(e.sum(-1, keepdim=True)) + (torch.rand(d.shape[0], 1, generator=gen) * 2 - 1) * rel_err
    return torch.round(torch.clamp(c + math.log2(delta) - d, 0, 2 ** p_bits))


def _weighing(codes, p_bits):
    """Codes as P.V sees them: every code past reference.log2_pv_shift weighs 0, so they are one class."""
    return torch.clamp(codes.int(), max=reference.log2_pv_shift(p_bits) + 1)


@pytest.mark.parametrize("p_bits", [3, 4, 6, 8])
def test_fast_softmax_claim_one_level_on_few_entries(p_bits):
    """The claim behind softmax_math="fast", in fp32 PyTorch with the GPU's arithmetic (the FFMA of
    _fast_logits_on_gpu) and hardware-sized exp2/log2 errors (2**-21, twice ex2.approx's bound): against the
    reference's codes (t = RN(acc * s), polynomial exp2, fixed-point sum, two divisions, exact round(-log2)),
    codes differ by at most one level on at most 1e-5 of entries (measured: ~1e-6)."""
    from dfqvit.kernels import portable_math

    gen = torch.Generator().manual_seed(6)
    rows, n = 6000, 197
    for spread, s in ((2.0, 3e-3), (6.0, 1e-4), (15.0, 7.7e-5)):  # flat to peaked rows; |acc| < 2**21
        acc = torch.round(torch.randn(rows, n, generator=gen) * spread / s).to(torch.int32)
        t = acc.to(torch.float32) * torch.tensor(s, dtype=torch.float32)
        delta = float(torch.tensor(2.0 ** -(torch.rand(1, generator=gen).item() * 3), dtype=torch.float32))
        e = portable_math.exp2(t - t.amax(-1, keepdim=True))
        want = reference.log2_quantize(e / portable_math.row_sum(e), delta, p_bits)
        got = _fast_codes_emulated(_fast_logits_on_gpu(acc, s), delta, p_bits, gen, 2.0 ** -21)
        diff = (_weighing(got, p_bits) - _weighing(want, p_bits)).abs()
        assert int(diff.max()) <= 1
        assert float((diff > 0).float().mean()) <= 1e-5
        assert len(want.unique()) >= min(2 ** p_bits, 8)  # rows spread over many levels


def test_fast_logits_differ_from_the_references_by_a_row_constant_and_rounding():
    """The FFMA form of t - max t equals RN(acc * s) - max RN(acc * s) up to a constant per row (RN(max f * s)'s
    error, which the softmax ignores) and two roundings of the logits' size: measured against float64."""
    gen = torch.Generator().manual_seed(3)
    for s in (3e-3, 1e-4, 2e-5):  # logits of a few units, as in a calibrated ViT; |acc| < 2**21
        acc = torch.clamp(torch.randn(64, 197, generator=gen) * 3 / s, -2 ** 21 + 1, 2 ** 21 - 1).round().int()
        d = _fast_logits_on_gpu(acc, s).double()
        exact = (acc.double() - acc.double().amax(-1, keepdim=True)) * float(torch.tensor(s, dtype=torch.float32))
        offset = (d - exact)[:, :1]  # the row's constant
        err = (d - exact - offset).abs()
        assert float(err.max()) <= 2 * 2.0 ** -24 * float(exact.abs().max()) + 1e-300
        assert float(offset.abs().max()) <= 2.0 ** -24 * 2 ** 24 * s  # half an ulp of max f * s ~ 2**23 * s
        # Without the fused multiply-add (f * s rounded first, as the interpreter's tl.fma does) it fails.
        f = acc.to(torch.float32) + 12582912.0
        s32 = torch.tensor(s, dtype=torch.float32)
        unfused = (f * s32 - (f.amax(-1, keepdim=True) * s32)).double()
        unfused_err = (unfused - exact - (unfused - exact)[:, :1]).abs()
        assert float(unfused_err.max()) > 4 * 2.0 ** -24 * float(exact.abs().max())


@requires_triton
@pytest.mark.parametrize("b,h,n,d,p_bits", [(2, 3, 65, 16, 4), (2, 1, 197, 64, 4), (1, 2, 33, 80, 3),
                                           (2, 2, 49, 32, 6), (2, 1, 197, 64, 8)])
def test_fast_softmax_kernel_codes_within_one_level(b, h, n, d, p_bits):
    """softmax_math="fast" in the kernel: codes within one level of the reference on at most 1e-4 of entries (0
    under the interpreter, whose numpy exp2/log2 are accurate), and the output close to the reference's."""
    q, k, v = _qkv(b, h, n, d)
    out, codes, ref, ref_codes = _run_log2(q, k, v, _scales(d), None, None, p_bits, torch.float32, block_m=16,
                                           softmax_math="fast")
    got, want = _weighing(codes, p_bits), _weighing(ref_codes, p_bits)
    diff = (got - want).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-4
    assert len(ref_codes.unique()) >= 6 and (p_bits > 4 or bool((ref_codes == 2 ** p_bits).any()))
    if torch.equal(got, want):
        _assert_out_close(out, ref)
    assert sqnr_db(ref, out) >= 40


@requires_triton
def test_fast_softmax_with_swin_bias_and_mask():
    """Relative-position bias and a shifted-window mask (-100 entries) go through the log-domain codes too."""
    nw, h, n, d = 4, 2, 49, 32
    q, k, v = _qkv(2 * nw, h, n, d)
    bias = torch.randn(h, n, n, generator=GEN)
    mask = torch.where(torch.rand(nw, n, n, generator=GEN) < 0.3, -100.0, 0.0)
    _, codes, _, ref_codes = _run_log2(q, k, v, _scales(d), bias, mask, 4, torch.float16, block_m=16,
                                       softmax_math="fast")
    diff = (codes.int() - ref_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-4
    assert bool((ref_codes[mask.repeat(2, 1, 1)[:, None].expand_as(ref_codes) < 0] == 16).all())  # masked: zero


@requires_triton
def test_softmax_math_choice(monkeypatch):
    """Default: exact on the CPU (interpreter), fast on CUDA; DFQVIT_SOFTMAX_MATH, the override block and the
    argument choose, in increasing precedence; a wrong name is an error naming the choices."""
    from dfqvit.kernels.attention import resolve_softmax_math, softmax_math_override

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DFQVIT_SOFTMAX_MATH", raising=False)
    assert (resolve_softmax_math(cpu), resolve_softmax_math(cuda)) == ("exact", "fast")
    monkeypatch.setenv("DFQVIT_SOFTMAX_MATH", "exact")
    assert resolve_softmax_math(cuda) == "exact"
    with softmax_math_override("fast"):
        assert resolve_softmax_math(cpu) == "fast"
        assert resolve_softmax_math(cpu, "exact") == "exact"
    assert resolve_softmax_math(cuda) == "exact"
    monkeypatch.setenv("DFQVIT_SOFTMAX_MATH", "quick")
    with pytest.raises(KernelInputError, match="DFQVIT_SOFTMAX_MATH='quick'.*'exact'.*'fast'"):
        resolve_softmax_math(cpu)
    monkeypatch.delenv("DFQVIT_SOFTMAX_MATH")
    with pytest.raises(KernelInputError, match="softmax_math='approx'"):
        _run_log2(*_qkv(1, 2, 21, 16), _scales(16), None, None, 4, torch.float32, softmax_math="approx")


@requires_triton
@pytest.mark.parametrize("p_bits,p_zero", [(4, 0), (8, 3)])
def test_linear_codes_exact_and_output_close(p_bits, p_zero):
    b, h, n, d = 2, 2, 65, 32
    q, k, v = _qkv(b, h, n, d)
    s = _scales(d)
    p_scale = 1.0 / (2 ** p_bits - 1 - p_zero)
    args = (q, k, v, s["q_scale"], s["q_zero"], s["k_scale"], s["k_zero"], s["v_scale"], s["v_zero"], s["sm_scale"],
            None, None, p_scale, p_zero, p_bits, torch.float32)
    out, codes = attention_linear_triton(*[t.to(TRITON_DEVICE) for t in args[:3]], *args[3:], return_codes=True)
    ref_codes = reference.attention_linear_codes_reference(q, k, s["q_scale"], s["q_zero"], s["k_scale"],
                                                           s["k_zero"], s["sm_scale"], None, None, p_scale, p_zero,
                                                           p_bits)
    assert torch.equal(codes.cpu(), ref_codes)
    _assert_out_close(out.cpu(), reference.attention_linear_reference(*args))


@requires_triton
@pytest.mark.parametrize("mode", ["log2", "linear"])
def test_token_major_and_fused_output_codes_equal_the_unfused_path(mode):
    """token_major writes (B, N, H, d) (the projection's layout); out_grid writes the codes of quantizing the
    out_dtype result. Both must equal the unfused kernel's output transposed / quantized, bit for bit."""
    b, h, n, d = 2, 3, 37, 32
    q, k, v = (t.to(TRITON_DEVICE) for t in _qkv(b, h, n, d))
    s = _scales(d)
    args = (q, k, v, *[s[x] for x in ("q_scale", "q_zero", "k_scale", "k_zero", "v_scale", "v_zero", "sm_scale")],
            None, None)
    fn, p_args = ((attention_log2_triton, (1.0, 4)) if mode == "log2" else
                  (attention_linear_triton, (1 / 255, 0, 8)))
    plain = fn(*args, *p_args, torch.float16, block_m=32).cpu()
    tokens = fn(*args, *p_args, torch.float16, block_m=32, token_major=True).cpu()
    assert tokens.shape == (b, n, h, d) and tokens.is_contiguous()
    assert torch.equal(tokens, plain.transpose(1, 2))
    grid = (0.02, -3, -8, 7)
    codes = fn(*args, *p_args, torch.float16, block_m=32, token_major=True, out_grid=grid).cpu()
    expected = reference.uniform_quantize(plain.transpose(1, 2).float(), *grid).to(torch.int8)
    assert codes.dtype == torch.int8 and torch.equal(codes, expected)
    assert len(codes.unique()) > 8  # the grid is exercised, not saturated
    with pytest.raises(KernelInputError, match="out_qmax"):
        fn(*args, *p_args, torch.float16, block_m=32, out_grid=(0.02, 0, 5, 4))


@requires_triton
def test_swin_bias_and_shifted_window_mask():
    """(H, N, N) relative-position bias plus a (nW, N, N) mask; batch index b uses window b % nW."""
    n_windows, images, h, n, d = 2, 2, 2, 49, 32
    b = n_windows * images
    q, k, v = _qkv(b, h, n, d)
    bias = torch.randn(h, n, n, generator=GEN)
    mask = torch.where(torch.rand(n_windows, n, n, generator=GEN) < 0.3, -100.0, 0.0)
    s = _scales(d)
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, s, bias, mask, 4, torch.float32, block_m=32)
    assert torch.equal(codes, ref_codes)
    _assert_out_close(out, ref_out)
    # The reference's broadcasting is the documented one: window b % nW, bias shared by the batch.
    for batch_index in range(b):
        single = reference.attention_log2_codes_reference(
            q[batch_index:batch_index + 1], k[batch_index:batch_index + 1], s["q_scale"], s["q_zero"], s["k_scale"],
            s["k_zero"], s["sm_scale"], bias[None] + mask[batch_index % n_windows][None, None], None, 1.0, 4)
        assert torch.equal(single[0], ref_codes[batch_index])


@requires_triton
def test_half_precision_bias_and_mask_give_the_fp32_codes():
    """An fp16 bias was scaled by log2(e) in fp16 (the reference scales in fp32): codes moved on a few entries."""
    q, k, v = _qkv(4, 2, 49, 32)
    bias = (torch.randn(2, 49, 49, generator=GEN) * 4).half()
    mask = torch.where(torch.rand(2, 49, 49, generator=GEN) < 0.3, -100.0, 0.0).half()
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, _scales(32), bias, mask, 4, torch.float32, block_m=32)
    assert torch.equal(codes, ref_codes)
    _assert_out_close(out, ref_out)


@requires_triton
def test_seven_bit_log2_codes_exact():
    """P7's ratio floor 2**-130 is an fp32 subnormal, which Triton typed fp64: the kernel failed to compile."""
    q, k, v = _qkv(1, 2, 33, 16)
    out, codes, ref_out, ref_codes = _run_log2(q, k, v, _scales(16), None, None, 7, torch.float32, block_m=16)
    assert torch.equal(codes, ref_codes) and len(codes.unique()) >= 8
    _assert_out_close(out, ref_out)


def test_reference_approximates_float_attention():
    """8-bit linear P on dequantized q, k, v is close to fp64 softmax attention: the semantics are right."""
    b, h, n, d = 1, 2, 65, 32
    q, k, v = _qkv(b, h, n, d)
    s = _scales(d)
    out = reference.attention_linear_reference(q, k, v, *s.values(), None, None, 1 / 255, 0, 8, torch.float32)
    deq = [(t.double() - s[f"{name}_zero"]) * s[f"{name}_scale"] for t, name in ((q, "q"), (k, "k"), (v, "v"))]
    p = torch.softmax(deq[0] @ deq[1].transpose(-1, -2) * s["sm_scale"], dim=-1)
    assert sqnr_db(p @ deq[2], out) >= 25
    codes = reference.attention_log2_codes_reference(q, k, s["q_scale"], s["q_zero"], s["k_scale"], s["k_zero"],
                                                     s["sm_scale"], None, None, 1.0, 8)
    expected = torch.clamp(torch.round(-torch.log2(p.float())), 0, 256)
    assert float((codes.float() - expected).abs().max()) <= 1  # same quantizer, fp32 vs fp64 softmax


@pytest.mark.parametrize("with_bias_mask", [False, True])
def test_attention_ops_opcheck(with_bias_mask):
    b, h, n, d = 2, 2, 17, 16
    q, k, v = _qkv(b, h, n, d)
    bias = torch.randn(h, n, n) if with_bias_mask else None
    mask = torch.zeros(2, n, n) if with_bias_mask else None
    base = (q, k, v, 0.03, 1, 0.02, -2, 0.05, 0, 0.25, bias, mask)
    torch.library.opcheck(torch.ops.dfqvit.attention_log2.default, (*base, 1.0, 4, torch.float16))
    torch.library.opcheck(torch.ops.dfqvit.attention_linear.default, (*base, 1 / 15, 0, 4, torch.float32))


def test_attention_errors_say_what_was_given():
    q, k, v = _qkv(2, 2, 17, 16)

    def call(q=q, k=k, v=v, bias=None, mask=None, p_bits=4, out_dtype=torch.float16):
        return torch.ops.dfqvit.attention_log2(q, k, v, 0.1, 0, 0.1, 0, 0.1, 0, 0.25, bias, mask, 1.0, p_bits,
                                               out_dtype)

    with pytest.raises(KernelInputError, match="dtype float32"):
        call(q=q.float())
    with pytest.raises(KernelInputError, match="same shape"):
        call(k=k[:, :, :16])
    with pytest.raises(KernelInputError, match=r"N=300.*N <= 256"):
        big = random_int8((1, 1, 300, 16), GEN)
        call(q=big, k=big, v=big)
    with pytest.raises(KernelInputError, match="does not broadcast"):
        call(bias=torch.zeros(3, 17, 17))
    with pytest.raises(KernelInputError, match="not a multiple of the number of windows"):
        call(mask=torch.zeros(3, 17, 17))
    with pytest.raises(KernelInputError, match="p_bits=9"):
        call(p_bits=9)
    with pytest.raises(KernelInputError, match="out_dtype"):
        call(out_dtype=torch.int8)
    with pytest.raises(KernelInputError, match="p_zero=16"):
        torch.ops.dfqvit.attention_linear(q, k, v, 0.1, 0, 0.1, 0, 0.1, 0, 0.25, None, None, 0.1, 16, 4,
                                          torch.float16)


def test_attention_refuses_mixed_devices_and_abnormal_softmax_scales():
    """A meta bias beside CPU q, k, v gave uninitialized memory; p_delta 1e-45 / 1e39 crashed the interpreted kernel
    with a raw InterpreterError (Triton typed them fp64). Both are refused before any kernel runs."""
    q, k, v = _qkv(1, 2, 5, 8)
    with pytest.raises(KernelInputError, match="bias on meta"):
        torch.ops.dfqvit.attention_log2(q, k, v, 0.1, 0, 0.1, 0, 0.1, 0, 0.3, torch.zeros(2, 5, 5, device="meta"),
                                        None, 0.9, 4, torch.float32)
    for p_delta in (1e-45, 1e39, float("inf")):
        with pytest.raises(KernelInputError, match="p_delta=.*normal fp32"):
            attention_log2_triton(q, k, v, 0.1, 0, 0.1, 0, 0.1, 0, 0.3, None, None, p_delta, 4, torch.float32)
    with pytest.raises(KernelInputError, match="p_scale=.*normal fp32"):
        attention_linear_triton(q, k, v, 0.1, 0, 0.1, 0, 0.1, 0, 0.3, None, None, 1e39, 0, 4, torch.float32)


@pytest.mark.parametrize("softmax_math", ["fast", "exact"])
@pytest.mark.parametrize("p_bits", [3, 4, 8])
def test_cuda_kernel_at_vit_shape(p_bits, softmax_math):
    """GPU only: autotuned launch at ViT-B attention (B=8, H=12, N=197, d=64); codes may move by one level
    on at most 0.1% of entries (FMA contraction in 'exact', hardware exp2 in 'fast')."""
    q, k, v = _qkv(8, 12, 197, 64)
    s = _scales(64)
    args = (s["q_scale"], s["q_zero"], s["k_scale"], s["k_zero"], s["v_scale"], s["v_zero"], s["sm_scale"], None,
            None, 1.0, p_bits, torch.float16)
    out, codes = attention_log2_triton(q.cuda(), k.cuda(), v.cuda(), *args, return_codes=True,
                                       softmax_math=softmax_math)
    ref_codes = reference.attention_log2_codes_reference(q, k, *args[:4], args[6], None, None, 1.0, p_bits)
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3
    ref = reference.attention_log2_reference(q, k, v, *args)
    assert sqnr_db(ref.float(), out.float().cpu()) >= 40
    assert math.isfinite(float(out.float().abs().max()))


test_cuda_kernel_at_vit_shape = gpu[0](gpu[1](test_cuda_kernel_at_vit_shape))
