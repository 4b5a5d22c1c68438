"""The HTTP front: an OpenAI-compatible API over an Engine (FastAPI + uvicorn).

    GET    /v1/models[/{name}]            the base model and every served adapter (or one of them)
    POST   /v1/completions                prompt -> text (stream: server-sent events)
    POST   /v1/chat/completions           messages -> assistant message (chat template of the tokenizer)
    GET    /v1/adapters                   served adapters and where each one sits (device / host / disk)
    POST   /v1/adapters {"name": ...}     hot-load the folder <adapter dir>/<name> (checked now: 422 if it
                                          does not fit the base model, naming the offending key)
    DELETE /v1/adapters/{name}            unload (running requests on it finish first)
    GET    /health                        liveness (no API key needed)
    GET    /metrics                       Prometheus text format

``model`` in a request names an adapter or the base model. Errors are JSON in OpenAI's shape: 400 bad
input (malformed JSON, a bad field, a prompt or max_tokens over the limits), 401 missing or wrong API key,
404 unknown model, 409 name taken, 413 body too large, 422 adapter that does not fit the base, 503 shutting
down or queue full, 500 a request that failed inside the engine (the server keeps running).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections import Counter
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import LoraError
from . import protocol as P
from .engine import Delta, Engine, Failed, Finished, Output
from .sampling import SamplingParams

log = logging.getLogger("lorakit.serve")


@dataclass
class ServerLimits:
    """Bounds on what one request may ask for.

    Attributes:
        max_body_bytes: request body size (413 above it).
        max_prompt_tokens: tokens in one prompt; None: the engine's context minus one.
        max_tokens: the largest max_tokens accepted; None: the engine's context minus one.
        default_max_tokens: max_tokens of a chat request that gives none (clipped to the context left);
            completions default to 16, as OpenAI's.
        max_choices: prompts x n in one request.
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    default_max_tokens: int = 256
    max_choices: int = 16


def _status_of(err: Exception) -> int:
    return getattr(err, "status", 400 if isinstance(err, LoraError) else 500)


def api_error(err: Exception) -> P.APIError:
    """An engine/cache exception as the API error the client sees."""
    if isinstance(err, P.APIError):
        return err
    status = _status_of(err)
    code = {404: "model_not_found", 409: "conflict", 422: "adapter_mismatch"}.get(status)
    param = getattr(err, "key", None) or ("model" if status == 404 else None)
    message = str(err) if status != 500 or isinstance(err, LoraError) else "internal error"
    return P.APIError(status, " ".join(message.split()), param=param, code=code)


def _json_error(err: P.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _StatusCounter:
    """ASGI middleware counting responses by status code (for /metrics)."""

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counts[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine: Engine, api_key: str | None = None, limits: ServerLimits | None = None,
               drain_timeout: float | None = 60.0) -> FastAPI:
    """The FastAPI app over ``engine``. The engine starts with the app and drains when it stops."""
    limits = limits or ServerLimits()
    context = engine.max_model_len
    max_prompt = limits.max_prompt_tokens or context - 1
    max_tokens_cap = limits.max_tokens or context - 1
    statuses: Counter = Counter()
    started = P.now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.shutdown, True, drain_timeout)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_StatusCounter, counts=statuses)

    @app.exception_handler(P.APIError)
    async def _api_error(request, err: P.APIError):
        return _json_error(err)

    @app.exception_handler(LoraError)
    async def _lora_error(request, err: LoraError):
        return _json_error(api_error(err))

    @app.exception_handler(Exception)
    async def _any_error(request, err: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _json_error(P.APIError(500, "internal error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise P.APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise P.APIError(413, f"request body larger than {limits.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise P.APIError(413, f"request body larger than {limits.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise P.APIError(400, f"malformed JSON body: {err}") from None
        if not isinstance(data, dict):
            raise P.APIError(400, "the request body must be a JSON object")
        return data

    def model_names() -> list[str]:
        return [engine.base_name] + engine.adapters.names()

    def resolve_model(name: str) -> str | None:
        if name == engine.base_name:
            return None
        if name not in engine.adapters:
            raise P.APIError(404, f"the model {name!r} does not exist; see GET /v1/models", param="model",
                             code="model_not_found")
        return name

    # ---------------------------------------------------------------------------------- models, adapters
    @app.get("/health")
    async def health():
        if engine.closing:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    def model_card(name: str) -> dict:
        if name == engine.base_name:
            return {"id": name, "object": "model", "created": started, "owned_by": "lorakit", "root": name,
                    "parent": None}
        info = engine.adapters.describe(name)  # AdapterNotFoundError -> 404
        return {"id": name, "object": "model", "created": info["created"], "owned_by": "lorakit",
                "root": engine.base_name, "parent": engine.base_name}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        data = [model_card(engine.base_name)]
        for name in engine.adapters.names():
            with contextlib.suppress(LoraError):  # deleted between the listing and here
                data.append(model_card(name))
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        check_key(request)
        return model_card(name)

    @app.get("/v1/adapters")
    async def adapters(request: Request):
        check_key(request)
        data = []
        for name in engine.adapters.names():
            with contextlib.suppress(LoraError):
                data.append({"object": "adapter", **_public(engine.adapters.describe(name))})
        return {"object": "list", "data": data, **engine.adapters.tiers()}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request):
        check_key(request)
        data = await read_json(request)
        name = data.get("name", data.get("lora_name"))
        if not isinstance(name, str):
            raise P.APIError(400, "the body needs 'name': the adapter folder's name inside the adapter directory",
                             param="name")
        if name == engine.base_name:
            raise P.APIError(409, f"{name!r} is the base model's name", param="name", code="conflict")
        try:
            info = await run_in_threadpool(engine.adapters.register, name, True)
        except LoraError as err:
            raise api_error(err) from None
        return JSONResponse({"object": "adapter", **_public(info)}, status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        check_key(request)
        try:
            engine.adapters.unregister(name)
        except LoraError as err:
            raise api_error(err) from None
        return {"id": name, "object": "adapter", "deleted": True}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request)
        return PlainTextResponse(_prometheus(engine, statuses), media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------------------------- generation
    def sampling(body, prompt_len: int, index: int, max_tokens: int | None, default: int) -> SamplingParams:
        if max_tokens is None:  # as OpenAI: 16 for completions, "as many as fit" (bounded here) for chat
            max_tokens = max(1, min(default, max_tokens_cap, context - prompt_len))
        if max_tokens > max_tokens_cap:
            raise P.APIError(400, f"max_tokens={max_tokens} is above this server's limit of {max_tokens_cap}",
                             param="max_tokens")
        if max_tokens < 1:
            raise P.APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        seed = body.seed + index if body.seed is not None else None
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None
                                  else body.temperature, top_p=1.0 if body.top_p is None else body.top_p,
                                  seed=seed, stop=body.stop or ())
        except LoraError as err:
            raise P.APIError(400, str(err)) from None

    def check_prompt(ids: list[int]) -> None:
        if not ids:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most {max_prompt}",
                             param="prompt")

    def submit_all(adapter, prompts, body, max_tokens, default, loop, stream) -> list:
        n = body.n if body.n is not None else 1
        if n < 1 or n * len(prompts) > limits.max_choices:
            raise P.APIError(400, f"n x prompts must be in 1..{limits.max_choices}, got {n * len(prompts)}",
                             param="n")
        handles = []
        try:
            for i, ids in enumerate(prompts):
                for j in range(n):
                    params = sampling(body, len(ids), i * n + j, max_tokens, default)
                    handles.append(engine.submit(ids, params, adapter, loop=loop, stream=stream))
        except (LoraError, P.APIError) as err:
            for h in handles:
                h.cancel()
            raise api_error(err) from None
        return handles

    async def run(kind: str, body, prompts: list[list[int]], max_tokens: int | None, request: Request):
        adapter = resolve_model(body.model)
        loop = asyncio.get_running_loop()
        default = 16 if kind == "text_completion" else limits.default_max_tokens
        handles = submit_all(adapter, prompts, body, max_tokens, default, loop, bool(body.stream))
        rid = P.new_id("cmpl" if kind == "text_completion" else "chatcmpl")
        created = P.now()
        prompt_tokens = sum(len(p) for p in prompts)
        choice = P.completion_choice if kind == "text_completion" else P.chat_choice
        want_ids = bool(body.return_token_ids)
        if not body.stream:
            try:
                outs: list[Output] = await asyncio.gather(*(h.aresult() for h in handles))
            except Exception as err:  # noqa: BLE001 - any failure: stop the siblings, answer its status
                for h in handles:
                    h.cancel()
                raise api_error(err) from None
            choices = [choice(i, o.text, o.finish_reason, o.token_ids if want_ids else None)
                       for i, o in enumerate(outs)]
            use = P.usage(prompt_tokens, sum(o.completion_tokens for o in outs))
            return P.envelope(kind, rid, created, body.model, choices, use)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        gen = _stream(kind, rid, created, body.model, handles, prompt_tokens, include_usage, want_ids)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = P.parse(P.CompletionBody, await read_json(request))
        raw = body.prompt
        if isinstance(raw, str) or raw and all(isinstance(t, int) for t in raw):
            raw = [raw]
        if not raw:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        prompts = []
        for p in raw:
            ids = list(p) if isinstance(p, list) else engine.tokenizer(p)["input_ids"]
            check_prompt(ids)
            prompts.append(ids)
        return await run("text_completion", body, prompts, body.max_tokens, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        body = P.parse(P.ChatBody, await read_json(request))
        if not getattr(engine.tokenizer, "chat_template", None):
            raise P.APIError(400, f"the model {engine.base_name!r} has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": P.chat_text(m)} for m in body.messages]
        try:
            text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template that rejects these messages
            raise P.APIError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        check_prompt(ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await run("chat.completion", body, [ids], max_tokens, request)

    return app


def _public(info: dict) -> dict:
    return {("id" if k == "name" else k): v for k, v in info.items()}


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _merge(handles):
    """(choice index, event) from several handles as they come."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        async for event in h:
            await queue.put((i, event))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        finished = 0
        while finished < len(handles):
            i, event = await queue.get()
            finished += isinstance(event, (Finished, Failed))
            yield i, event
    finally:
        for t in tasks:
            t.cancel()


async def _stream(kind, rid, created, model, handles, prompt_tokens, include_usage, want_ids):
    chat = kind == "chat.completion"
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    completion_tokens = 0

    def chunk(i, text, finish, role=False, ids=None):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        if ids is not None and want_ids:
            choice["token_ids"] = ids
        out = P.envelope(chunk_kind, rid, created, model, [choice], None)
        if include_usage:
            out["usage"] = None
        return _sse(out)

    try:
        if chat:
            for i in range(len(handles)):
                yield chunk(i, "", None, role=True)
        async for i, event in _merge(handles):
            if isinstance(event, Delta):
                yield chunk(i, event.text, None, ids=event.token_ids)
            elif isinstance(event, Finished):
                completion_tokens += event.output.completion_tokens
                yield chunk(i, "", event.output.finish_reason)
            elif isinstance(event, Failed):
                yield _sse(api_error(event.error).body())
        if include_usage:
            out = P.envelope(chunk_kind, rid, created, model, [], P.usage(prompt_tokens, completion_tokens))
            yield _sse(out)
        yield _sse("[DONE]")
    finally:  # the client went away (or we are done): stop generating for it
        for h in handles:
            h.cancel()


def _prometheus(engine: Engine, statuses: Counter) -> str:
    s = engine.stats()
    lines = []

    def metric(name, kind, help_text, value, labels=""):
        if not any(line.startswith(f"# TYPE {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    metric("lorakit_requests_total", "counter", "Requests accepted by the engine.", s["requests_total"])
    metric("lorakit_requests_finished_total", "counter", "Requests that finished.", s["requests_finished"])
    metric("lorakit_requests_failed_total", "counter", "Requests that failed.", s["requests_failed"])
    metric("lorakit_requests_aborted_total", "counter", "Requests cancelled (client gone).", s["requests_aborted"])
    metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens_total"])
    metric("lorakit_generation_tokens_total", "counter", "Tokens generated.", s["generation_tokens_total"])
    metric("lorakit_decode_steps_total", "counter", "Decode steps run.", s["decode_steps_total"])
    metric("lorakit_decode_rows_total", "counter", "Rows decoded, summed over steps.", s["decode_rows_total"])
    metric("lorakit_step_errors_total", "counter", "Engine steps that raised.", s["step_errors_total"])
    metric("lorakit_running_requests", "gauge", "Requests being decoded.", s["running"])
    metric("lorakit_waiting_requests", "gauge", "Requests queued.", s["waiting"])
    for tier, count in s["adapters"].items():
        metric("lorakit_adapters", "gauge", "Adapters by tier.", count, f'{{tier="{tier}"}}')
    for key in ("disk_loads", "device_loads", "load_failures", "device_evictions", "host_evictions"):
        metric(f"lorakit_adapter_{key}_total", "counter", f"Adapter {key.replace('_', ' ')}.", s[f"adapter_{key}"])
    lat = sorted(engine.latencies)
    for q in (0.5, 0.9, 0.99):
        value = lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0
        metric("lorakit_request_seconds", "summary", "Request latency (last 4096 requests).", f"{value:.6f}",
               f'{{quantile="{q}"}}')
    for code, count in sorted(statuses.items()):
        metric("lorakit_http_responses_total", "counter", "HTTP responses by status.", count,
               f'{{status="{code}"}}')
    return "\n".join(lines) + "\n"


__all__ = ["ServerLimits", "api_error", "create_app"]
