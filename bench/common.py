"""What several bench scripts share: building a random-weight Llama from a config, timing a call.

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
