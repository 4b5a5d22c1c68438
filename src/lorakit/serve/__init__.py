"""Serving many LoRA adapters over one base model: continuous batching, one adapter per batch row.

    decoder.py   the forward pass: Llama-family decoder, slot KV cache, per-row LoRA, CUDA graphs
    bgmv.py      the gathered low-rank matmul (torch reference) + bgmv_triton.py (GPU kernels)
    cache.py     adapters by name: device slots, host LRU, disk; safe names and paths
    engine.py    the scheduler thread: admit, prefill, decode, sample, stream
    sampling.py  temperature / top-p / seed per request;  text.py  incremental detokenization, stop strings
    app.py       the OpenAI-compatible HTTP API (FastAPI);  protocol.py  its request/response shapes
    cli.py       ``lorakit serve``

The HTTP layer needs the ``serve`` extra (FastAPI, uvicorn); the engine needs only torch and transformers.
"""

from .cache import (
                    AdapterCache,
                    AdapterExistsError,
                    AdapterMismatchError,
                    AdapterNameError,
                    AdapterNotFoundError,
)
from .decoder import SUPPORTED_TYPES, Decoder
from .engine import (
                    Delta,
                    Engine,
                    EngineBusyError,
                    EngineClosedError,
                    EngineConfig,
                    EngineError,
                    Failed,
                    Finished,
                    Output,
                    RequestHandle,
                    RequestTooLongError,
)
from .sampling import SamplingParams

__all__ = [
    "SUPPORTED_TYPES", "AdapterCache", "AdapterExistsError", "AdapterMismatchError", "AdapterNameError",
    "AdapterNotFoundError", "Decoder", "Delta", "Engine", "EngineBusyError", "EngineClosedError", "EngineConfig",
    "EngineError", "Failed", "Finished", "Output", "RequestHandle", "RequestTooLongError", "SamplingParams",
]
