"""Request models of the OpenAI-compatible API (pydantic) and OpenAI's error shape.

Unknown fields are ignored (clients send e.g. `user`, `logit_bias`, `presence_penalty`), except the
few OpenAI fields that change what a reply means (UNSUPPORTED). Values are range-checked here so that
every bad request becomes a 400 with the offending `param`, before anything is queued. Responses are
plain dicts built in app.py: they are output, not validated.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_N = 8          # choices per request
MAX_STOP = 4       # stop strings per request (OpenAI's limit)
MAX_BATCH = 256    # requests per /v1/batch/completions call
# seed: a signed 64-bit integer (OpenAI's range). Choice i, each later tool-call segment and each
# speculative chunk derive seed + small offsets, which stay below 2**64, torch's seed limit.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1
# OpenAI fields this server does not do and that change what a reply means: asked for, they are a 400,
# not ignored, because a client would read a missing log-probability or an un-echoed prompt as data.
# Their "off" values (null, false, 0, best_of 1, response_format {"type": "text"}) are accepted.
UNSUPPORTED = {
    "logprobs": "this server does not return token log-probabilities",
    "top_logprobs": "this server does not return token log-probabilities",
    "echo": "replies do not repeat the prompt",
    "suffix": "there is no fill-in-the-middle",
    "best_of": "ask for n choices and pick among them",
    "response_format": "there is no structured (JSON) output mode; only {\"type\": \"text\"}",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class SamplingFields(_Lenient):
    """Fields shared by every generation request (and by per-request overrides of a batch)."""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)           # extension: 0 or None = off
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    response_format: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        off = v is None or v is False or v == {"type": "text"} or (info.field_name, v) in (
            ("top_logprobs", 0), ("best_of", 1), ("suffix", ""))
        if not off:
            raise ValueError(f"{info.field_name} is not supported: {UNSUPPORTED[info.field_name]}")
        return None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class BatchItem(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class BatchRequest(SamplingFields):
    requests: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH)
    model: str | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_UNION_MEMBER = re.compile(r"^(str|int|float|bool)$|\[")  # how pydantic names a union member in `loc`


def first_error(errors: list[dict]) -> tuple[str | None, str]:
    """The (param, message) to report for a failed validation: the first error, by its field path.

    A field typed as a union (`content: str | list[TextPart]`, `stop`, `prompt`) fails once per
    member, each with the member's name in `loc`. A client wants the field's own path and the
    member that matched furthest: an image part is "messages.0.content.1.type: Input should be
    'text'", not "content.str: Input should be a valid string". If no member got past the field
    itself (content: 5), the message lists what each member wanted.
    """
    def path(loc):
        return [str(x) for x in loc if x != "body" and not _UNION_MEMBER.search(str(x))]

    err = errors[0]
    loc = list(err.get("loc", ()))
    at = next((i for i, x in enumerate(loc) if _UNION_MEMBER.search(str(x))), None)
    msg = err.get("msg", "invalid request")
    if at is not None:
        union = [e for e in errors if list(e.get("loc", ()))[:at] == loc[:at] and len(e.get("loc", ())) > at]
        deepest = max(union, key=lambda e: len(e["loc"]))
        if len(deepest["loc"]) > at + 1:
            err, msg = deepest, deepest["msg"]
        else:  # every member failed on the value itself: "a valid string or a valid list"
            wants = [e["msg"].removeprefix("Input should be ") for e in union]
            msg = "Input should be " + " or ".join(dict.fromkeys(wants))
    return ".".join(path(err.get("loc", ()))) or None, msg


class APIError(Exception):
    """Raised by handlers; app.py turns it into an OpenAI-shaped JSON error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers or {}
