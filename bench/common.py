"""What several bench scripts share: building a random-weight Llama from a config, timing a call (wall clock,
CUDA events, or the host's time per call).

The scripts run as ``python bench/<name>.py``, so this file sits on their import path as ``common``.
"""

from __future__ import annotations

import statistics
import time

import torch


def build_llama(shape: dict, device: str, dtype: torch.dtype = torch.bfloat16, **config):
    """LlamaForCausalLM with seed-0 random weights made directly in ``dtype`` on ``device`` (no fp32 copy),
    SDPA attention, 4096 positions; ``config`` overrides or adds LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**shape, "max_position_embeddings": 4096, "attn_implementation": "sdpa", **config})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)


def timed(fn, repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_event_us(fn, iters: int = 50, warmup: int = 10) -> float:
    """Median microseconds of ``fn()`` on the current CUDA stream (CUDA events around each call) after
    ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return statistics.median(times)


def host_us_per_call(fn, n: int = 1000, repeats: int = 5, warmup: int = 100) -> float:
    """Host microseconds per call of ``fn()``: the best of ``repeats`` runs of ``n`` back-to-back calls, wall time
    up to the last call's return (on CUDA a synchronize before each run, none inside: the launches are timed,
    not the kernels; with tiny tensors the GPU keeps up)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    sync()
    return best * 1e6
