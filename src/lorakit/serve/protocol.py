"""OpenAI-compatible request bodies (validated) and response objects, as plain functions over dicts.

Fields of the OpenAI API that change results and that lorakit does not implement (logprobs, penalties,
logit_bias, echo, best_of, tools, non-text response formats) are refused with a 400 naming the field rather
than silently ignored; unknown fields are ignored, as most OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with a status."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    return_token_ids: bool | None = False  # lorakit / vLLM extension: the generated token ids per choice


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


_UNSUPPORTED = {  # field -> values that mean "not used"
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "echo": (None, False), "logprobs": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "top_logprobs": (None, 0), "tools": (None, []),
}


def parse(model: type[BaseModel], data: dict) -> BaseModel:
    """Validate a body; a 400 APIError naming the first bad field otherwise."""
    try:
        body = model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"invalid field {where!r}: {first['msg']}", param=where) from None
    for name, unused in _UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value not in unused:
            raise APIError(400, f"{name}={value!r} is not supported by lorakit serve", param=name)
    fmt = getattr(body, "response_format", None)
    if fmt not in (None, {}) and fmt.get("type") != "text":
        raise APIError(400, "response_format other than text is not supported by lorakit serve",
                       param="response_format")
    return body


def chat_text(message: ChatMessage) -> str:
    """The text of a chat message (a string, or a list of {"type": "text", "text": ...} parts)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(index: int, text: str, finish_reason: str | None, token_ids: list[int] | None) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict], use: dict | None) -> dict:
    out = {"id": rid, "object": kind, "created": created, "model": model, "system_fingerprint": None,
           "choices": choices}
    if use is not None or kind in ("text_completion", "chat.completion"):
        out["usage"] = use
    return out


__all__ = ["APIError", "ChatBody", "ChatMessage", "CompletionBody", "chat_choice", "chat_text",
           "completion_choice", "envelope", "new_id", "now", "parse", "usage"]
