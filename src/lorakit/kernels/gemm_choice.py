"""Which of equivalent GEMM orders to run for one shape: measured once on the GPU, at first use, then kept.

The fused LoRA ops can add their rank-r term to a base GEMM in two ways: inside it (the rank-r product
first, the base GEMM reads it in its epilogue: ``beta = 1``) or after it (a rank-r GEMM that adds into the
output: one more pass over it). Which is faster depends on the shape, through cuBLAS's choice of kernel.
The per-shape GEMM table of one step on an H200 (2026-12-02, ``bench/train_gpu.py --profile-shapes``)
pointed at two cases: the epilogue form of the Llama-3-8B down projection (4096 x 14336 -> 4096) averaged
612 us a call where the floor's GEMMs of that shape averaged 459 us (a mean over two uses of the shape), and
the shared-input op's backward GEMM over the widened weight (N = in + ranks) 617 us where N = in averaged
459 us for the 8B gate/up.

So each op names its variants (closures computing the same values, the first one the default) and, when
``ENABLED``, this module times them once per shape key with CUDA events (after a synchronize, so nothing
else is queued), keeping the fastest; a variant within 2% of the default does not replace it. CPU tensors,
CUDA graph capture and torch.compile tracing run the default. Variants differ only in rounding (the order
of the sums).

Off by default, for what it measured: one step of the Llama-3.2-1B shape took 131.2 ms of GPU time with it
against 132.0-132.2 ms without on the same day, the 8B shape 403.1 against 401.8-405.1 ms, and wall time
did not move (these steps wait on the host; docs/speed.md). A choice made from timings can differ between runs, so
runs would no longer repeat bit for bit; that is not worth under 1%.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ENABLED = False
"""Measure and pick per shape (False, the default: always the default variant)."""

FORCE: int | None = None
"""Run this variant everywhere instead (tests: every variant against the reference on the CPU)."""

REPEATS = 3

chosen: dict[tuple, int] = {}
"""(op, shape key) -> the variant measured fastest; ``chosen.clear()`` measures again."""


def run(op: str, shape_key: Callable[[], tuple], device: torch.device,
        variants: Sequence[Callable[[], object]]):
    """The result of one of ``variants`` (equivalent computations, the default first) for the shape
    ``shape_key()`` names (a function: while switched off, as by default, no key is built on this hot path)."""
    if FORCE is not None:
        return variants[min(FORCE, len(variants) - 1)]()
    if not ENABLED:
        return variants[0]()
    key = shape_key()
    index = chosen.get((op, key))
    if index is None:
        if not _can_measure(device):
            return variants[0]()
        index = chosen[(op, key)] = _fastest(variants)
    return variants[index]()


def _can_measure(device: torch.device) -> bool:
    return (device.type == "cuda" and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _fastest(variants: Sequence[Callable[[], object]]) -> int:
    times = []
    for fn in variants:
        fn()  # warm-up: cuBLAS's heuristics, the allocator
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(REPEATS):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    best = min(range(len(times)), key=times.__getitem__)
    return best if times[best] < 0.98 * times[0] else 0


def report() -> str:
    """The choices made so far, one line each (bench scripts print it)."""
    return "\n".join(f"{op} {key}: variant {i}" for (op, key), i in sorted(chosen.items(), key=str))
