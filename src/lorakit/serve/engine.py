"""The engine: one base model, many adapters, continuous batching on one scheduler thread.

    submit() from any thread ──► inbox ──► scheduler thread:
        1. take new requests and cancellations
        2. admit waiting requests whose adapter is ready, while cache slots and the prefill budget last
           (a request whose adapter is still loading from disk stays queued; the others go ahead)
        3. prefill the admitted prompts (one batch), sample their first tokens
        4. one decode step for every running row, each with its own adapter; sample; emit; retire
    events ──► each request's handle (a thread-safe queue, or an asyncio queue bound to an event loop)

New requests join between two decode steps; nothing waits for a batch to finish. The scheduler thread is
the only one that touches the model, the KV cache and the adapter stacks. An exception while serving a
request fails that request (or that step's requests), never the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, LoraError
from ..train.config import QUANT_TYPES
from .cache import AdapterCache, AdapterNotFoundError
from .decoder import Decoder, check_model
from .sampling import SamplingParams, sample_next
from .text import TextStream

QUANTIZE_CHOICES = ("none", *QUANT_TYPES)
"""How Engine.from_pretrained stores the base projections: 16 bits, 4-bit NF4/FP4 (+ double quant), int8."""

log = logging.getLogger("lorakit.serve")


class EngineError(LoraError, RuntimeError):
    """A request failed inside the engine (HTTP 500); the engine itself keeps serving."""

    status = 500


class EngineClosedError(LoraError, RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""

    status = 503


class EngineBusyError(LoraError, RuntimeError):
    """The queue of waiting requests is full (HTTP 503)."""

    status = 503


class RequestTooLongError(ConfigError):
    """Prompt plus max_tokens do not fit the context (HTTP 400)."""

    status = 400


@dataclass
class EngineConfig:
    """Engine sizes. Each field is a trade between memory and throughput.

    Attributes:
        max_batch: requests decoded together (KV cache slots).
        max_model_len: longest prompt + output (KV cache length); None: min(model's max positions, 2048).
        max_prefill_tokens: padded prompt tokens prefilled in one step (bounds the pause of running streams).
        max_adapters_gpu: adapters resident in the accelerator's stacks at once.
        max_adapters_cpu: adapters kept in host memory (LRU, soft limit).
        max_lora_rank: the largest rank served (the stacks are sized for it).
        max_queue: waiting requests accepted before new ones get EngineBusyError.
        cuda_graphs: replay CUDA graphs for decode steps on CUDA.
    """

    max_batch: int = 32
    max_model_len: int | None = None
    max_prefill_tokens: int = 4096
    max_adapters_gpu: int = 8
    max_adapters_cpu: int = 32
    max_lora_rank: int = 16
    max_queue: int = 4096
    cuda_graphs: bool = True

    def __post_init__(self):
        for name in ("max_batch", "max_prefill_tokens", "max_adapters_gpu", "max_adapters_cpu", "max_lora_rank",
                     "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")


@dataclass
class Output:
    """A finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", "abort"
    prompt_tokens: int
    adapter: str | None
    seconds_to_first_token: float
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """New output text (and the tokens that produced it) of a running request."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    output: Output


@dataclass
class Failed:
    error: Exception


class RequestHandle:
    """What ``Engine.submit`` returns: the request's events (Delta..., then Finished or Failed).

    Iterate it (blocking), ``async for`` it (when submitted with an event loop), or call ``result()``.
    """

    def __init__(self, request_id: str, engine: Engine, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.done = False

    def _push(self, event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """Stop generating for this request (its slot frees at the next step)."""
        if not self.done:
            self._engine._inbox.put(("cancel", self.id))
            self._engine._wake.set()

    def __iter__(self):
        if self._loop is not None:
            raise RuntimeError("this handle was submitted with an event loop: use 'async for'")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                self.done = True
                return

    async def __aiter__(self):
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                self.done = True
                return

    def result(self) -> Output:
        """Block until the request ends; its Output, or raise its error."""
        for event in self:
            if isinstance(event, Finished):
                return event.output
            if isinstance(event, Failed):
                raise event.error
        raise EngineError("request ended without a result")  # pragma: no cover

    async def aresult(self) -> Output:
        async for event in self:
            if isinstance(event, Finished):
                return event.output
            if isinstance(event, Failed):
                raise event.error
        raise EngineError("request ended without a result")  # pragma: no cover


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    handle: RequestHandle
    stream: bool
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    slot: int = -1  # KV cache row
    adapter_slot: int = 0
    output: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # tokens whose text has not been handed out yet
    text: TextStream | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False


class Engine:
    """Serve a base model and any number of adapters with continuous batching.

    Args:
        model: a Hugging Face Llama-family causal LM (the engine takes ownership; see Decoder).
        tokenizer: its tokenizer (None: token ids in, token ids out; no text, no stop strings).
        adapters_dir: folder whose sub-folders are adapters (PEFT or lorakit format), served by folder name.
        config: sizes (EngineConfig).
        base_name: the model name that selects the base model without an adapter.
    """

    def __init__(self, model, tokenizer, adapters_dir: str | Path | None = None,
                 config: EngineConfig | None = None, base_name: str = "base"):
        check_model(model)
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.base_name = base_name
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = config.max_model_len or min(limit, 2048)
        if self.max_model_len > limit:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                              f"{limit}")
        self.decoder = Decoder(model, config.max_batch, self.max_model_len, config.max_adapters_gpu,
                               config.max_lora_rank, cuda_graphs=config.cuda_graphs)
        self._wake = threading.Event()
        self.adapters = AdapterCache(self.decoder, adapters_dir, config.max_adapters_cpu, on_ready=self._wake.set)
        if adapters_dir is not None:
            self.adapters.scan()
        self.eos_ids = _eos_ids(model, tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # KV slot -> request
        self._free = list(range(config.max_batch))
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stop_now = False
        self._queued = 0  # submitted, not yet admitted
        self._queued_lock = threading.Lock()
        self.counters = {"requests_total": 0, "requests_finished": 0, "requests_failed": 0, "requests_aborted": 0,
                         "prompt_tokens_total": 0, "generation_tokens_total": 0, "decode_steps_total": 0,
                         "prefill_steps_total": 0, "decode_rows_total": 0, "step_errors_total": 0}
        self.latencies: deque[float] = deque(maxlen=4096)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, adapters_dir: str | Path | None = None,
                        config: EngineConfig | None = None, dtype: str = "auto", device: str = "auto",
                        base_name: str | None = None, quantize: str = "none") -> Engine:
        """Load a Hugging Face model folder (safetensors) and its tokenizer, then build the engine.

        ``quantize``: "nf4" or "fp4" (4-bit blocks of 64 with double quantization, as QLoRA trains on) or
        "int8" (row-wise) streams the checkpoint into packed projections (``lorakit.load_quantized``): the
        base never exists in 16 bits; embeddings, norms and the head stay in ``dtype``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"model folder {str(model_dir)!r} does not exist")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "fp32": torch.float32,
                  "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ConfigError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        if quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            if quantize == "none":
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes[dtype], use_safetensors=True)
            else:
                from ..quant_loading import load_quantized_named

                model = load_quantized_named(model_dir, quantize, dtypes[dtype], device)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"cannot load a causal LM from {str(model_dir)!r}: {str(err).splitlines()[0]}") \
                from None
        model = model.to(device).eval()
        return cls(model, tokenizer, adapters_dir, config, base_name or model_dir.resolve().name)

    # ------------------------------------------------------------------------------------ life cycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
            self._thread.start()
        return self

    @property
    def closing(self) -> bool:
        return self._closing

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish every queued and running one first, else fail them.
        Returns when the scheduler thread has ended (or ``timeout`` seconds passed)."""
        self._closing = True
        if not drain:
            self._stop_now = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.adapters.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, adapter: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None, stream: bool = True) -> RequestHandle:
        """Queue a request; returns its handle at once. ``adapter``: a served adapter name, or None /
        ``base_name`` for the base model. ``stream``: produce text pieces as tokens arrive (else the text is
        decoded once at the end, which is cheaper).

        Raises (in the caller's thread, nothing queued): EngineClosedError, EngineBusyError,
        AdapterNotFoundError, RequestTooLongError / ConfigError for a bad prompt or parameters.
        """
        if self._closing:
            raise EngineClosedError("the server is shutting down; no new requests")
        params = params or SamplingParams()
        if adapter == self.base_name:
            adapter = None
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer; this engine has none")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ConfigError("the prompt is empty")
        vocab = self.decoder.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ConfigError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestTooLongError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: together "
                f"{len(prompt) + params.max_tokens}, above this server's context of {self.max_model_len} tokens")
        with self._queued_lock:
            if self._queued >= self.config.max_queue:
                raise EngineBusyError(f"{self._queued} requests are already waiting; try again later")
            if adapter is not None:
                self.adapters.want(adapter)  # raises AdapterNotFoundError; starts the disk load if needed
            self._queued += 1
        rid = f"{next(self._ids)}"
        handle = RequestHandle(rid, self, loop)
        req = _Request(rid, prompt, params, adapter, handle, stream or bool(params.stop))
        self.counters["requests_total"] += 1
        self._inbox.put(("submit", req))
        self._wake.set()
        return handle

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 adapters: list[str | None] | None = None) -> list[Output]:
        """Submit several prompts at once (one adapter each) and wait for all: an offline batch."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        self.start()
        handles = [self.submit(p, params, a, stream=False) for p, a in zip(prompts, adapters)]
        return [h.result() for h in handles]

    def stats(self) -> dict:
        return {**self.counters, "running": len(self._running), "waiting": self._queued,
                "adapters": self.adapters.tiers(), **{f"adapter_{k}": v for k, v in self.adapters.stats.items()}}

    # ------------------------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._take_inbox()
            if self._stop_now:
                for req in list(self._waiting) + list(self._running.values()):
                    self._fail(req, EngineClosedError("the server shut down before this request finished"))
                return
            if self._closing and not self._waiting and not self._running:
                return
            admitted = self._admit()
            if admitted:
                self._guarded(admitted, self._prefill)
            if self._running:
                self._guarded(list(self._running.values()), self._decode)
            elif not admitted:
                self._wake.wait(0.05)

    def _guarded(self, requests: list[_Request], step) -> None:
        try:
            step(requests)
        except Exception as err:  # noqa: BLE001 - one bad step fails its requests, never the server
            self.counters["step_errors_total"] += 1
            log.error("serve step failed:\n%s", traceback.format_exc())
            for req in requests:
                if req.slot in self._running and self._running[req.slot] is req:
                    self._fail(req, EngineError(f"the request failed inside the engine: {err}"))

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._waiting.append(item)
            else:
                self._cancel(item)

    def _cancel(self, rid: str) -> None:
        for req in self._waiting:
            if req.id == rid:
                self._waiting.remove(req)
                self._dequeued(req)
                self._finish(req, "abort")
                return
        for req in self._running.values():
            if req.id == rid:
                self._finish(req, "abort")
                return

    def _dequeued(self, req: _Request) -> None:
        with self._queued_lock:
            self._queued -= 1
        if req.adapter is not None:
            self.adapters.unwant(req.adapter)

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        longest = 0
        failed_adapters: dict[str, Exception] = {}
        for req in list(self._waiting):
            if not self._free:
                break
            if req.adapter in failed_adapters:
                self._waiting.remove(req)
                self._dequeued(req)
                self._fail(req, failed_adapters[req.adapter])
                continue
            longest_next = max(longest, len(req.prompt))
            if admitted and longest_next * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            slot = 0
            if req.adapter is not None:
                try:
                    got = self.adapters.acquire(req.adapter)
                except LoraError as err:  # load failed or adapter deleted: fail every request for it
                    failed_adapters[req.adapter] = err
                    self._waiting.remove(req)
                    self._dequeued(req)
                    self._fail(req, err)
                    continue
                if got is None:
                    continue  # loading, or every slot busy: the next requests go ahead
                slot = got
            self._waiting.remove(req)
            self._dequeued(req)
            req.adapter_slot = slot
            req.slot = self._free.pop(0)
            self._running[req.slot] = req
            admitted.append(req)
            longest = longest_next
        return admitted

    def _prefill(self, requests: list[_Request]) -> None:
        logits = self.decoder.prefill([r.prompt for r in requests], [r.slot for r in requests],
                                      [r.adapter_slot for r in requests])
        self.counters["prefill_steps_total"] += 1
        for req in requests:
            req.generator = req.params.generator(logits.device)
            self.counters["prompt_tokens_total"] += len(req.prompt)
            if req.stream and self.tokenizer is not None:
                req.text = TextStream(self.tokenizer, req.prompt, req.params.stop)
        tokens = sample_next(logits, [r.params for r in requests], [r.generator for r in requests])
        now = time.perf_counter()
        for req, token in zip(requests, tokens):
            req.first_token = now
            self._accept(req, token)

    def _decode(self, requests: list[_Request]) -> None:
        rows = max(self._running) + 1
        tokens = torch.zeros(rows, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        idx = torch.zeros(rows, dtype=torch.long)
        active = torch.zeros(rows, dtype=torch.bool)
        for slot, req in self._running.items():
            tokens[slot] = req.output[-1]
            positions[slot] = len(req.prompt) + len(req.output) - 1
            idx[slot] = req.adapter_slot
            active[slot] = True
        logits = self.decoder.decode(tokens, positions, idx, active)
        self.counters["decode_steps_total"] += 1
        self.counters["decode_rows_total"] += len(self._running)
        slots = sorted(self._running)
        reqs = [self._running[s] for s in slots]
        picked = sample_next(logits[slots], [r.params for r in reqs], [r.generator for r in reqs])
        for req, token in zip(reqs, picked):
            self._accept(req, token)

    def _accept(self, req: _Request, token: int) -> None:
        """Take one generated token: stop at end of sequence, emit text, stop at a stop string or the limit."""
        if req.cancelled:
            return
        if token in self.eos_ids and not req.params.ignore_eos:
            self._finish(req, "stop")
            return
        req.output.append(token)
        self.counters["generation_tokens_total"] += 1
        if req.text is not None:
            piece = req.text.add(token)
            req.unsent.append(token)
            if piece:
                req.handle._push(Delta(piece, req.unsent))
                req.unsent = []
            if req.text.stopped:
                self._finish(req, "stop")
                return
        if len(req.output) >= req.params.max_tokens:
            self._finish(req, "length")

    def _release(self, req: _Request) -> None:
        if req.slot >= 0 and self._running.get(req.slot) is req:
            del self._running[req.slot]
            self._free.append(req.slot)
            self._free.sort()
            self.adapters.release(req.adapter_slot)
        req.cancelled = True

    def _finish(self, req: _Request, reason: str) -> None:
        self._release(req)
        now = time.perf_counter()
        if req.text is not None:
            piece = req.text.finish()
            if piece or req.unsent:
                req.handle._push(Delta(piece, req.unsent))
                req.unsent = []
            text = req.text.text
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(req.output, skip_special_tokens=True)
        else:
            text = ""  # no tokenizer (token-id clients, benchmarks): token_ids only
        first = (req.first_token or now) - req.submitted
        out = Output(text, list(req.output), reason, len(req.prompt), req.adapter, first, now - req.submitted)
        self.counters["requests_aborted" if reason == "abort" else "requests_finished"] += 1
        self.latencies.append(out.seconds)
        req.handle._push(Finished(out))

    def _fail(self, req: _Request, error: Exception) -> None:
        self._release(req)
        self.counters["requests_failed"] += 1
        req.handle._push(Failed(error))


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


__all__ = [
    "AdapterNotFoundError",
    "Delta",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "EngineConfig",
    "EngineError",
    "Failed",
    "Finished",
    "Output",
    "RequestHandle",
    "RequestTooLongError",
    "SamplingParams",
]
