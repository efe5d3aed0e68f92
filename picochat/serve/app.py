"""The OpenAI-compatible HTTP server: FastAPI app factory over an already-loaded model.

    POST /v1/chat/completions   chat (non-streaming, or `stream: true` as SSE chunks)
    POST /v1/completions        plain text continuation
    POST /v1/batch/completions  many chat requests answered together
    GET  /v1/models[/{id}]      the served model
    GET  /health                liveness + scheduler load (active_slots, queued, in_flight)
    GET  /                      the web chat UI (static/index.html)

`create_app` takes the model and tokenizer (tests build it from a tiny random model); the one
Scheduler thread owns the model. The routes are methods of `Routes`, which holds what they share
(the scheduler, the limits, admission). docs/serving.md has the limits, the errors (every one in
OpenAI's JSON shape) and the path of a request.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.inference.sampling import Sampling
from picochat.serve import DEFAULT_MAX_TOKENS, MAX_BATCH, MAX_BODY_BYTES, MAX_QUEUE
from picochat.inference.memory import check_kv_budget
from picochat.inference.quant import weight_bytes
from picochat.inference.scheduler import Scheduler
from picochat.serve.generation import ChoiceResult, Generation, chat_turn, text_turn
from picochat.serve.guard import Guard
from picochat.serve.schemas import (APIError, BatchRequest, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                    SamplingFields, error_body, first_error)

STATIC = Path(__file__).parent / "static"


class _SSEResponse(StreamingResponse):
    """Close the event generator as soon as streaming stops for any reason (client gone, send
    failed), so its `finally` frees the batch slots now rather than at garbage collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def _api_error(request, exc: APIError):
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


async def _validation_error(request, exc: RequestValidationError):
    err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return JSONResponse(error_body("We could not parse the JSON body of your request: "
                                       f"{err.get('ctx', {}).get('error', 'invalid JSON')}.",
                                       code="invalid_json"), status_code=400)
    if err.get("type") == "model_attributes_type" and not loc:
        return JSONResponse(error_body("The request body must be a JSON object (Content-Type: application/json).",
                                       code="invalid_json"), status_code=400)
    param, why = first_error(exc.errors())
    msg = f"Invalid value for '{param}': {why}" if param else f"Invalid request: {why}"
    return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)


async def _http_error(request, exc: StarletteHTTPException):
    msg = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
           else str(exc.detail))
    return JSONResponse(error_body(msg, code="not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code, headers=exc.headers)  # 405 keeps its Allow


async def _server_error(request, exc: Exception):
    return JSONResponse(error_body(f"The server had an error while processing your request ({type(exc).__name__}).",
                                   "server_error"), status_code=500)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _message(r: ChoiceResult) -> dict:
    """A chat choice's message: the reply text in `content`; the calculator calls the model made
    (run by the server: nothing for the client to do) in the non-standard `tool_runs`."""
    msg = {"role": "assistant", "content": r.text}
    if r.tool_runs:
        msg["tool_runs"] = [{"index": k, **t} for k, t in enumerate(r.tool_runs)]
    return msg


def _delta(kind: str, i: int, content=None, finish=None, role=False, tool=None) -> dict:
    """One choice of a streamed chunk; kind is 'chat' or 'text'."""
    if kind == "chat":
        delta = {} if content is None else {"content": content}
        if role:
            delta["role"] = "assistant"
        if tool is not None:
            delta["tool_runs"] = [tool]
        return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {"index": i, "text": content or "", "finish_reason": finish, "logprobs": None}


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body was read already: receive() waits for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, gen: Generation) -> list[ChoiceResult]:
    """Every choice's result; a 499 error when the client went away."""
    try:
        return await gen.collect(lambda: _client_gone(request))
    except ConnectionAbortedError:
        raise APIError(499, "client disconnected") from None
    except Exception as e:
        raise APIError(500, f"generation failed: {e}", "server_error") from None


class Routes:
    """The API's handlers and what they share: the model's limits, the tokenizer, the scheduler and
    the admission count (generations in flight, at most max_batch + max_queue)."""

    def __init__(self, tokenizer, scheduler: Scheduler, *, model_name: str, max_batch: int, max_queue: int,
                 context: int, default_max_tokens: int, speculative: bool):
        self.tok, self.scheduler, self.model_name = tokenizer, scheduler, model_name
        self.max_batch, self.max_queue, self.capacity = max_batch, max_queue, max_batch + max_queue
        self.context, self.default_max_tokens, self.speculative = context, default_max_tokens, speculative
        self.in_flight = 0
        self._lock = threading.Lock()
        self.created = int(time.time())
        self.index_html = (STATIC / "index.html").read_text(encoding="utf-8")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def budget(self, prompt_len: int, fields: SamplingFields, param: str) -> int:
        asked = fields.budget()
        total = prompt_len + (asked if asked is not None else 1)
        if total > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {total} tokens ({prompt_len} in the {param.split('.')[-1]}, "
                                f"{asked if asked is not None else 1} in the completion). Please reduce the length "
                                "of the messages or completion.", param=param, code="context_length_exceeded")
        return asked if asked is not None else min(self.default_max_tokens, self.context - prompt_len)

    def render(self, messages: list[ChatMessage], param: str) -> tuple[list[dict], list[int]]:
        # developer is OpenAI's new name for system; the tokenizer folds a system message into the
        # first user turn
        conv = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return conv, self.tok.render_for_completion({"messages": conv})
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_messages") from None

    def admit(self, n: int, param: str):
        """Reserve n generations or refuse with 503 + Retry-After; returns the release callback.
        More than the whole capacity can never be served: 400, not a 503 inviting retries."""
        if n > self.capacity:
            raise APIError(400, f"This request asks for {n} generations (prompts x n, or batch requests) but the "
                                f"server runs at most {self.capacity} at once (--max-batch {self.max_batch} + "
                                f"--max-queue {self.max_queue}); split it into smaller requests.", param=param,
                           code="too_many_generations")
        with self._lock:
            if self.in_flight + n > self.capacity:
                raise APIError(503, f"The server is at capacity ({self.capacity} generations in flight or queued); "
                                    "retry shortly.", "server_overloaded", code="queue_full", headers={"Retry-After": "1"})
            self.in_flight += n

        def release():
            with self._lock:
                self.in_flight -= n
        return release

    @staticmethod
    def sampling(f: SamplingFields, seed_offset: int) -> Sampling:
        """A request's sampling fields; choice i uses seed + i, as the engine's rows do."""
        return Sampling(1.0 if f.temperature is None else f.temperature, f.top_k or None, f.top_p,
                        None if f.seed is None else f.seed + seed_offset)

    def head(self, kind: str) -> dict:
        """The fields every response object starts with; kind is 'chat' or 'text'."""
        return {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
                "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None}

    def completion(self, kind: str, results: list[ChoiceResult], prompt_tokens: int) -> dict:
        choices = [({"index": i, "message": _message(r)} if kind == "chat" else {"index": i, "text": r.text})
                   | {"finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)]
        return self.head(kind) | {"choices": choices,
                                  "usage": _usage(prompt_tokens, sum(r.completion_tokens for r in results))}

    async def respond(self, request: Request, body, pieces, release, *, prompt_tokens: int, kind: str):
        """Run the choices `pieces` of a chat or text request `body`: SSE chunks or the whole object."""
        gen = Generation(self.scheduler, pieces, [body.stop] * len(pieces), on_close=release)
        if not body.stream:
            return self.completion(kind, await _collect(request, gen), prompt_tokens)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = self.head(kind)

        def chunk(choices, **extra) -> str:
            body = head | {"object": head["object"] + ".chunk" if kind == "chat" else head["object"],
                           "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        choice = partial(_delta, kind)

        async def sse():
            try:
                if kind == "chat":
                    for i in range(len(gen.engines)):
                        yield chunk([choice(i, "", role=True)])
                async for ev in gen.events():
                    if ev[0] == "delta":
                        yield chunk([choice(ev[1], ev[2])])
                    elif ev[0] == "tool":
                        runs = gen.results[ev[1]].tool_runs
                        yield chunk([choice(ev[1], tool={"index": len(runs) - 1, **runs[-1]})])
                    elif ev[0] == "end":
                        yield chunk([choice(ev[1], finish=ev[2])])
                    else:
                        yield f"data: {json.dumps(error_body(f'generation failed: {ev[2]}', 'server_error'))}\n\n"
                        return
                if include_usage:
                    yield chunk([], usage=_usage(prompt_tokens, sum(r.completion_tokens for r in gen.results)))
                yield "data: [DONE]\n\n"
            finally:
                gen.close()  # client gone or done: free the batch slots now

        return _SSEResponse(sse(), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def index(self):
        return HTMLResponse(self.index_html)

    async def health(self):
        s = self.scheduler
        return {"status": "ok", "model": self.model_name, "active_slots": s.active_slots, "queued": s.queued,
                "in_flight": self.in_flight, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "context_length": self.context, "speculative": self.speculative, "kv_memory": s.kv_budget,
                "stats": dict(s.stats)}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "picochat",
                "context_length": self.context}

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model_id: str):
        self.check_model(model_id)
        return self.model_card()

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        conv, ids = self.render(body.messages, "messages")
        max_tokens = self.budget(len(ids), body, "messages")
        release = self.admit(body.n, "n")
        pieces = [chat_turn(self.tok, conv, max_tokens, self.sampling(body, i)) for i in range(body.n)]
        return await self.respond(request, body, pieces, release, prompt_tokens=len(ids), kind="chat")

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        pieces, total = [], 0
        for p in prompts:
            ids = self.tok.encode(p, prepend=self.tok.bos_token_id)
            max_tokens = self.budget(len(ids), body, "prompt")
            total += len(ids)
            pieces += [text_turn(self.tok, ids, max_tokens, self.sampling(body, j)) for j in range(body.n)]
        release = self.admit(len(pieces), "prompt" if body.n == 1 else "n")
        return await self.respond(request, body, pieces, release, prompt_tokens=total, kind="text")

    async def batch_completions(self, body: BatchRequest, request: Request):
        self.check_model(body.model)
        pieces, stops, prompt_lens = [], [], []
        for i, item in enumerate(body.requests):
            f = SamplingFields(**{k: getattr(item, k) if getattr(item, k) is not None else getattr(body, k)
                                  for k in SamplingFields.model_fields})
            conv, ids = self.render(item.messages, f"requests.{i}.messages")
            max_tokens = self.budget(len(ids), f, f"requests.{i}.messages")
            pieces.append(chat_turn(self.tok, conv, max_tokens, self.sampling(f, 0)))
            stops.append(f.stop)
            prompt_lens.append(len(ids))
        release = self.admit(len(pieces), "requests")
        results = await _collect(request, Generation(self.scheduler, pieces, stops, on_close=release))
        responses = [self.completion("chat", [r], n) for r, n in zip(results, prompt_lens)]
        total = {k: sum(r["usage"][k] for r in responses) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {"id": "batch-" + uuid.uuid4().hex[:24], "object": "batch.completion", "created": int(time.time()),
                "model": self.model_name, "responses": responses, "usage": total}


def create_app(model, tokenizer, *, model_name: str = "picochat", draft=None, api_key: str | None = None,
               max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, spec_chunk: int = 16, context_length: int | None = None,
               body_timeout_s: float = 30.0, decode_step: str = "eager", kv_memory: int | None = None) -> FastAPI:
    """Build the app. `model` is a GPT in eval mode on its device; `draft` an optional smaller GPT
    with the same vocabulary for speculative decoding. context_length: prompt + max_tokens limit per
    request; default the trained sequence_len, at most the model's rotary table (quality degrades
    past the trained length). kv_memory: the KV cache budget in bytes (None: no limit); requests
    beyond it wait (inference/memory.py)."""
    context = int(context_length or model.config.sequence_len)
    if not 1 <= context <= model.cos.size(0):
        raise ValueError(f"context_length must be in [1, {model.cos.size(0)}] (the model's rotary table), got {context}")
    if kv_memory is not None:
        check_kv_budget(kv_memory, context, model.kv_bytes_per_token())
    scheduler = Scheduler(model, draft=draft, max_batch=max_batch, pad_id=tokenizer.pad_token_id,
                          spec_chunk=spec_chunk, decode_step=decode_step, kv_budget=kv_memory)
    routes = Routes(tokenizer, scheduler, model_name=model_name, max_batch=max_batch, max_queue=max_queue,
                    context=context, default_max_tokens=default_max_tokens, speculative=draft is not None)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = {"max_batch": max_batch, "max_queue": max_queue, "context_length": context,
                        "max_body_bytes": max_body_bytes, "kv_memory": kv_memory,
                        "kv_bytes_per_token": None if kv_memory is None else model.kv_bytes_per_token(),
                        "weight_bytes": weight_bytes(model),
                        "quant": getattr(model, "quant", None) or str(next(model.parameters()).dtype).removeprefix("torch.")}

    def allowed_methods(path: str) -> set[str]:
        return {m for r in app.router.routes if getattr(r, "methods", None) and r.path_regex.match(path)
                for m in r.methods}

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                       allowed_methods=allowed_methods)
    for exc, handler in ((APIError, _api_error), (RequestValidationError, _validation_error),
                         (StarletteHTTPException, _http_error), (Exception, _server_error)):
        app.add_exception_handler(exc, handler)
    # GET routes answer HEAD too (same headers, no body)
    for path, endpoint in (("/", routes.index), ("/health", routes.health), ("/v1/models", routes.models),
                           ("/v1/models/{model_id:path}", routes.get_model)):
        app.add_api_route(path, endpoint, methods=["GET", "HEAD"])
    for path, endpoint in (("/v1/chat/completions", routes.chat_completions), ("/v1/completions", routes.completions),
                           ("/v1/batch/completions", routes.batch_completions)):
        app.add_api_route(path, endpoint, methods=["POST"])
    return app
