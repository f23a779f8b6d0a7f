"""CUDA graphs for the engine: one graph per (batch bucket, dtype, device), captured after warm-up.

A call pads its batch up to the next bucket, copies it into the graph's static input, replays, and
returns a copy of the first rows of the static output. Rows are independent (every activation grid is
static, Swin windows never cross images), so padding rows change nothing. Batches above the largest
bucket run in chunks of it. Only CUDA inputs are accepted; a new (bucket, dtype, device) gets a new
capture, never another graph's buffers.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

from dfqvit.errors import InputShapeError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """Smallest bucket >= batch (batch must not exceed the largest bucket)."""
    if batch < 1:
        raise InputShapeError(f"batch size {batch}; it must be >= 1")
    for b in sorted(buckets):
        if b >= batch:
            return b
    raise InputShapeError(f"batch size {batch} exceeds the largest CUDA-graph bucket {max(buckets)}")


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with zero rows appended up to ``size`` rows (x itself when already that size)."""
    if x.shape[0] == size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


def split_batches(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> Tuple[Tuple[int, int, int], ...]:
    """(start, stop, bucket) chunks covering ``batch`` rows: full largest buckets, then one padded bucket."""
    largest = max(buckets)
    chunks = []
    for start in range(0, batch, largest):
        stop = min(start + largest, batch)
        chunks.append((start, stop, bucket_for(stop - start, buckets)))
    return tuple(chunks)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: torch.Tensor, static_out: torch.Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class CUDAGraphRunner:
    """Wrap ``fn`` (images -> logits, no host syncs) with per-bucket CUDA graph capture and replay."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], buckets: Sequence[int] = BATCH_BUCKETS,
                 warmup: int = 3):
        self.fn, self.buckets, self.warmup = fn, tuple(sorted(buckets)), warmup
        self.graphs: Dict[Tuple[int, Tuple[int, ...], torch.dtype, torch.device], _Captured] = {}
        self.pool = None  # one memory pool shared by every captured graph

    @torch.no_grad()  # inputs that require grad chained every replay's copy into one autograd graph (a leak)
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type != "cuda":
            raise InputShapeError(f"CUDA graphs replay on a CUDA device; images are on {images.device}. Move them "
                                  "to the engine's device, or build the engine with cuda_graphs=False")
        if images.shape[0] == 0:  # no bucket to replay (torch.cat of no chunks failed): the eager path's answer
            return self.fn(images)
        outs = [self._replay(images[start:stop], bucket)
                for start, stop, bucket in split_batches(images.shape[0], self.buckets)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _replay(self, x: torch.Tensor, bucket: int) -> torch.Tensor:
        # The key holds everything the captured kernels were specialised on: a new image size is a new graph.
        key = (bucket, tuple(x.shape[1:]), x.dtype, x.device)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(pad_batch(x, bucket))
        captured.static_in.copy_(pad_batch(x, bucket))
        captured.graph.replay()
        return captured.static_out[: x.shape[0]].clone()

    def _capture(self, example: torch.Tensor) -> _Captured:
        static_in = example.detach().clone()
        # Warm up on a side stream (allocations, Triton compilation and autotuning happen here, not in capture).
        stream = torch.cuda.Stream(device=static_in.device)
        stream.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(static_in.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.fn(static_in)
        self.pool = graph.pool()
        return _Captured(graph, static_in, static_out)
