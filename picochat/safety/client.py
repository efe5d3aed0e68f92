"""LLM client layer: one AsyncOpenAI client per role, with concurrency limits, retries, cache and costs.

Calls go through the official `openai` SDK with its own retries off, so every failure is seen and
counted: 429 (obeying Retry-After), 5xx, timeouts, connection errors, a 200 whose body is not JSON and
an empty completion are retried with jittered exponential backoff; any other 4xx is not (the request
itself is wrong); a call that gives up raises LLMCallError. A reply is cached on disk (store.CallCache)
before it is returned, unless the caller's `accept` rejects it, and every request and cache hit goes
to the usage log (usage.py). The API key is read from the environment, never stored, logged or hashed.
`preflight(llm)` reaches every role's endpoint before any work and fails with ONE line that says what to fix.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from dataclasses import dataclass

from picochat.common import PicochatError
from picochat.safety.config import RoleConfig, SafetyConfig, request_params, sent_names
from picochat.safety.store import CallCache, request_key
from picochat.safety.usage import RoleStats, UsageLog, cost_of, totals


class LLMCallError(Exception):
    """A call that failed for good (retries exhausted or a non-retryable error)."""

    def __init__(self, role: str, kind: str, detail: str = ""):
        super().__init__(f"{role}: {kind}{': ' + detail if detail else ''}")
        self.role, self.kind, self.detail = role, kind, detail


class _Retry(Exception):
    def __init__(self, kind: str, wait: float | None = None, detail: str = ""):
        super().__init__(kind)
        self.kind, self.wait, self.detail = kind, wait, detail


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    cached: bool


def api_key_for(role: RoleConfig) -> str:
    if not role.api_key_env:
        return "no-key"  # the SDK insists on a key; local servers ignore it
    val = os.environ.get(role.api_key_env)
    if not val:
        raise PicochatError(f"role {role.name}: environment variable {role.api_key_env} is not set "
                            f"(it must hold the API key for {role.base_url}; or set api_key_env = \"\" "
                            f"for an endpoint without keys)")
    return val


def _seed(key: str) -> int:
    """A seed derived from the request key, which includes the sample index: each re-sample gets its own."""
    return int(key[:8], 16) & 0x7FFFFFFF


def _retry_after(headers) -> float | None:
    """Seconds to wait from retry-after-ms / Retry-After, or None (HTTP-dates fall back to backoff)."""
    for name, div in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):  # absent (None) or not a number
            return max(0.0, float((headers or {}).get(name)) / div)
    return None


class LLM:
    """Calls LLM roles. Create inside the event loop that uses it; `await aclose()` at the end."""

    def __init__(self, cfg: SafetyConfig, roles: list[str] | tuple[str, ...], usage: UsageLog | None = None):
        self.usage = usage
        self.roles: dict[str, RoleConfig] = {name: cfg.role(name) for name in roles}
        # keys are checked for every role up front so a missing one fails before any network traffic
        self._keys = {name: api_key_for(r) for name, r in self.roles.items()}
        self.cache = CallCache(cfg.cache)
        self.stats = {name: RoleStats() for name in self.roles}
        self._clients: dict = {}
        self._sems = {name: asyncio.Semaphore(r.concurrency) for name, r in self.roles.items()}
        self._inflight: dict[str, asyncio.Future] = {}

    # ------------------------------------------------------------------ plumbing

    def _client(self, role: str):
        from openai import AsyncOpenAI  # imported lazily: `safety report` works without the SDK
        if role not in self._clients:
            r = self.roles[role]
            # max_retries=0: the SDK would retry silently; we retry ourselves so failures are counted
            self._clients[role] = AsyncOpenAI(api_key=self._keys[role], base_url=r.base_url,
                                              timeout=r.timeout_s, max_retries=0)
        return self._clients[role]

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
        if self.usage is not None:
            self.usage.close()

    def _log(self, role: str, **fields) -> None:
        self.stats[role].add(fields)  # what this process did, counted as usage.jsonl counts it
        if self.usage is not None:
            self.usage.record(self.roles[role], **fields)

    # ------------------------------------------------------------------ calls

    def request(self, role: str, messages: list[dict], sample: int, temperature: float | None,
                max_tokens: int | None) -> tuple[str, dict]:
        """(cache key, JSON body fields) of a request: what is sent, and what identifies its answer."""
        r = self.roles[role]
        temperature = r.temperature if temperature is None else temperature
        if sample > 0:
            temperature = max(temperature, r.resample_temperature)
        max_tokens = r.max_tokens if max_tokens is None else max_tokens
        shape = request_params(r, temperature, max_tokens, None)  # how it is sent is part of the key
        key = request_key(r.base_url, r.model, messages, temperature, max_tokens, sample,
                          shape if (r.params or r.extra) else None)
        return key, request_params(r, temperature, max_tokens, _seed(key) if r.send_seed else None)

    async def chat(self, role: str, messages: list[dict], *, sample: int = 0, temperature: float | None = None,
                   max_tokens: int | None = None, accept=None) -> Reply:
        """One chat completion for `role`, from the cache when this exact request was answered before.

        accept(text) -> bool decides whether a reply is worth caching: one it rejects (an unparseable
        judge verdict) is returned but not stored, and a stored one it rejects is asked again, so a
        rerun can recover instead of replaying the same garbage forever.
        """
        key, body = self.request(role, messages, sample, temperature, max_tokens)
        hit = self.cache.get(key)
        if hit is not None and accept is not None and not accept(hit["text"]):
            hit = None
        if hit is None and key in self._inflight:  # the same request is already on the wire: share its answer
            hit = await asyncio.shield(self._inflight[key])
        if hit is not None:
            self._log(role, event="cache_hit")
            return Reply(hit["text"], hit.get("finish_reason"), True)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry = await self._call(role, messages, body)
            if accept is None or accept(entry["text"]):
                self.cache.put(key, entry)  # on disk before anyone sees the reply: kill-safe
            fut.set_result(entry)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            del self._inflight[key]
        return Reply(entry["text"], entry.get("finish_reason"), False)

    def _redact(self, text: str) -> str:
        """Error bodies may echo (part of) the key, e.g. 'Incorrect API key provided: sk-ab***yz'."""
        for k in self._keys.values():
            if k and k != "no-key":
                text = text.replace(k, "***")
        return re.sub(r"\b(sk|key|api)[-_][A-Za-z0-9_\-*]{4,}", r"\1-***", text, flags=re.IGNORECASE)

    async def _call(self, role: str, messages, body: dict) -> dict:
        from openai import APIConnectionError, APIStatusError, APITimeoutError
        r = self.roles[role]
        for attempt in range(r.max_retries + 1):
            try:
                async with self._sems[role]:
                    try:
                        # extra_body: the fields go out under exactly the names the role's config gives
                        resp = await self._client(role).chat.completions.create(
                            model=r.model, messages=messages, extra_body=body)
                    except APITimeoutError:
                        raise _Retry("timeout") from None
                    except APIConnectionError as e:
                        raise _Retry("connection", detail=type(e).__name__) from None
                    except APIStatusError as e:
                        if e.status_code in (408, 429) or e.status_code >= 500:  # rate limit, server trouble
                            raise _Retry(str(e.status_code), _retry_after(e.response.headers)) from None
                        self._log(role, event="request", ok=False, failure=f"http_{e.status_code}")
                        raise LLMCallError(role, f"http_{e.status_code}", self._redact(str(e))[:200]) from None
                    except ValueError as e:  # a 200 whose body is not JSON (malformed or truncated)
                        raise _Retry("bad_response", detail=str(e)[:100]) from None
                    try:
                        choice = resp.choices[0]
                        text = choice.message.content or ""
                        finish = choice.finish_reason
                    except (TypeError, IndexError, AttributeError):
                        raise _Retry("bad_response", detail="no choices in the reply") from None
                    if not text.strip():
                        raise _Retry("empty")
                usage = getattr(resp, "usage", None)
                est = usage is None or usage.prompt_tokens is None  # no usage sent: chars/4 it is
                if est:
                    tin, tout = sum(len(str(m.get("content", ""))) for m in messages) // 4, len(text) // 4
                else:
                    tin, tout = int(usage.prompt_tokens), int(usage.completion_tokens or 0)
                self._log(role, event="request", ok=True, **{"in": tin, "out": tout}, est=est,
                          trunc=finish == "length", cost=round(cost_of(r, tin, tout), 8))
                return {"text": text, "finish_reason": finish, "usage": {"input": tin, "output": tout},
                        "model": r.model, "time": time.time()}
            except _Retry as e:
                last = attempt >= r.max_retries
                self._log(role, event="request", ok=False, retry=e.kind, failure=e.kind if last else None)
                if last:
                    raise LLMCallError(role, e.kind, f"gave up after {attempt + 1} attempts {e.detail}".strip()) from None
                if e.wait is not None:  # the server said how long: obey it, within reason
                    delay = min(e.wait, r.retry_after_max_s)
                else:  # exponential backoff with jitter
                    delay = min(r.backoff_max_s, r.backoff_base_s * 2 ** attempt) * (0.5 + 0.5 * random.random())
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def costs(self) -> dict:
        """This process's usage per role, in usage.aggregate's shape: the table a stage prints at its end."""
        roles = {name: dict(st.entry(), model=self.roles[name].model,
                            cost_usd=round(cost_of(self.roles[name], st.input_tokens, st.output_tokens), 6))
                 for name, st in self.stats.items()}
        return {"roles": roles, "total": totals(roles.values())}


# ----------------------------------------------------------------------------- preflight

PROBE = "Preflight check: reply with the word OK."
PROBE_TOKENS = 16  # enough for "OK"; a reasoning model may spend it thinking, which is fine (status is what counts)


def _rejected_param(e, body: dict) -> str | None:
    """The body field an HTTP 400/422 blames: the error's `param`, else a field named in its message."""
    p = getattr(e, "param", None)
    if p in body:
        return p
    msg = str(getattr(e, "message", "") or e)
    named = [k for k in body if re.search(r"(?<![\w.])" + re.escape(k) + r"(?![\w])", msg)]
    return max(named, key=len) if named else None  # "max_completion_tokens" over a shorter name inside it


def _fix_for(role, param: str) -> str:
    std = sent_names(role)
    where = f"[roles.{role.name}]"
    if param in role.extra:
        return f"remove {param} from {where} extra"
    if param == "max_tokens" == std.get(param):
        return f'send it as max_completion_tokens: params = {{ max_tokens = "max_completion_tokens" }} in {where}'
    if param in std:
        return f"leave it out: params = {{ {std[param]} = false }} in {where} (or rename it there)"
    return f"rename or drop it with params / extra in {where}"


async def _chat(llm, name: str, text: str, remember: bool) -> None:
    """One tiny chat request with the role's real request shape; remembered in the cache when asked."""
    r = llm.roles[name]
    msgs = [{"role": "user", "content": text}]
    key, body = llm.request(name, msgs, 0, None, PROBE_TOKENS)
    if remember and llm.cache.get(key) is not None:
        return  # this exact request shape was accepted before
    client = llm._client(name).with_options(timeout=r.preflight_timeout_s, max_retries=1)
    resp = await _explained(llm, name, body, client.chat.completions.create(model=r.model, messages=msgs,
                                                                            extra_body=body))
    if remember:
        choice = resp.choices[0] if getattr(resp, "choices", None) else None
        llm.cache.put(key, {"text": (choice.message.content if choice else "") or "", "preflight": True,
                            "finish_reason": choice.finish_reason if choice else None})


async def _explained(llm, name: str, body: dict | None, awaitable):
    """Await an SDK call, turning each way it can fail into one PicochatError line."""
    from openai import APIConnectionError, APIStatusError, AuthenticationError
    r = llm.roles[name]
    try:
        return await awaitable
    except AuthenticationError:
        raise PicochatError(f"role {name}: {r.base_url} rejected the API key from "
                            f"${r.api_key_env or '(none)'}") from None
    except APIConnectionError as e:  # includes timeouts
        raise PicochatError(f"role {name}: cannot reach {r.base_url} ({type(e).__name__}); "
                            f"is the server running and base_url right?") from None
    except APIStatusError as e:
        param = _rejected_param(e, body) if body is not None and e.status_code in (400, 422) else None
        if param:
            msg = " ".join(llm._redact(str(getattr(e, "message", "") or e)).split())[:160]
            raise PicochatError(f"role {name}: {r.base_url} rejected the request parameter {param!r} for model "
                                f"{r.model!r} (HTTP {e.status_code}: {msg}); {_fix_for(r, param)}") from None
        if e.status_code == 404 and body is None:
            raise  # models.list without /models: the caller falls back to a ping
        raise PicochatError(f"role {name}: {r.base_url} answered HTTP {e.status_code} to the preflight "
                            f"check (model {r.model!r})") from None


def _shape(r) -> str:
    return repr((r.base_url, r.api_key_env, r.model, sorted(request_params(r, r.temperature, PROBE_TOKENS, None).items())))


async def preflight(llm) -> None:
    """Check every role of `llm`; PicochatError on the first problem.

    1. models.list() per endpoint: an unreachable URL, a rejected key or an unlisted model stops here
       (a server without /models gets a one-line "ping" chat request instead).
    2. A tiny chat request per distinct (endpoint, model, request shape), with the parameters the role
       really sends: a reasoning model's HTTP 400 naming `max_tokens` or `temperature` becomes one line
       naming the role, the parameter and the config fix. An accepted probe is remembered in the call
       cache, so reruns do not pay for it; probes are not work, so the usage log skips them.
    """
    from openai import NotFoundError
    endpoints, checked = set(), set()
    for name, r in llm.roles.items():
        if (r.base_url, r.api_key_env, r.model) in endpoints:
            continue
        endpoints.add((r.base_url, r.api_key_env, r.model))
        client = llm._client(name).with_options(timeout=r.preflight_timeout_s, max_retries=1)
        try:
            page = await _explained(llm, name, None, client.models.list())
        except NotFoundError:
            # no /models on this server: a one-token request proves URL, key, model and parameters instead
            await _chat(llm, name, "ping", remember=False)
            checked.add(_shape(r))
            continue
        ids = [m.id for m in (page.data or [])]
        if r.check_model and ids and r.model not in ids:
            shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
            raise PicochatError(f"role {name}: model {r.model!r} is not served at {r.base_url} "
                                f"(available: {shown}; set check_model = false to skip this check)")
    for name, r in llm.roles.items():  # every endpoint answered: now the parameters each role sends
        if _shape(r) not in checked:
            checked.add(_shape(r))
            await _chat(llm, name, PROBE, remember=True)
