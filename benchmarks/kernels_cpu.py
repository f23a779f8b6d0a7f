"""CPU benchmark of the native backend (``python benchmarks/kernels.py --cpu``), every ratio measured in one run.

1. GEMM at the linear shapes of the CIFAR reference ViT (dim 192, MLP 768; M = 8 x 65 and 64 x 65) and of
   DeiT-S (dim 384, MLP 1536; M = 64 x 197): fp32 ``F.linear`` (what timm runs) against the native W4A8 GEMM on
   prepacked panels with a float epilogue (scale + bias, fp32 out, like ``F.linear``) and with the int8
   re-quantizing epilogue (what the engine runs between fc1 and fc2), and W3A8.
2. Attention at the CIFAR shape (B = 64, 3 heads, N = 65, d = 64): fp32 SDPA against the native log2 attention.
3. The whole model at batch 64 on the CIFAR reference ViT: fp32 timm, PyTorch dynamic int8 quantization
   (``torch.ao.quantization.quantize_dynamic``), the dfqvit engine at W4A8 with the native backend and with
   the PyTorch reference backend, and at W4A4 (the default) native; images/s and weight bytes of the Linear layers.
4. The instruction sets side by side: the same native GEMMs (W4A8, W8A8; DeiT-S shapes at batch 8) and the whole
   CIFAR engine (W4A8, W8A8, W4A4) under every ISA this CPU runs (avx2, avx512_vnni, amx_int8; forced per call),
   interleaved in one set of rounds.
5. (Not with ``--quick``.) A whole DeiT-S at 224 px, batch 8, random weights (timm ``pretrained=False``; speed does
   not depend on them): fp32 timm against the W4A8 engine under each ISA.

Timings are medians of interleaved repetitions (each provider once per round, so load changes hit all
alike) after two warm-up calls, on ``torch.get_num_threads()`` threads. From the command line, glibc's malloc
first gets mmap and trim thresholds of 1 GiB (``keep_freed_memory_in_heap``; ``--default-malloc`` skips it):
with the defaults, some runs gave memory back to the kernel after every call and faulted it in again on the next
one (the fp32 timm model: ~22,700 minor faults, ~90 MB, per batch-64 forward, and the provider run after it
~5,000), others none, which moved the whole-model ratio by +-10% between runs. Writes JSON and a markdown table
to ``--out`` (``kernels_cpu_<timestamp>``, ``-2`` etc. when that name is taken); without ``dfqvit._C`` it says so
and exits 0.
"""
from __future__ import annotations

import ctypes
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from dfqvit.environment import describe_environment
from dfqvit.errors import DFQViTError
from dfqvit.kernels import native, pack_weight
from dfqvit.paths import output_folder, unique_stem, write_json

CIFAR_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "vit_mini_c10.json"
SHAPES = {"cifar_vit": (192, 768, 65), "deit_s": (384, 1536, 197)}
GEMM_CASES = [("cifar_vit", 8), ("cifar_vit", 64), ("deit_s", 64)]
GEMM_TARGET = 2.0      # W4A8 GEMM >= 2x fp32 matmul throughput
ENGINE_TARGET = 2.0    # engine W4A8 >= 2x fp32 timm images/s (and faster than quantize_dynamic)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
STEADY_THRESHOLD = 1 << 30


def keep_freed_memory_in_heap() -> dict:
    """glibc: freed blocks below 1 GiB stay in the process (no munmap, no heap trim), so no provider pays page
    faults for memory it had last call. Process-wide: every provider runs under it. Returns what was applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {"applied": False, "why": "not glibc"}
    applied = (libc.mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, STEADY_THRESHOLD) == 1)
    return {"applied": applied, "M_MMAP_THRESHOLD": STEADY_THRESHOLD, "M_TRIM_THRESHOLD": STEADY_THRESHOLD}


def interleaved_medians(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function, measured round-robin after two warm-up calls."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def linear_layers(dim: int, mlp: int) -> dict:
    """(N, K) of each Linear of one transformer block."""
    return {"qkv": (3 * dim, dim), "proj": (dim, dim), "fc1": (mlp, dim), "fc2": (dim, mlp)}


def gemm_rounds(m: int, n: int, k: int, shape_seconds: float, min_rounds: int, max_rounds: int) -> int:
    """Interleaved rounds for one shape: about shape_seconds of fp32 F.linear calls (estimated at 100 GFLOP/s),
    within [min_rounds, max_rounds]. Sub-millisecond shapes get hundreds of rounds: with 60, the batch-8 medians
    moved by up to 20% between runs on this shared 2-core VM."""
    return max(min_rounds, min(max_rounds, int(shape_seconds / (m * n * k / 5e10))))


def random_prepacked(bits: int, n: int, k: int, gen: torch.Generator):
    """A random (n, k) weight packed at ``bits`` and its CPU panels (speed does not depend on the values)."""
    low = -128 if bits == 8 else 0  # int8 storage holds signed codes
    codes = torch.randint(low, low + 2 ** bits, (n, k), generator=gen)
    packed = pack_weight(codes.to(torch.int8 if bits == 8 else torch.uint8), torch.rand(n, generator=gen),
                         torch.randint(low, low + 2 ** bits, (n,), generator=gen).int(), bits)
    return packed, native.prepack(packed.data, bits, k, packed.group_k)


def gemm_rows(shape_seconds: float, min_rounds: int, max_rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model, batch in GEMM_CASES:
        dim, mlp, tokens = SHAPES[model]
        m = batch * tokens
        for layer, (n, k) in linear_layers(dim, mlp).items():
            x, w, bias = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
            a = torch.randint(-128, 128, (m, k), generator=gen).to(torch.int8)
            fns = {"fp32_linear": lambda: F.linear(x, w, bias)}
            for bits in (4, 3):
                packed, panels = random_prepacked(bits, n, k, gen)
                args = (a, 0.02, 3, panels, n, packed.w_scale, packed.w_zero, packed.w_col_sums, bias, None, bits, k,
                        False)
                fns[f"w{bits}a8_f32out"] = lambda args=args: native.qgemm_prepacked(*args, None, 0, 0, 0, torch.float32)
                if bits == 4:
                    fns["w4a8_int8out"] = lambda args=args: native.qgemm_prepacked(*args, 0.05, 0, -128, 127, torch.int8)
            rounds = gemm_rounds(m, n, k, shape_seconds, min_rounds, max_rounds)
            med = interleaved_medians(fns, rounds)
            row = {"model": model, "batch": batch, "layer": layer, "m": m, "n": n, "k": k, "rounds": rounds,
                   "ms": {p: v * 1e3 for p, v in med.items()}}
            row["speedup_vs_fp32"] = {p: med["fp32_linear"] / v for p, v in med.items() if p != "fp32_linear"}
            rows.append(row)
            print(f"  {model:9s} b{batch:<3d} {layer:4s} M={m:5d} N={n:4d} K={k:4d}  fp32 {row['ms']['fp32_linear']:7.2f} ms"
                  + "".join(f"  {p} {row['ms'][p]:7.2f} ms ({row['speedup_vs_fp32'][p]:.2f}x)"
                            for p in fns if p != "fp32_linear"))
    return rows


def attention_row(rounds: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    b, h, n, d = 64, 3, 65, 64
    q, k, v = (torch.randint(-128, 128, (b, h, n, d), generator=gen).to(torch.int8) for _ in range(3))
    qf, kf, vf = (t.float() * 0.05 for t in (q, k, v))
    fns = {"fp32_sdpa": lambda: F.scaled_dot_product_attention(qf, kf, vf),
           "native_log2_a8": lambda: native.attention(q, k, v, 0.05, 0, 0.05, 0, 0.05, 0, d ** -0.5, None, None,
                                                      native.P_MODE_LOG2, 1.0, 0, 8, torch.float32),
           "native_log2_a4": lambda: native.attention(q, k, v, 0.05, 0, 0.05, 0, 0.05, 0, d ** -0.5, None, None,
                                                      native.P_MODE_LOG2, 1.0, 0, 4, torch.float32)}
    med = interleaved_medians(fns, rounds)
    row = {"batch": b, "heads": h, "seq": n, "head_dim": d, "ms": {p: v * 1e3 for p, v in med.items()},
           "speedup_vs_fp32": {p: med["fp32_sdpa"] / v for p, v in med.items() if p != "fp32_sdpa"}}
    print("  " + "  ".join(f"{p} {row['ms'][p]:.2f} ms" for p in fns))
    return row


def isa_ladder() -> list[str]:
    """The vector ISAs this CPU runs, lowest first (the scalar kernels are left out: they exist for correctness)."""
    ladder = ["avx2", "avx512_vnni", "amx_int8"]
    detected = native.detected_isa()
    return ladder[: ladder.index(detected) + 1] if detected in ladder else []


def _under(isa: str, fn):
    """fn run with the native kernels forced to isa (the ISA is restored after the call)."""
    def call():
        previous = native.set_isa(isa)
        try:
            return fn()
        finally:
            native.set_isa(previous)
    return call


def isa_rows(engine_batch: int, gemm_rounds: int, engine_rounds: int) -> dict:
    """Per case, the median ms under each ISA of isa_ladder() (interleaved rounds) and the speed-up over avx2."""
    import dfqvit
    from dfqvit.engine import build_engine
    from dfqvit.models.loading import load_model

    isas = isa_ladder()
    if len(isas) < 2:
        return {"isas": isas, "skipped": "this CPU runs one vector ISA: nothing to compare"}
    gen = torch.Generator().manual_seed(3)
    cases = []  # (name, {isa: fn}, rounds)
    dim, mlp, tokens = SHAPES["deit_s"]
    m = 8 * tokens
    for bits in (4, 8):
        for layer, (n, k) in linear_layers(dim, mlp).items():
            a = torch.randint(-128, 128, (m, k), generator=gen).to(torch.int8)
            w, panels = random_prepacked(bits, n, k, gen)
            fn = (lambda a=a, w=w, panels=panels, n=n, k=k, bits=bits: native.qgemm_prepacked(
                a, 0.02, 3, panels, n, w.w_scale, w.w_zero, w.w_col_sums, None, None, bits, k, False, None, 0, 0, 0,
                torch.float32))
            cases.append((f"gemm W{bits}A8 deit_s b8 {layer} (M {m}, N {n}, K {k})", fn, gemm_rounds))
    if CIFAR_MODEL.exists():
        model, _ = load_model(str(CIFAR_MODEL))
        model.eval()
        calib = torch.randn(32, 3, 32, 32, generator=gen)
        x = torch.randn(engine_batch, 3, 32, 32, generator=gen)
        for bits in ((4, 8), (8, 8), (4, 4)):  # W4A4: the default, 4-bit softmax codes
            qmodel = dfqvit.compile(model, bits=bits, calib=calib, recon=None, correction=None, progress=False,
                                    backend="fake")
            engine = build_engine(qmodel, backend="native")
            cases.append((f"engine W{bits[0]}A{bits[1]} cifar_vit b{engine_batch}", lambda e=engine: e(x),
                          engine_rounds))
    rows = []
    with torch.no_grad():
        for name, fn, rounds in cases:
            results = {isa: _under(isa, fn)() for isa in isas}
            same = all(torch.equal(results[isa], results[isas[0]]) for isa in isas)
            med = interleaved_medians({isa: _under(isa, fn) for isa in isas}, rounds)
            row = {"case": name, "rounds": rounds, "ms": {i: v * 1e3 for i, v in med.items()},
                   "speedup_vs_avx2": {i: med["avx2"] / v for i, v in med.items()}, "bit_identical": same}
            rows.append(row)
            print(f"  {name:48s} " + "  ".join(f"{i} {row['ms'][i]:8.2f} ms ({row['speedup_vs_avx2'][i]:.2f}x)"
                                               for i in isas) + ("" if same else "  OUTPUTS DIFFER"))
    return {"isas": isas, "rows": rows}


def deit_engine_row(batch: int, rounds: int) -> dict:
    """fp32 timm DeiT-S (random weights) and the native W4A8 engine of it under each ISA, interleaved."""
    import timm
    import dfqvit
    from dfqvit.engine import build_engine

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    gen = torch.Generator().manual_seed(4)
    calib, x = torch.randn(4, 3, 224, 224, generator=gen), torch.randn(batch, 3, 224, 224, generator=gen)
    qmodel = dfqvit.compile(model, bits=(4, 8), calib=calib, recon=None, correction=None, progress=False,
                            backend="fake")
    engine = build_engine(qmodel, backend="native")
    fns = {"fp32_timm": lambda: model(x), **{f"dfqvit_w4a8_{isa}": _under(isa, lambda: engine(x))
                                             for isa in isa_ladder()}}
    with torch.no_grad():
        outs = [fn() for name, fn in fns.items() if name != "fp32_timm"]
        same = all(torch.equal(o, outs[0]) for o in outs)
        med = interleaved_medians(fns, rounds)
    row = {"model": "deit_small_patch16_224 (random weights)", "batch": batch, "rounds": rounds,
           "ms": {p: v * 1e3 for p, v in med.items()}, "images_per_s": {p: batch / v for p, v in med.items()},
           "speedup_vs_fp32": {p: med["fp32_timm"] / v for p, v in med.items() if p != "fp32_timm"},
           "engine_outputs_identical_across_isas": same}
    for p in fns:
        print(f"  {p:24s} {row['ms'][p]:8.1f} ms  {row['images_per_s'][p]:6.1f} img/s"
              + (f"  ({row['speedup_vs_fp32'][p]:.2f}x fp32)" if p != "fp32_timm" else ""))
    return row


def linear_weight_bytes(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, torch.nn.Linear))


def engine_rows(batch: int, rounds: int) -> dict:
    import dfqvit
    from dfqvit.engine import build_engine
    from dfqvit.engine.pack import PackedLinear
    from dfqvit.models.loading import load_model

    if not CIFAR_MODEL.exists():
        return {"skipped": f"reference model not found at {CIFAR_MODEL}"}
    model, _ = load_model(str(CIFAR_MODEL))
    model.eval()
    gen = torch.Generator().manual_seed(2)
    calib, x = torch.randn(32, 3, 32, 32, generator=gen), torch.randn(batch, 3, 32, 32, generator=gen)
    # Speed does not depend on the calibration: Gaussian images, no reconstruction, no correction.
    qmodel = dfqvit.compile(model, bits=(4, 8), calib=calib, recon=None, correction=None, progress=False,
                            backend="fake")
    engine_native, engine_torch = build_engine(qmodel, backend="native"), build_engine(qmodel, backend="torch")
    # W4A4, the default: 4-bit softmax codes, whose P.V takes the integer paths (int16 on AVX2, planes on AVX-512).
    qmodel_w4a4 = dfqvit.compile(model, bits=(4, 4), calib=calib, recon=None, correction=None, progress=False,
                                 backend="fake")
    engine_w4a4 = build_engine(qmodel_w4a4, backend="native")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    fns = {"fp32_timm": lambda: model(x), "quantize_dynamic_int8": lambda: dynamic(x),
           "dfqvit_w4a8_native": lambda: engine_native(x), "dfqvit_w4a4_native": lambda: engine_w4a4(x),
           "dfqvit_w4a8_torch": lambda: engine_torch(x)}
    with torch.no_grad():
        med = interleaved_medians(fns, rounds)
        agree = float((engine_native(x).argmax(-1) == model(x).argmax(-1)).float().mean())
    fp32_bytes = linear_weight_bytes(model)
    packed_bytes = sum(m.weight_nbytes() for m in engine_native.modules() if isinstance(m, PackedLinear))
    result = {"batch": batch, "rounds": rounds, "ms": {p: v * 1e3 for p, v in med.items()},
              "images_per_s": {p: batch / v for p, v in med.items()},
              "speedup_vs_fp32": {p: med["fp32_timm"] / v for p, v in med.items() if p != "fp32_timm"},
              "linear_weight_bytes": {"fp32": fp32_bytes, "dfqvit_w4a8_native": packed_bytes,
                                      "ratio_vs_fp32": packed_bytes / fp32_bytes},
              "top1_agreement_native_vs_fp32_on_gaussian_inputs": agree}
    for p in fns:
        print(f"  {p:24s} {result['ms'][p]:8.1f} ms  {result['images_per_s'][p]:7.1f} img/s"
              + (f"  ({result['speedup_vs_fp32'][p]:.2f}x fp32)" if p != "fp32_timm" else ""))
    print(f"  Linear weight bytes: fp32 {fp32_bytes}, dfqvit W4A8 panels {packed_bytes} "
          f"({packed_bytes / fp32_bytes:.3f}x)")
    return result


def targets(gemm: list[dict], engine: dict) -> dict:
    w4 = [r["speedup_vs_fp32"]["w4a8_f32out"] for r in gemm]
    out = {"gemm_w4a8_f32out_min_speedup": min(w4), "gemm_target": GEMM_TARGET,
           "gemm_shapes_meeting_target": sum(s >= GEMM_TARGET for s in w4), "gemm_shapes": len(w4)}
    if "speedup_vs_fp32" in engine:
        s = engine["speedup_vs_fp32"]
        out.update({"engine_w4a8_speedup": s["dfqvit_w4a8_native"], "engine_target": ENGINE_TARGET,
                    "engine_meets_target": s["dfqvit_w4a8_native"] >= ENGINE_TARGET,
                    "engine_faster_than_quantize_dynamic": s["dfqvit_w4a8_native"] > s["quantize_dynamic_int8"],
                    "weight_memory_4x_less": engine["linear_weight_bytes"]["ratio_vs_fp32"] <= 0.25})
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# Native CPU backend — {env['device']}, {env['threads']} threads, ISA {report['isa']} "
             f"({report['timestamp']})", "",
             f"CPU: {env.get('cpu_model')}; code: commit {env.get('git_commit')}; torch {env['torch']}.", "",
             f"glibc malloc thresholds raised (kernels_cpu.keep_freed_memory_in_heap): {report['malloc']['applied']}",
             "",
             "| model | batch | layer | M | N | K | rounds | fp32 ms | W4A8 f32-out ms (x) | W4A8 int8-out ms (x) "
             "| W3A8 ms (x) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["gemm"]:
        ms, x = r["ms"], r["speedup_vs_fp32"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['layer']} | {r['m']} | {r['n']} | {r['k']} | "
                     f"{r['rounds']} | {ms['fp32_linear']:.2f} | {ms['w4a8_f32out']:.2f} ({x['w4a8_f32out']:.2f}x) | "
                     f"{ms['w4a8_int8out']:.2f} ({x['w4a8_int8out']:.2f}x) | {ms['w3a8_f32out']:.2f} "
                     f"({x['w3a8_f32out']:.2f}x) |")
    e = report["engine"]
    if "ms" in e:
        lines += ["", f"Whole model, CIFAR reference ViT, batch {e['batch']}:", "",
                  "| provider | ms | images/s | x fp32 |", "|---|---|---|---|"]
        for p, ms in e["ms"].items():
            lines.append(f"| {p} | {ms:.1f} | {e['images_per_s'][p]:.1f} | "
                         f"{e['speedup_vs_fp32'].get(p, 1.0):.2f} |")
        wb = e["linear_weight_bytes"]
        lines += ["", f"Linear weight bytes: fp32 {wb['fp32']}, W4A8 panels {wb['dfqvit_w4a8_native']} "
                      f"({wb['ratio_vs_fp32']:.3f}x)."]
    comparison = report.get("isa_comparison", {})
    if comparison.get("rows"):
        isas = comparison["isas"]
        lines += ["", "Instruction sets, same calls interleaved (ms, x = speed-up over avx2):", "",
                  "| case | " + " | ".join(isas) + " | outputs identical |", "|---|" + "---|" * (len(isas) + 1)]
        for r in comparison["rows"]:
            lines.append(f"| {r['case']} | " + " | ".join(f"{r['ms'][i]:.2f} ({r['speedup_vs_avx2'][i]:.2f}x)"
                                                         for i in isas) + f" | {r['bit_identical']} |")
    deit = report.get("deit_engine")
    if deit:
        lines += ["", f"Whole DeiT-S, 224 px, batch {deit['batch']}, random weights ({deit['rounds']} rounds; engine "
                      f"outputs identical across ISAs: {deit['engine_outputs_identical_across_isas']}):", "",
                  "| provider | ms | images/s | x fp32 |", "|---|---|---|---|"]
        for p, ms in deit["ms"].items():
            lines.append(f"| {p} | {ms:.1f} | {deit['images_per_s'][p]:.1f} | {deit['speedup_vs_fp32'].get(p, 1.0):.2f} |")
    a = report["attention"]
    lines += ["", "Attention (B 64, 3 heads, N 65, d 64): " + ", ".join(f"{p} {ms:.2f} ms" for p, ms in a["ms"].items())]
    lines += ["", "Targets: " + json.dumps(report["targets"])]
    return "\n".join(lines) + "\n"


def check_engine_batch(engine_batch) -> None:
    """Before any timing: a batch below 1 crashed after minutes of work (negative) or wrote a report of zeros."""
    if isinstance(engine_batch, bool) or not isinstance(engine_batch, int) or engine_batch < 1:
        raise DFQViTError(f"engine_batch (--engine-batch) must be an integer >= 1, got {engine_batch!r}")


def run(out_dir: str, engine_batch: int = 64, quick: bool = False, steady_malloc: bool = False) -> int:
    check_engine_batch(engine_batch)
    out = output_folder(out_dir)  # before the timing, not after
    if not native.available():
        print("dfqvit._C is not built: the native CPU backend is UNMEASURED in this run. Build it with "
              "`DFQVIT_BUILD_EXT=1 pip install --no-build-isolation --no-deps -e .` and run again.")
        return 0
    env = describe_environment(torch.device("cpu"))
    report = {"benchmark": "kernels_cpu", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": env,
              "isa": native.isa(),
              "malloc": keep_freed_memory_in_heap() if steady_malloc else {"applied": False, "why": "glibc defaults"}}
    print(f"native CPU backend: ISA {report['isa']}, {env['threads']} threads, torch {env['torch']}, "
          f"malloc thresholds raised: {report['malloc']['applied']}")
    print("GEMM (median ms, x = speed-up over fp32 F.linear):")
    report["gemm"] = (gemm_rows(shape_seconds=2.0, min_rounds=5, max_rounds=60) if quick
                      else gemm_rows(shape_seconds=1.0, min_rounds=60, max_rounds=400))
    print("attention:")
    report["attention"] = attention_row(rounds=3 if quick else 20)
    print(f"whole model (CIFAR reference ViT, batch {engine_batch}):")
    report["engine"] = engine_rows(engine_batch, rounds=2 if quick else 15)
    print("instruction sets side by side:")
    report["isa_comparison"] = isa_rows(engine_batch, gemm_rounds=3 if quick else 30, engine_rounds=2 if quick else 10)
    if not quick:
        print("whole DeiT-S (random weights, 224 px, batch 8):")
        report["deit_engine"] = deit_engine_row(batch=8, rounds=7)
    report["targets"] = targets(report["gemm"], report["engine"])
    print("targets:", json.dumps(report["targets"], indent=1))
    stem = unique_stem(out, f"kernels_cpu_{time.strftime('%Y%m%d_%H%M%S')}", (".json", ".md"))
    write_json(out / f"{stem}.json", report)
    (out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {out / stem}.json and .md")
    return 0
