"""Load a module of Triton kernels when it can work; every caller keeps a pure-torch path for when it can't."""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def load_kernels(module: str) -> ModuleType | None:
    """``module`` imported, or None when LORAKIT_NO_TRITON=1 or it fails to import (Triton missing or
    broken): the reference path then runs, giving the same results more slowly."""
    if os.environ.get("LORAKIT_NO_TRITON") == "1":
        return None
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001
        return None
