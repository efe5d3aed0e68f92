"""The OpenAI-compatible HTTP server: FastAPI app factory over an already-loaded model.

    POST /v1/chat/completions   chat (non-streaming, or `stream: true` as SSE chunks)
    POST /v1/completions        plain text continuation
    POST /v1/batch/completions  many chat requests answered together
    GET  /v1/models[/{id}]      the served model
    GET  /health                liveness + scheduler load (active_slots, queued, in_flight)
    GET  /                      the web chat UI (static/index.html)

`create_app` takes the model and tokenizer (tests build it from a tiny random model); the one
Scheduler thread owns the model. Limits: prompt + max_tokens must fit the model's context
(400 naming the limit); at most max_batch + max_queue generations in flight (else 503 with
Retry-After, instead of unbounded memory; a request for more than that in one go can never be
served: 400); bodies over max_body_bytes get 413, bodies slower than body_timeout_s 408; with an
API key, every /v1 route wants `Authorization: Bearer KEY`. Every error is OpenAI's JSON shape.
GET routes answer HEAD too; OPTIONS lists a route's methods (no CORS).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.inference.scheduler import Scheduler
from picochat.serve.generation import Generation, chat_turn, stream_text
from picochat.serve.guard import Guard
from picochat.serve.schemas import (APIError, BatchRequest, ChatCompletionRequest, ChatMessage, CompletionRequest,
                                    SamplingFields, error_body)

STATIC = Path(__file__).parent / "static"


class _SSEResponse(StreamingResponse):
    """Close the event generator as soon as streaming stops for any reason (client gone, send
    failed), so its `finally` frees the batch slots now rather than at garbage collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _render_messages(messages: list[ChatMessage]) -> list[dict]:
    """API messages -> picochat conversation messages (developer is OpenAI's new name for system;
    the tokenizer folds a system message into the first user turn)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


def create_app(model, tokenizer, *, model_name: str = "picochat", draft=None, api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 512, spec_chunk: int = 16, context_length: int | None = None,
               body_timeout_s: float = 30.0, decode_step: str = "eager") -> FastAPI:
    """Build the app. `model` is a GPT (or an Engine, whose model is used) in eval mode on its
    device; `draft` an optional smaller GPT with the same vocabulary for speculative decoding.
    context_length: prompt + max_tokens limit per request; default the trained sequence_len, at
    most the model's rotary table (quality degrades past the trained length). decode_step: how the
    scheduler runs each decode step (inference/decode_step.py)."""
    model = getattr(model, "model", model)
    scheduler = Scheduler(model, draft=draft, max_batch=max_batch, pad_id=tokenizer.pad_token_id,
                          spec_chunk=spec_chunk, decode_step=decode_step)
    context = int(context_length or model.config.sequence_len)
    if not 1 <= context <= model.cos.size(0):
        raise ValueError(f"context_length must be in [1, {model.cos.size(0)}] (the model's rotary table), got {context}")
    capacity = max_batch + max_queue
    state = {"in_flight": 0}
    lock = threading.Lock()
    created = int(time.time())
    index_html = (STATIC / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.limits = {"max_batch": max_batch, "max_queue": max_queue, "context_length": context,
                        "max_body_bytes": max_body_bytes}
    def allowed_methods(path: str) -> set[str]:
        return {m for r in app.router.routes if getattr(r, "methods", None) and r.path_regex.match(path)
                for m in r.methods}

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                       allowed_methods=allowed_methods)

    # ------------------------------------------------------------------ errors, OpenAI-shaped

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
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
        param = ".".join(loc) or None
        msg = f"Invalid value for '{param}': {err.get('msg')}" if param else f"Invalid request: {err.get('msg')}"
        return JSONResponse(error_body(msg, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        msg = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
               else str(exc.detail))
        return JSONResponse(error_body(msg, code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=exc.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        return JSONResponse(error_body(f"The server had an error while processing your request ({type(exc).__name__}).",
                                       "server_error"), status_code=500)

    # ------------------------------------------------------------------ shared steps

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def budget(prompt_len: int, fields: SamplingFields, param: str) -> int:
        asked = fields.budget()
        total = prompt_len + (asked if asked is not None else 1)
        if total > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{total} tokens ({prompt_len} in the {param.split('.')[-1]}, "
                                f"{asked if asked is not None else 1} in the completion). Please reduce the length "
                                "of the messages or completion.", param=param, code="context_length_exceeded")
        return asked if asked is not None else min(default_max_tokens, context - prompt_len)

    def render(messages: list[ChatMessage], param: str) -> tuple[list[dict], list[int]]:
        conv = _render_messages(messages)
        try:
            return conv, tokenizer.render_for_completion({"messages": conv})
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_messages") from None

    def admit(n: int, param: str):
        """Reserve n generations or refuse with 503 + Retry-After; returns the release callback.
        More than the whole capacity can never be served: 400, not a 503 inviting retries."""
        if n > capacity:
            raise APIError(400, f"This request asks for {n} generations (prompts x n, or batch requests) but the "
                                f"server runs at most {capacity} at once (--max-batch {max_batch} + --max-queue "
                                f"{max_queue}); split it into smaller requests.", param=param,
                           code="too_many_generations")
        with lock:
            if state["in_flight"] + n > capacity:
                raise APIError(503, f"The server is at capacity ({capacity} generations in flight or queued); "
                                    "retry shortly.", "server_overloaded", code="queue_full", headers={"Retry-After": "1"})
            state["in_flight"] += n

        def release():
            with lock:
                state["in_flight"] -= n
        return release

    def sampling(f: SamplingFields, seed_offset: int) -> dict:
        return dict(temperature=1.0 if f.temperature is None else f.temperature, top_k=f.top_k or None,
                    top_p=f.top_p, seed=None if f.seed is None else f.seed + seed_offset)

    def message(r) -> dict:
        """A chat choice's message: the reply text in `content`; the calculator calls the model made
        (run by the server: nothing for the client to do) in the non-standard `tool_runs`."""
        msg = {"role": "assistant", "content": r.text}
        if r.tool_runs:
            msg["tool_runs"] = [t.as_dict(k) for k, t in enumerate(r.tool_runs)]
        return msg

    async def client_gone(request: Request) -> None:
        """Return when the client disconnects (the body was read already: receive() waits for it)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def respond(request: Request, gen: Generation, *, stream: bool, include_usage: bool, prompt_tokens: int,
                      kind: str):
        """Stream SSE chunks or return the whole object; kind is 'chat' or 'text'."""
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())
        if not stream:
            try:
                results = await gen.collect(lambda: client_gone(request))
            except ConnectionAbortedError:
                return JSONResponse(error_body("client disconnected"), status_code=499)
            except Exception as e:
                raise APIError(500, f"generation failed: {e}", "server_error") from None
            choices = [({"index": i, "message": message(r)} if kind == "chat" else {"index": i, "text": r.text})
                       | {"finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)]
            return {"id": cid, "object": obj, "created": now, "model": model_name, "system_fingerprint": None,
                    "choices": choices, "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results))}

        def chunk(choices, **extra) -> str:
            body = {"id": cid, "object": obj + ".chunk" if kind == "chat" else obj, "created": now,
                    "model": model_name, "system_fingerprint": None, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def choice(i, content=None, finish=None, role=False, tool=None):
            if kind == "chat":
                delta = {} if content is None else {"content": content}
                if role:
                    delta["role"] = "assistant"
                if tool is not None:
                    delta["tool_runs"] = [tool]
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": i, "text": content or "", "finish_reason": finish, "logprobs": None}

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
                        yield chunk([choice(ev[1], tool=runs[-1].as_dict(len(runs) - 1))])
                    elif ev[0] == "end":
                        yield chunk([choice(ev[1], finish=ev[2])])
                    else:
                        yield f"data: {json.dumps(error_body(f'generation failed: {ev[2]}', 'server_error'))}\n\n"
                        return
                if include_usage:
                    yield chunk([], usage=usage(prompt_tokens, sum(r.completion_tokens for r in gen.results)))
                yield "data: [DONE]\n\n"
            finally:
                gen.close()  # client gone or done: free the batch slots now

        return _SSEResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes

    def get(path: str):  # a GET route that answers HEAD too (same headers, no body)
        return app.api_route(path, methods=["GET", "HEAD"])

    @get("/")
    async def index():
        return HTMLResponse(index_html)

    @get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active_slots": scheduler.active_slots,
                "queued": scheduler.queued, "in_flight": state["in_flight"], "max_batch": max_batch,
                "max_queue": max_queue, "context_length": context, "speculative": draft is not None,
                "stats": dict(scheduler.stats)}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "picochat",
                "context_length": context}

    @get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        conv, ids = render(body.messages, "messages")
        max_tokens = budget(len(ids), body, "messages")
        release = admit(body.n, "n")
        pieces = [chat_turn(tokenizer, conv, max_tokens, **sampling(body, i)) for i in range(body.n)]
        gen = Generation(scheduler, tokenizer, pieces, body.stop, on_close=release)
        return await respond(request, gen, stream=body.stream, prompt_tokens=len(ids), kind="chat",
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        pieces, total = [], 0
        for p in prompts:
            ids = tokenizer.encode(p, prepend=tokenizer.bos_token_id)
            max_tokens = budget(len(ids), body, "prompt")
            total += len(ids)
            for j in range(body.n):
                kw = sampling(body, j)
                pieces.append(lambda eng, reply, ids=ids, m=max_tokens, kw=kw: stream_text(
                    eng, tokenizer, ids, m, kw["temperature"], kw["top_k"], kw["top_p"], kw["seed"], reply))
        release = admit(len(pieces), "prompt" if body.n == 1 else "n")
        gen = Generation(scheduler, tokenizer, pieces, body.stop, on_close=release)
        return await respond(request, gen, stream=body.stream, prompt_tokens=total, kind="text",
                             include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/batch/completions")
    async def batch_completions(body: BatchRequest, request: Request):
        check_model(body.model)
        jobs = []
        for i, item in enumerate(body.requests):
            merged = SamplingFields(**{k: getattr(item, k) if getattr(item, k) is not None else getattr(body, k)
                                       for k in SamplingFields.model_fields})
            conv, ids = render(item.messages, f"requests.{i}.messages")
            jobs.append((conv, ids, budget(len(ids), merged, f"requests.{i}.messages"), merged))
        release = admit(len(jobs), "requests")
        gens, outstanding = [], len(jobs)

        def release_one():
            nonlocal outstanding
            outstanding -= 1
            if outstanding == 0:
                release()

        for conv, ids, m, f in jobs:
            gens.append(Generation(scheduler, tokenizer, [chat_turn(tokenizer, conv, m, **sampling(f, 0))], f.stop,
                                   on_close=release_one))
        responses = []
        try:
            for (conv, ids, m, f), gen in zip(jobs, gens):
                responses.append(await respond(request, gen, stream=False, include_usage=False,
                                               prompt_tokens=len(ids), kind="chat"))
                if isinstance(responses[-1], JSONResponse):  # the client went away
                    return responses[-1]
        finally:
            for gen in gens:
                gen.close()
        total = {k: sum(r["usage"][k] for r in responses) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return {"id": "batch-" + uuid.uuid4().hex[:24], "object": "batch.completion", "created": int(time.time()),
                "model": model_name, "responses": responses, "usage": total}

    return app
