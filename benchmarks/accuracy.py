"""Accuracy study: every calibration source at every bit width, in the shape of SPDFQ Tables 2 and 3.

    python benchmarks/accuracy.py --quick            # reduced grid: 19 min on 2 CPU cores before the V2 row (48 min with it, shared), 48 s on an H200
    python benchmarks/accuracy.py                    # full grid (paper settings; uses the GPU when there is one)
    python benchmarks/accuracy.py --model deit_small_patch16_224 --checkpoint deit_s.pth --data imagenet_val/
    python benchmarks/accuracy.py --quick --backend auto   # score the integer engine instead of the fake-quant model

A trained model (a ``../shared/models`` JSON, or a timm name plus ``--checkpoint``) is quantized with each
calibration source -- Real (32 training images), Gaussian noise, PSAQ-ViT, PSAQ-ViT V2, SPDFQ, DFQ-ViT -- at each
setting (W4A4, W5A5, W6A6, W4A8, W8A8, W4A8 and W8A8 with the uniform softmax quantizer of the paper's
supplementary Table 3, W3A16 weight-only), and the SPDFQ terms APA / MSR / SL are ablated at W4A4 (Table 3).
Every source goes through the same ``dfqvit.compile`` pipeline (calibration, reconstruction, correction);
only the images differ. W4A4 is run with several seeds and reported as mean ± std (sample std).
Synthetic sets are made once per (method, seed, synthesis settings) and reused across bit widths, except
PSAQ-ViT V2's and DFQ-ViT's, whose student / adversarial term uses the quantized model and so depends on the bit
width.

The paper's tables score the fake-quant model (``--backend fake``, the default); ``--backend auto`` (or
``native`` / ``torch`` / ``triton``) scores the integer engine ``dfqvit.compile`` returns by default, built from the
same calibration.

Writes ``accuracy_<grid>_<device>_<timestamp>.json``, ``.md`` and ``.png`` to ``--out`` (``-2`` etc. after the
timestamp when another run has that name) and prints the markdown table with the per-cell and total time.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

import dfqvit
from dfqvit.config import CorrectionConfig, QuantConfig, ReconConfig, SynthConfig, bits_from_text, parse_bits
from dfqvit.environment import describe_environment
from dfqvit.cli import BACKEND_CHOICES
from dfqvit.errors import CalibrationError, CheckpointNotFoundError, DFQViTError, MissingGPUError
from dfqvit.paths import output_folder, unique_stem, write_json
from dfqvit.synth.base import reads_quantized_model

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"
DEFAULT_MODEL = SHARED / "models" / "vit_mini_c10.json"
DEFAULT_DATA = SHARED / "data" / "cifar10_test_even.npz"
DEFAULT_REAL = SHARED / "data" / "cifar10_train_1k.npz"
RESULTS = HERE / "results"

# Rows of Table 2, in the paper's order; "fp32" is the full-precision model (no calibration source).
SOURCES = ("real", "gaussian", "psaq", "psaq_v2", "spdfq", "dfqvit")
SOURCE_LABELS = {"fp32": "Full precision", "real": "Real", "gaussian": "Gaussian noise", "psaq": "PSAQ-ViT",
                 "psaq_v2": "PSAQ-ViT V2", "spdfq": "SPDFQ", "dfqvit": "DFQ-ViT"}
DATA_FREE = ("gaussian", "psaq", "psaq_v2", "spdfq", "dfqvit")
# Methods whose images depend on the quantized model (so on the bit width): PSAQ-ViT V2's student, DFQ-ViT's adversary.
BITS_DEPENDENT_SYNTH = tuple(source for source in DATA_FREE if reads_quantized_model(source))
# Table 3 ablation: (APA, MSR, SL); the baseline uses the one-hot loss.
ABLATIONS = {"baseline": (False, False, False), "APA": (True, False, False), "MSR": (False, True, False),
             "SL": (False, False, True), "APA+MSR": (True, True, False), "APA+SL": (True, False, True),
             "MSR+SL": (False, True, True), "APA+MSR+SL": (True, True, True)}
FULL_SPDFQ = "APA+MSR+SL"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One column: weight / activation bits and the softmax quantizer."""

    w_bits: int
    a_bits: int
    softmax: str = "log2"

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}" + ("" if self.softmax == "log2" else f"-{self.softmax}")

    def quant_config(self, calib_images: int) -> QuantConfig:
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, softmax_quantizer=self.softmax,
                           calib_images=calib_images)


# The bits as dfqvit's --bits writes them (config.bits_from_text), then an optional softmax quantizer: the old letter
# stripping read "A8" as W8A8, "W4A" as W4A4, ",8" as W8A8 and "W4AA8" as W4A8, and accepted a trailing "-".
_SOFTMAX_SUFFIX = re.compile(r"^(?P<bits>.*?)(?:[:-](?P<softmax>[a-z0-9]+))?$")
SETTING_FORMS = "4 (= W4A4), 4,8 (or 4/8), W4A8 (or w4a8), each optionally with :uniform / -uniform (or :log2)"


def parse_setting(text: str) -> Setting:
    """"4" / "4,8" / "4/8" / "W4A8" / "w4a8", optionally with ":uniform" / "-uniform" / ":log2" (the softmax
    quantizer; log2 by default) -> Setting. Any other text raises DFQViTError, bad bits UnsupportedBitsError."""
    parts = _SOFTMAX_SUFFIX.match(str(text).strip().lower())
    bits = bits_from_text(parts["bits"])
    if bits is None:
        raise DFQViTError(f"setting {text!r} is not a bit width; give {SETTING_FORMS}")
    softmax = parts["softmax"] or "log2"
    if softmax not in ("log2", "uniform"):
        raise DFQViTError(f"setting {text!r}: softmax quantizer {softmax!r} is not one of 'log2', 'uniform'")
    w_bits, a_bits = parse_bits(bits)
    if a_bits == 16 and softmax != "log2":
        raise DFQViTError(f"setting {text!r}: weight-only bits do not quantize the softmax; drop the '{softmax}'")
    return Setting(w_bits, a_bits, softmax)


FULL_SETTINGS = tuple(parse_setting(s) for s in
                      ("W4A4", "W5A5", "W6A6", "W4A8", "W8A8", "W4A8-uniform", "W8A8-uniform", "W3A16"))
QUICK_SETTINGS = tuple(parse_setting(s) for s in ("W4A4", "W4A8", "W8A8", "W3A16"))
MULTI_SEED_SETTING = "W4A4"


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to run. ``seeds`` apply to the W4A4 column and the ablation; other columns use seeds[0].
    ``only`` restricts a source to some settings (quick grid: DFQ-ViT, whose synthesis depends on the bit
    width, only where the targets need it). ``recon_iters`` 0 = no reconstruction."""

    name: str
    sources: Tuple[str, ...]
    settings: Tuple[Setting, ...]
    seeds: Tuple[int, ...]
    ablations: Tuple[str, ...]
    synth_iters: int
    recon_iters: int
    correction: Optional[str] = "diag"
    eval_limit: Optional[int] = None
    calib_images: int = 32
    only: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    ablation_seeds: Optional[Tuple[int, ...]] = None  # None = seeds

    def settings_for(self, source: str) -> Tuple[Setting, ...]:
        allowed = dict(self.only).get(source)
        return tuple(s for s in self.settings if allowed is None or s.name in allowed)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["settings"] = [s.name for s in self.settings]
        data["only"] = {k: list(v) for k, v in self.only}
        return data


FULL_GRID = Grid("full", SOURCES, FULL_SETTINGS, seeds=(0, 1, 2), ablations=tuple(ABLATIONS), synth_iters=1000,
                 recon_iters=100, correction="diag", eval_limit=None)
QUICK_GRID = Grid("quick", SOURCES, QUICK_SETTINGS, seeds=(0, 1, 2), ablations=("baseline", "APA", FULL_SPDFQ),
                  synth_iters=50, recon_iters=0, correction="diag", eval_limit=1000,
                  only=(("psaq_v2", ("W4A4", "W8A8")), ("dfqvit", ("W4A4", "W8A8", "W3A16"))), ablation_seeds=(0,))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One quantization run. ``variant`` names the SPDFQ terms (Table 3) for the spdfq source."""

    source: str
    setting: Setting
    seed: int
    variant: Optional[str] = None

    @property
    def key(self) -> tuple:
        return (self.source, self.setting.name, self.seed, self.variant)

    @property
    def label(self) -> str:
        variant = f" [{self.variant}]" if self.variant and self.variant != FULL_SPDFQ else ""
        return f"{SOURCE_LABELS[self.source]}{variant} {self.setting.name} seed {self.seed}"


def main_cells(grid: Grid) -> List[Cell]:
    """The runs of the main table (Table 2): every source at each of its settings."""
    cells: List[Cell] = []
    for source in grid.sources:
        variant = FULL_SPDFQ if source == "spdfq" else None
        for setting in grid.settings_for(source):
            seeds = grid.seeds if setting.name == MULTI_SEED_SETTING else grid.seeds[:1]
            cells += [Cell(source, setting, seed, variant) for seed in seeds]
    return cells


def has_spdfq_w4a4(grid: Grid) -> bool:
    """Whether the main table has the SPDFQ W4A4 cell the ablation (Table 3) varies."""
    return "spdfq" in grid.sources and any(s.name == MULTI_SEED_SETTING for s in grid.settings_for("spdfq"))


def grid_cells(grid: Grid) -> List[Cell]:
    """Every run of the grid, main table first, without duplicates (the ablation's APA+MSR+SL cells are
    the main SPDFQ W4A4 cells). build_grid drops the ablation from a grid without SPDFQ W4A4 unless
    --ablations asks for it."""
    cells = main_cells(grid)
    w4a4 = Setting(4, 4)
    for name in grid.ablations:
        cells += [Cell("spdfq", w4a4, seed, name) for seed in (grid.ablation_seeds or grid.seeds)]
    unique: Dict[tuple, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    return list(unique.values())


def synth_key(cell: Cell, grid: Grid) -> tuple:
    """Cache key of a cell's calibration images: the bit width only matters for DFQ-ViT."""
    bits = cell.setting.name if cell.source in BITS_DEPENDENT_SYNTH else None
    return (cell.source, cell.seed, cell.variant, grid.synth_iters, grid.calib_images, bits)


def synth_config(cell: Cell, grid: Grid) -> SynthConfig:
    apa, msr, sl = ABLATIONS[cell.variant or FULL_SPDFQ]
    return SynthConfig(iterations=grid.synth_iters, apa=apa, msr=msr, soft_labels=sl)


# ----------------------------------------------------------------------------------------------------- data


def check_path(path: Optional[str], what: str) -> None:
    if path is not None and not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what} {path!r} does not exist")


def load_eval_set(path: str, spec, limit: Optional[int]) -> torch.utils.data.TensorDataset:
    """The evaluation images decoded once into tensors (evenly spread subset with ``limit``)."""
    from dfqvit.data import load_images, stack_images

    dataset = load_images(path, (spec.height, spec.width), spec.mean, spec.std, limit=limit)
    if len(dataset) == 0:
        raise DFQViTError(f"evaluation data {path!r} holds no images")
    return torch.utils.data.TensorDataset(stack_images(dataset, len(dataset)), torch.tensor(dataset.labels))


def real_images(dataset, count: int, seed: int) -> torch.Tensor:
    """``count`` real calibration images drawn at random (per seed) from the real-image pack."""
    if len(dataset) < count:
        raise CalibrationError(f"the real-image data holds {len(dataset)} images; the grid needs {count}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[int(i)][0] for i in order])


# --------------------------------------------------------------------------------------------------- runner


@dataclasses.dataclass
class CellResult:
    source: str
    setting: str
    w_bits: int
    a_bits: int
    softmax: str
    seed: int
    variant: Optional[str]
    top1: float
    agreement: Optional[float]
    images: int
    synth_seconds: float
    synth_reused: bool
    compile_seconds: float
    eval_seconds: float
    seconds: float
    runs_on: str = "fake-quant"  # or the engine's backend, e.g. "native (isa=amx_int8)"


class GridRunner:
    """Runs the cells of a grid on one model; calibration images are cached per ``synth_key``."""

    def __init__(self, model, normalization, grid: Grid, eval_set, real_set=None, device="cpu",
                 batch_size: int = 250, progress: bool = True, backend: str = "fake"):
        self.model, self.normalization, self.grid = model.to(device).eval(), normalization, grid
        self.eval_set, self.real_set, self.device = eval_set, real_set, torch.device(device)
        self.batch_size, self.progress, self.backend = batch_size, progress, backend
        self._images: Dict[tuple, object] = {}
        self._reference: Optional[torch.Tensor] = None

    def calibration_set(self, cell: Cell) -> Tuple[object, float, bool]:
        """(images or SyntheticSet, seconds spent making them, reused from the cache)."""
        key = synth_key(cell, self.grid)
        if key in self._images:
            return self._images[key], 0.0, True
        start = time.perf_counter()
        if cell.source == "real":
            if self.real_set is None:
                raise CalibrationError("the 'real' source needs real images (--real)")
            images = real_images(self.real_set, self.grid.calib_images, cell.seed)
        else:
            images = self._synthesize(cell)
        self._images[key] = images
        return images, time.perf_counter() - start, False

    def _synthesize(self, cell: Cell):
        from dfqvit.synth import synthesize

        config = cell.setting.quant_config(self.grid.calib_images)
        qmodel = dfqvit.adapt(self.model, config, normalization=self.normalization).to(self.device)
        with torch.random.fork_rng(devices=[]):  # as dfqvit.compile seeds its own synthesis
            torch.manual_seed(cell.seed)
            return synthesize(cell.source, qmodel, num_images=self.grid.calib_images, seed=cell.seed,
                              config=synth_config(cell, self.grid), progress=False)

    def quantize(self, cell: Cell, images):
        grid = self.grid
        return dfqvit.compile(
            self.model, None, images, config=cell.setting.quant_config(grid.calib_images),
            normalization=self.normalization, seed=cell.seed, device=self.device, progress=False,
            recon=ReconConfig(iterations=grid.recon_iters) if grid.recon_iters else None,
            correction=CorrectionConfig(form=grid.correction) if grid.correction else None,
            backend=self.backend)

    @torch.no_grad()
    def predict(self, model) -> torch.Tensor:
        images, bs = self.eval_set.tensors[0], self.batch_size
        return torch.cat([model(images[i:i + bs].to(self.device)).argmax(dim=-1).cpu()
                          for i in range(0, len(images), bs)])

    def evaluate(self, model):
        """Top-1 and top-1 agreement with the fp32 model -- what ``dfqvit.evaluate.evaluate(..., reference=
        model)`` reports, but the fp32 predictions are computed once for the whole grid, not once per run."""
        from dfqvit.evaluate import EvalResult

        labels = self.eval_set.tensors[1]
        if self._reference is None:
            self._reference = self.predict(self.model)
        pred = self.predict(model)
        total = max(len(labels), 1)
        return EvalResult(top1=100.0 * int((pred == labels).sum()) / total, images=len(labels),
                          agreement=100.0 * int((pred == self._reference).sum()) / total)

    def run_cell(self, cell: Cell) -> CellResult:
        start = time.perf_counter()
        images, synth_seconds, reused = self.calibration_set(cell)
        t0 = time.perf_counter()
        qmodel = self.quantize(cell, images)
        t1 = time.perf_counter()
        result = self.evaluate(qmodel)
        t2 = time.perf_counter()
        s = cell.setting
        return CellResult(cell.source, s.name, s.w_bits, s.a_bits, s.softmax, cell.seed, cell.variant,
                          result.top1, result.agreement, result.images, round(synth_seconds, 2), reused,
                          round(t1 - t0, 2), round(t2 - t1, 2), round(t2 - start, 2), qmodel.backend_label)

    def run(self, cells: Sequence[Cell], log=print, on_result=None) -> List[CellResult]:
        """Run ``cells`` in order; ``on_result(results so far)`` is called after each one."""
        from tqdm.auto import tqdm

        results = []
        bar = tqdm(cells, desc=f"accuracy grid ({self.grid.name})", unit="run", disable=not self.progress)
        for cell in bar:
            bar.set_postfix_str(cell.label)
            r = self.run_cell(cell)
            results.append(r)
            synth = "reused images" if r.synth_reused else f"images {r.synth_seconds:.1f} s"
            message = (f"{cell.label:40s} top-1 {r.top1:6.2f}%  agreement {r.agreement:6.2f}%  "
                       f"({synth}, compile {r.compile_seconds:.1f} s, eval {r.eval_seconds:.1f} s, "
                       f"total {r.seconds:.1f} s)")
            if self.progress:
                bar.write(message)
            else:
                log(message)
            if on_result is not None:
                on_result(results)
        return results


# ---------------------------------------------------------------------------------------------- aggregation


def summarize(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (None for a single value) of a list of top-1 values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize() needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def aggregate(results: Sequence[CellResult], fp32_top1: Optional[float] = None,
              ablations: Sequence[str] = (), ablation_seeds: Optional[Sequence[int]] = None,
              main_keys: Optional[Collection[tuple]] = None) -> dict:
    """{"main": {source: {setting: summary}}, "ablation": {variant: summary}}, each summary over seeds.

    The ablation holds the ``ablations`` variants of SPDFQ at W4A4 over ``ablation_seeds`` (None = every
    seed run); its APA+MSR+SL row is made of the main SPDFQ W4A4 runs of those seeds. ``main_keys``: the
    ``Cell.key`` of each main-table run (``main_cells``); None = every run that is not an ablation variant
    (an ablation's APA+MSR+SL run without SPDFQ W4A4 in the main grid added an SPDFQ row to the main table)."""
    main: Dict[str, Dict[str, List[float]]] = {}
    ablation: Dict[str, List[float]] = {name: [] for name in ablations}
    for r in results:
        in_main = main_keys is None or (r.source, r.setting, r.seed, r.variant) in main_keys
        if r.variant in (None, FULL_SPDFQ) and in_main:
            main.setdefault(r.source, {}).setdefault(r.setting, []).append(r.top1)
        if (r.source == "spdfq" and r.setting == MULTI_SEED_SETTING and r.variant in ablation
                and (ablation_seeds is None or r.seed in ablation_seeds)):
            ablation[r.variant].append(r.top1)
    table = {src: {s: summarize(v) for s, v in per.items()} for src, per in main.items()}
    if fp32_top1 is not None:
        settings = {s for per in main.values() for s in per}
        table = {"fp32": {s: summarize([fp32_top1]) for s in settings}, **table}
    return {"main": table, "ablation": {k: summarize(v) for k, v in ablation.items() if v}}


def _mean(summary: dict, source: str, setting: str) -> Optional[float]:
    cell = summary["main"].get(source, {}).get(setting)
    return None if cell is None else cell["mean"]


def check_targets(summary: dict) -> List[dict]:
    """The issue's targets on the aggregated table; ``met`` is None when a needed cell was not run."""
    def target(name, need, test, detail):
        values = [_mean(summary, src, s) for src, s in need]
        if any(v is None for v in values):
            missing = [f"{src} {s}" for (src, s), v in zip(need, values) if v is None]
            return {"target": name, "met": None, "detail": "not run: " + ", ".join(missing)}
        return {"target": name, "met": bool(test(*values)), "detail": detail(*values)}

    w4 = MULTI_SEED_SETTING
    out = [
        target("W4A4: SPDFQ > PSAQ-ViT", [("spdfq", w4), ("psaq", w4)], lambda s, p: s > p,
               lambda s, p: f"SPDFQ {s:.2f} vs PSAQ-ViT {p:.2f} ({s - p:+.2f})"),
        target("W4A4: SPDFQ > Gaussian noise", [("spdfq", w4), ("gaussian", w4)], lambda s, g: s > g,
               lambda s, g: f"SPDFQ {s:.2f} vs Gaussian {g:.2f} ({s - g:+.2f})"),
        target("W4A4: SPDFQ within 3 points of Real", [("spdfq", w4), ("real", w4)], lambda s, r: r - s <= 3.0,
               lambda s, r: f"Real {r:.2f} - SPDFQ {s:.2f} = {r - s:.2f} (paper, DeiT-S: 6.17)"),
    ]
    for src in DATA_FREE:
        out.append(target(f"W8A8: {SOURCE_LABELS[src]} within 1 point of full precision",
                          [(src, "W8A8"), ("fp32", "W8A8")], lambda x, f: f - x <= 1.0,
                          lambda x, f: f"full precision {f:.2f} - {x:.2f} = {f - x:.2f}"))
    return out


def paper_ordering(summary: dict, settings: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Per setting (in ``settings`` order): does Real >= SPDFQ > PSAQ-ViT > Gaussian hold (the paper's
    Table 2 ordering), and PSAQ-ViT > PSAQ-ViT V2 > Gaussian where V2 was run? Settings where one of the four
    was not run are left out."""
    out = {}
    if settings is None:
        settings = sorted({s for per in summary["main"].values() for s in per})
    for s in settings:
        v = [_mean(summary, src, s) for src in ("real", "spdfq", "psaq", "gaussian")]
        if any(x is None for x in v):
            continue
        real, sp, ps, ga = v
        relations = [("Real >= SPDFQ", real >= sp), ("SPDFQ > PSAQ-ViT", sp > ps), ("PSAQ-ViT > Gaussian", ps > ga)]
        v2 = _mean(summary, "psaq_v2", s)
        if v2 is not None:
            relations += [("PSAQ-ViT > PSAQ-ViT V2", ps > v2), ("PSAQ-ViT V2 > Gaussian", v2 > ga)]
        broken = [name for name, ok in relations if not ok]
        out[s] = {"holds": not broken, "broken": broken}
    return out


# ------------------------------------------------------------------------------------------------- reports


def _fmt(summary: Optional[dict]) -> str:
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def main_table(summary: dict, settings: Sequence[str]) -> List[str]:
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for source in ("fp32",) + SOURCES:
        per = summary["main"].get(source)
        if per is None:
            continue
        lines.append(f"| {SOURCE_LABELS[source]} | " + " | ".join(_fmt(per.get(s)) for s in settings) + " |")
    return lines


def ablation_table(summary: dict) -> List[str]:
    lines = ["| APA | MSR | SL | top-1 (%) |", "|:-:|:-:|:-:|---:|"]
    for name, flags in ABLATIONS.items():
        if name in summary["ablation"]:
            marks = " | ".join("✓" if f else "" for f in flags)
            lines.append(f"| {marks} | {_fmt(summary['ablation'][name])} |")
    return lines


def markdown(report: dict) -> str:
    grid, env, summary = report["grid"], report["env"], report["summary"]
    recon = f"{grid['recon_iters']} reconstruction iterations" if grid["recon_iters"] else "no reconstruction"
    seeds = ", ".join(str(s) for s in grid["seeds"])
    lines = [
        f"## Accuracy study: {report['model']['name']}, grid `{grid['name']}`", "",
        f"Device {env['device']} ({env['threads']} threads); torch {env['torch']}, timm {env['timm']}, "
        f"triton {env['triton']}, dfqvit {env['dfqvit']}; {report['timestamp']}.",
        f"{grid['calib_images']} calibration images per source, {grid['synth_iters']} synthesis iterations, "
        f"{recon}, correction {grid['correction'] or 'none'}; top-1 of the {_scored(report)} on "
        f"{report['data']['eval_images']} images "
        f"of `{os.path.basename(report['data']['eval'])}`. {MULTI_SEED_SETTING} (and the ablation): mean ± sample "
        f"std over seeds {seeds}; other columns: seed {grid['seeds'][0]}. Total time "
        f"{report['total_seconds'] / 60:.1f} min.", "",
        "Top-1 (%) per calibration source (SPDFQ Table 2 shape):", ""]
    lines += main_table(summary, grid["settings"])
    if summary["ablation"]:
        lines += ["", f"SPDFQ ablation at {MULTI_SEED_SETTING} (Table 3 shape; the baseline uses the one-hot loss):",
                  ""]
        lines += ablation_table(summary)
    lines += ["", "Targets:", ""]
    for t in report["targets"]:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: {verdict} ({t['detail']})")
    if report["ordering"]:
        lines += ["", "Paper ordering Real ≥ SPDFQ > PSAQ-ViT > Gaussian (and PSAQ-ViT > PSAQ-ViT V2 > Gaussian):", ""]
        for s, o in report["ordering"].items():
            lines.append(f"- {s}: " + ("holds" if o["holds"] else "broken: " + ", ".join(o["broken"])))
    return "\n".join(lines) + "\n"


def _scored(report: dict) -> str:
    """What the table scores: the fake-quant model, or the engine backends its cells ran on."""
    engines = sorted({c.get("runs_on", "fake-quant") for c in report["cells"]} - {"fake-quant"})
    return "fake-quant model" if not engines else "integer engine (" + ", ".join(engines) + ")"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, settings = report["summary"], report["grid"]["settings"]
    sources = [s for s in SOURCES if s in summary["main"]]
    has_ablation = bool(summary["ablation"])
    fig, axes = plt.subplots(1, 2 if has_ablation else 1, figsize=(15 if has_ablation else 10, 4.8),
                             gridspec_kw={"width_ratios": [3, 1]} if has_ablation else None, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(sources), 1)
    values = []
    for i, source in enumerate(sources):
        per = summary["main"][source]
        xs = [j + (i - (len(sources) - 1) / 2) * width for j, s in enumerate(settings) if s in per]
        ms = [per[s]["mean"] for s in settings if s in per]
        errs = [per[s]["std"] if per[s]["std"] is not None else math.nan for s in settings if s in per]
        values += ms
        ax.bar(xs, ms, width, yerr=errs, capsize=2, label=SOURCE_LABELS[source])
    fp = summary["main"].get("fp32")
    if fp:
        f = next(iter(fp.values()))["mean"]
        values.append(f)
        ax.axhline(f, color="black", linestyle="--", linewidth=1, label=f"Full precision ({f:.2f})")
    _zoom(ax, values)
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report['model']['name']}: top-1 per calibration source ({report['grid']['name']} grid, "
                 f"{report['env']['device']})")
    ax.legend(fontsize=8, ncol=len(sources) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if has_ablation:
        ax = axes[0][1]
        names = [n for n in ABLATIONS if n in summary["ablation"]]
        ms = [summary["ablation"][n]["mean"] for n in names]
        errs = [summary["ablation"][n]["std"] for n in names]
        ax.bar(range(len(names)), ms, yerr=[math.nan if e is None else e for e in errs], capsize=2,
               color="tab:red")
        _zoom(ax, ms)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"SPDFQ ablation, {MULTI_SEED_SETTING}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _zoom(ax, values: Sequence[float]) -> None:
    """Bars that differ by a point or two are unreadable from 0; start the axis just below the lowest."""
    if values:
        lo, hi = min(values), max(values)
        ax.set_ylim(max(0.0, math.floor(lo - 0.25 * max(hi - lo, 2.0))), math.ceil(hi + 0.5))


# -------------------------------------------------------------------------------------------------- driver


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).lower().replace(" ", "_").replace("/", "_")


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DFQViTError(f"--device {text!r} is not a device; give auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MissingGPUError(f"--device {text} was requested but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DFQViTError(f"--device {text!r}: only cpu and cuda are supported")
    return device


def build_grid(args) -> Grid:
    """The quick or full grid with the command-line overrides applied (then named ``<grid>_custom``)."""
    grid = QUICK_GRID if args.quick else FULL_GRID
    changes = {}
    if args.sources:
        unknown = [s for s in args.sources if s not in SOURCES]
        if unknown:
            raise DFQViTError(f"--sources {unknown}: unknown; choose from {', '.join(SOURCES)}")
        changes["sources"] = tuple(dict.fromkeys(args.sources))
    if args.bits:
        changes["settings"] = tuple(dict.fromkeys(parse_setting(b) for b in args.bits))
    if args.seeds is not None:
        if not args.seeds or len(set(args.seeds)) != len(args.seeds):
            raise DFQViTError(f"--seeds {args.seeds}: give one or more distinct integers, e.g. --seeds 0 1 2")
        changes["seeds"] = tuple(args.seeds)
        changes["ablation_seeds"] = tuple(args.seeds[:len(grid.ablation_seeds or args.seeds)])
    if args.ablations is not None:
        unknown = [a for a in args.ablations if a not in ABLATIONS]
        if unknown:
            raise DFQViTError(f"--ablations {unknown}: unknown; choose from {', '.join(ABLATIONS)} (or none)")
        changes["ablations"] = tuple(args.ablations)
    elif not has_spdfq_w4a4(dataclasses.replace(grid, **changes)):
        # the grid's own ablation varies SPDFQ at W4A4: not run when --sources / --bits leave that cell out
        changes["ablations"] = ()
    for flag, field, low in (("synth_iters", "synth_iters", 1), ("recon_iters", "recon_iters", 0),
                             ("limit", "eval_limit", 1), ("calib_images", "calib_images", 1)):
        value = getattr(args, flag)
        if value is not None:
            if value < low:
                raise DFQViTError(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
            changes[field] = value
    if args.batch_size < 1:  # was a raw range() / DataLoader error
        raise DFQViTError(f"--batch-size must be >= 1, got {args.batch_size}")
    if changes:
        grid = dataclasses.replace(grid, name=f"{grid.name}_custom", **changes)
    if args.sources and args.bits:  # cells asked for by name that the grid leaves out: ran without a word (or 0 cells)
        left_out = {s: [b.name for b in grid.settings if b not in grid.settings_for(s)] for s in grid.sources}
        left_out = {s: names for s, names in left_out.items() if names}
        if left_out:
            raise DFQViTError("; ".join(f"the {grid.name} grid runs {SOURCE_LABELS[s]} only at "
                                        f"{', '.join(dict(grid.only)[s])}, not at {', '.join(names)}"
                                        for s, names in left_out.items()) +
                              ": drop those settings from --bits or the source from --sources")
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="reference-model JSON or a timm model name")
    p.add_argument("--checkpoint", help="state dict (.safetensors / .pth) for a timm model name")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="evaluation images: .npz pack or image folder")
    p.add_argument("--real", default=str(DEFAULT_REAL), help="real calibration images (.npz or image folder)")
    p.add_argument("--quick", action="store_true", help="reduced grid for a CPU (< 30 min on 2 cores)")
    p.add_argument("--limit", type=int, help="evaluate on this many images (evenly spread); grid default otherwise")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the W4A4 column (default 0 1 2)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON, markdown and PNG")
    p.add_argument("--sources", nargs="+", help=f"subset of {', '.join(SOURCES)}")
    p.add_argument("--bits", nargs="+", help="settings to run instead of the grid's, e.g. 4 4,8 8,8:uniform 3,16")
    p.add_argument("--ablations", nargs="*", help=f"SPDFQ ablation rows ({', '.join(ABLATIONS)}); none = skip")
    p.add_argument("--synth-iters", type=int, help="synthesis iterations (full: 1000, quick: 50)")
    p.add_argument("--recon-iters", type=int, help="reconstruction iterations, 0 = off (full: 100, quick: 0)")
    p.add_argument("--calib-images", type=int, help="calibration images per source (paper: 32)")
    p.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    p.add_argument("--backend", default="fake", choices=BACKEND_CHOICES,
                   help="what is scored: the fake-quant model (fake, the paper's tables) or the integer engine "
                        "(auto, native, torch, triton)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_inputs(args, grid: Grid):
    """Check the paths, then load the model, its input spec and normalization, and the images."""
    if not args.model.endswith(".json") and args.checkpoint is None:
        print(f"note: {args.model} has no --checkpoint, so it has random weights; its accuracy means nothing")
    check_path(args.checkpoint, "checkpoint")
    check_path(args.data, "evaluation data")
    if "real" in grid.sources:
        check_path(args.real, "real-image data")
    from dfqvit.data import load_images
    from dfqvit.models.loading import load_model

    model, norm = load_model(args.model, args.checkpoint)
    spec = dfqvit.adapt(model, QuantConfig(), normalization=norm).input_spec
    eval_set = load_eval_set(args.data, spec, grid.eval_limit)
    real_set = (load_images(args.real, (spec.height, spec.width), spec.mean, spec.std)
                if "real" in grid.sources else None)
    return model, spec, eval_set, real_set


def report_header(args, grid: Grid, device: torch.device, spec, eval_set, real_set, fp32) -> dict:
    """What was run, where and with which versions (written with partial and final results alike)."""
    return {
        "benchmark": "accuracy", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": describe_environment(device),
        "grid": grid.to_dict(),
        "model": {"name": Path(args.model).stem if args.model.endswith(".json") else args.model,
                  "spec": args.model, "checkpoint": args.checkpoint,
                  "normalization": [list(spec.mean), list(spec.std)],
                  "input": [spec.channels, spec.height, spec.width]},
        "data": {"eval": args.data, "eval_images": len(eval_set), "real": args.real if real_set else None},
        "backend": args.backend,
        "fp32": {"top1": fp32.top1, "images": fp32.images},
    }


def run(args) -> dict:
    started = time.perf_counter()
    grid = build_grid(args)
    out = output_folder(args.out)  # before the evaluation: a file as --out failed only after the fp32 run
    device = resolve_device(args.device)
    model, spec, eval_set, real_set = load_inputs(args, grid)
    dfqvit.preflight_backend(model, args.backend, device=device)  # a backend this machine lacks: before the grid
    runner = GridRunner(model, (spec.mean, spec.std), grid, eval_set, real_set, device, args.batch_size,
                        not args.no_progress, args.backend)
    cells = grid_cells(grid)
    print(f"accuracy grid {grid.name}: {len(cells)} runs of {Path(args.model).stem} on {device} "
          f"({len(eval_set)} evaluation images)")
    t0 = time.perf_counter()
    fp32 = runner.evaluate(runner.model)
    print(f"full precision: top-1 {fp32.top1:.2f}% ({time.perf_counter() - t0:.1f} s)")
    header = report_header(args, grid, device, spec, eval_set, real_set, fp32)
    # unique: a run started in the same second wrote over this one's files and deleted its partial
    stem = unique_stem(out, f"accuracy_{grid.name}_{device_tag(device)}_{time.strftime('%Y%m%d_%H%M%S')}",
                       (".partial.json", ".json", ".md", ".png"))
    partial = out / f"{stem}.partial.json"  # what is done so far, should a long run be stopped

    def save_partial(done):
        write_json(partial, {**header, "cells_planned": len(cells), "cells": [dataclasses.asdict(r) for r in done]})

    save_partial([])  # the reserved file is never left empty
    results = runner.run(cells, on_result=save_partial)
    summary = aggregate(results, fp32.top1, grid.ablations, grid.ablation_seeds or grid.seeds,
                        main_keys={c.key for c in main_cells(grid)})
    report = {**header, "cells": [dataclasses.asdict(r) for r in results], "summary": summary,
              "targets": check_targets(summary), "ordering": paper_ordering(summary, grid.to_dict()["settings"]),
              "seconds_per_source": _seconds_per_source(results),
              "total_seconds": round(time.perf_counter() - started, 1)}
    write_reports(report, out, stem)
    partial.unlink(missing_ok=True)
    return report


def _seconds_per_source(results: Sequence[CellResult]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for r in results:
        key = r.source if r.variant in (None, FULL_SPDFQ) else f"spdfq [{r.variant}]"
        out[key] = round(out.get(key, 0.0) + r.seconds, 1)
    return out


def write_reports(report: dict, out: Path, stem: str) -> Dict[str, Path]:
    """``<stem>.json``, ``.md`` and ``.png`` in ``out``; prints the markdown and the time per source."""
    paths = {ext: out / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    text = markdown(report)
    write_json(paths["json"], report)
    paths["md"].write_text(text)
    plot(report, paths["png"])
    print("\n" + text)
    print("time per source (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds_per_source"].items()))
    print(f"total {report['total_seconds']:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    report["paths"] = {k: str(v) for k, v in paths.items()}
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DFQViTError as exc:
        print(f"benchmarks/accuracy.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
