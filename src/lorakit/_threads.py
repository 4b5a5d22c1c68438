"""One CPU thread for a block of tiny matmuls, the previous thread count restored afterwards.

Why: matmuls of a few dozen rows gain nothing from threads, and OpenMP's start-up and spinning cost 5-20x on a
busy 2-core machine (measured). Used by the digits demo and by the tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
