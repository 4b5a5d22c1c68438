"""Keep large CPU tensors' memory in the process between training steps (glibc malloc tuning).

Why: glibc serves allocations above its mmap threshold (at most 32 MiB by its own adaptive rule) with fresh
mmap'ed pages and returns them on free, so every step's logits, activations and gradients of that size are
page-faulted in and zeroed by the kernel again. On the 2-core development machine that was 16% of a LoRA
training step and 26% of PEFT's (GPT-2-124M shape, 4 x 256: lorakit 3.93 -> 3.28 s, the frozen floor
3.75 -> 3.15 s; bench/train_cpu.py --malloc default|tuned). Raising the mmap and trim thresholds makes freed memory reusable
instead; the cost is that the process keeps its peak memory until it exits, which is what a training run does
anyway. The command line applies it to its own process (``lorakit train``, ``compare``, ``demo``);
``LORAKIT_MALLOC=default`` keeps glibc's behaviour. Importing lorakit never changes the allocator.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 2**31 - 1  # bytes: every tensor a step allocates stays on the heap and is reused


def tune_for_training() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when applied (Linux with glibc, and
    ``LORAKIT_MALLOC`` is not ``default``)."""
    if os.environ.get("LORAKIT_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and others have no mallopt of this meaning  # noqa: B018
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
