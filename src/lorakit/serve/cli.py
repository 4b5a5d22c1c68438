"""``lorakit serve``: flags -> Engine + app -> uvicorn. ``add_serve_parser`` registers the sub-command."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..errors import ConfigError
from ..train.config import QUANT_TYPES

DESCRIPTION = (
    "One base model in memory; every sub-folder of --adapters is an adapter, chosen per request by the "
    "'model' field. Requests for different adapters are decoded in one batch (continuous batching). Hot-load "
    "with POST /v1/adapters, unload with DELETE /v1/adapters/NAME. SIGINT/SIGTERM drain in-flight requests."
)


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to an argparse sub-parser collection (``lorakit serve``)."""
    p = sub.add_parser("serve", help="serve a base model and many adapters over an OpenAI-compatible HTTP API",
                       description=DESCRIPTION)
    add_serve_arguments(p)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face causal-LM folder (Llama/Mistral/Qwen2/Qwen3)")
    p.add_argument("--adapters", default=None, help="folder of adapter folders (PEFT or lorakit format)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LORAKIT_API_KEY if set)")
    p.add_argument("--served-model-name", default=None, help="name of the base model (default: folder name)")
    p.add_argument("--max-adapters-gpu", type=int, default=8, help="adapters resident on the accelerator")
    p.add_argument("--max-adapters-cpu", type=int, default=32, help="adapters kept in host memory (LRU)")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank served")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (KV cache length)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--quantize", default="none", choices=("none", *QUANT_TYPES),
                   help="store the base projections packed: 4-bit NF4/FP4 with double quantization (serve QLoRA "
                        "adapters over the weights they were trained on) or row-wise int8; streamed from the "
                        "checkpoint, the base never exists in 16 bits")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to finish in-flight requests on shutdown (SIGINT/SIGTERM)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServerLimits, create_app
    except ImportError as err:
        raise ConfigError(f"lorakit serve needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({err})") \
            from None
    from .engine import Engine, EngineConfig

    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"lorakit serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    config = EngineConfig(max_batch=args.max_batch, max_model_len=args.max_model_len,
                          max_adapters_gpu=args.max_adapters_gpu, max_adapters_cpu=args.max_adapters_cpu,
                          max_lora_rank=args.max_lora_rank, cuda_graphs=not args.no_cuda_graphs)
    engine = Engine.from_pretrained(args.model, args.adapters, config, dtype=args.dtype, device=args.device,
                                    base_name=args.served_model_name, quantize=args.quantize)
    limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens)
    app = create_app(engine, api_key=api_key, limits=limits, drain_timeout=args.drain_timeout)
    d = engine.decoder
    packed = "" if args.quantize == "none" else f", {args.quantize} base"
    print(f"lorakit serve: {engine.base_name} on {d.device} ({d.dtype}{packed}), adapters {engine.adapters.names()}, "
          f"KV cache {d.kv_cache_bytes() / 2**20:.0f} MiB, {args.max_adapters_gpu} adapter slots x "
          f"{d.adapter_slot_bytes() / 2**20:.1f} MiB; http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.serve.cli ...``: the same as ``lorakit serve ...``."""
    from ..errors import LoraError

    parser = argparse.ArgumentParser(prog="lorakit serve", description=DESCRIPTION)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return cmd_serve(args)
    except (LoraError, FileNotFoundError, PermissionError) as err:
        print(f"lorakit serve: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_serve_arguments", "add_serve_parser", "cmd_serve", "main"]
