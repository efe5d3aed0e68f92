"""LLM client layer: one AsyncOpenAI client per role, with concurrency limits, retries, cache and costs.

Roles (red, blue, judge, optimizer, target) each have their own endpoint, model, key env var name,
temperature, token limit, concurrency and prices (see config.RoleConfig). Calls go through the
official `openai` SDK with its own retries switched off, because we need to see every failure:

- 429 (honouring Retry-After / retry-after-ms), 5xx, timeouts, connection errors, a 200 whose body
  is not valid JSON, and an empty completion are retried with exponential backoff + jitter;
- any other 4xx is not retried (the request itself is wrong);
- when retries run out the call raises LLMCallError, which stages record as a counted failure.

Every successful reply is cached on disk (cache.py) before it is returned. The API key is read
from the environment at client creation and is never stored, logged or hashed.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from picochat.common import PicochatError, write_json_atomic
from picochat.safety.cache import CallCache, request_key
from picochat.safety.config import RoleConfig, SafetyConfig


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
    key: str


@dataclass
class RoleStats:
    requests: int = 0          # HTTP requests actually sent (retries included)
    completed: int = 0         # calls answered by the endpoint
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_tokens: bool = False  # the endpoint sent no usage; chars/4 was used
    truncated: int = 0         # finish_reason == "length"
    retries: Counter = field(default_factory=Counter)   # by kind: 429, 500, timeout, empty, ...
    failures: Counter = field(default_factory=Counter)  # calls given up on, by kind


def api_key_for(role: RoleConfig) -> str:
    if not role.api_key_env:
        return "no-key"  # the SDK insists on a key; local servers ignore it
    val = os.environ.get(role.api_key_env)
    if not val:
        raise PicochatError(f"role {role.name}: environment variable {role.api_key_env} is not set "
                            f"(it must hold the API key for {role.base_url}; or set api_key_env = \"\" "
                            f"for an endpoint without keys)")
    return val


def _retry_after(headers) -> float | None:
    """Seconds to wait from Retry-After / retry-after-ms, or None (HTTP-dates fall back to backoff)."""
    if headers is None:
        return None
    for name, div in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            return max(0.0, float(v) / div)
        except ValueError:
            continue
    return None


class LLM:
    """Calls LLM roles. Create inside the event loop that uses it; `await aclose()` at the end."""

    def __init__(self, cfg: SafetyConfig, roles: list[str] | tuple[str, ...]):
        self.roles: dict[str, RoleConfig] = {name: cfg.role(name) for name in roles}
        # keys are checked for every role up front so a missing one fails before any network traffic
        self._keys = {name: api_key_for(r) for name, r in self.roles.items()}
        self.cache = CallCache(cfg.cache)
        self.stats = {name: RoleStats() for name in self.roles}
        self._clients: dict = {}
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._rng = random.Random()

    # ------------------------------------------------------------------ plumbing

    def _client(self, role: str):
        from openai import AsyncOpenAI  # imported lazily: `safety report` works without the SDK
        if role not in self._clients:
            r = self.roles[role]
            # max_retries=0: the SDK would retry silently; we retry ourselves so failures are counted
            self._clients[role] = AsyncOpenAI(api_key=self._keys[role], base_url=r.base_url,
                                              timeout=r.timeout_s, max_retries=0)
        return self._clients[role]

    def _sem(self, role: str) -> asyncio.Semaphore:
        if role not in self._sems:
            self._sems[role] = asyncio.Semaphore(self.roles[role].concurrency)
        return self._sems[role]

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    # ------------------------------------------------------------------ preflight

    async def preflight(self) -> None:
        """Reach every role's endpoint before any work: unreachable URL, bad key, unknown model -> PicochatError."""
        from openai import APIConnectionError, APIStatusError, AuthenticationError, NotFoundError
        seen = set()
        for name, r in self.roles.items():
            if (r.base_url, r.api_key_env, r.model) in seen:
                continue
            seen.add((r.base_url, r.api_key_env, r.model))
            client = self._client(name).with_options(timeout=r.preflight_timeout_s, max_retries=1)
            try:
                try:
                    page = await client.models.list()
                    ids = [m.id for m in (page.data or [])]
                    if r.check_model and ids and r.model not in ids:
                        shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
                        raise PicochatError(f"role {name}: model {r.model!r} is not served at {r.base_url} "
                                            f"(available: {shown}; set check_model = false to skip this check)")
                except NotFoundError:
                    # no /models on this server: a one-token request proves URL, key and model instead
                    await client.chat.completions.create(model=r.model, max_tokens=1,
                                                         messages=[{"role": "user", "content": "ping"}])
            except AuthenticationError:
                raise PicochatError(f"role {name}: {r.base_url} rejected the API key from "
                                    f"${r.api_key_env or '(none)'}") from None
            except APIConnectionError as e:  # includes timeouts
                raise PicochatError(f"role {name}: cannot reach {r.base_url} ({type(e).__name__}); "
                                    f"is the server running and base_url right?") from None
            except APIStatusError as e:
                raise PicochatError(f"role {name}: {r.base_url} answered HTTP {e.status_code} to the preflight "
                                    f"check (model {r.model!r})") from None

    # ------------------------------------------------------------------ calls

    async def chat(self, role: str, messages: list[dict], *, sample: int = 0, temperature: float | None = None,
                   max_tokens: int | None = None) -> Reply:
        """One chat completion for `role`, from the cache when this exact request was answered before."""
        r = self.roles[role]
        temperature = r.temperature if temperature is None else temperature
        max_tokens = r.max_tokens if max_tokens is None else max_tokens
        key = request_key(r.base_url, r.model, messages, temperature, max_tokens, sample)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats[role].cache_hits += 1
            return Reply(hit["text"], hit.get("finish_reason"), True, key)
        if key in self._inflight:  # the same request is already on the wire: share its answer
            entry = await asyncio.shield(self._inflight[key])
            self.stats[role].cache_hits += 1
            return Reply(entry["text"], entry.get("finish_reason"), True, key)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            entry = await self._call(role, messages, temperature, max_tokens, sample)
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
        return Reply(entry["text"], entry.get("finish_reason"), False, key)

    def _redact(self, text: str) -> str:
        """Error bodies may echo (part of) the key, e.g. 'Incorrect API key provided: sk-ab***yz'."""
        for k in self._keys.values():
            if k and k != "no-key":
                text = text.replace(k, "***")
        return re.sub(r"\b(sk|key|api)[-_][A-Za-z0-9_\-*]{4,}", r"\1-***", text, flags=re.IGNORECASE)

    def _backoff(self, r: RoleConfig, attempt: int) -> float:
        return min(r.backoff_max_s, r.backoff_base_s * 2 ** attempt) * (0.5 + 0.5 * self._rng.random())

    async def _call(self, role: str, messages, temperature, max_tokens, sample) -> dict:
        from openai import APIConnectionError, APIStatusError, APITimeoutError
        r, st = self.roles[role], self.stats[role]
        kwargs = dict(model=r.model, messages=messages, temperature=temperature, max_tokens=max_tokens)
        if r.send_seed:
            kwargs["seed"] = sample
        for attempt in range(r.max_retries + 1):
            try:
                async with self._sem(role):
                    st.requests += 1
                    try:
                        resp = await self._client(role).chat.completions.create(**kwargs)
                    except APITimeoutError:
                        raise _Retry("timeout") from None
                    except APIConnectionError as e:
                        raise _Retry("connection", detail=type(e).__name__) from None
                    except APIStatusError as e:
                        if e.status_code == 429:
                            raise _Retry("429", _retry_after(e.response.headers)) from None
                        if e.status_code >= 500 or e.status_code == 408:
                            raise _Retry(str(e.status_code), _retry_after(e.response.headers)) from None
                        st.failures[f"http_{e.status_code}"] += 1
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
                st.completed += 1
                usage = getattr(resp, "usage", None)
                if usage is not None and usage.prompt_tokens is not None:
                    tin, tout = int(usage.prompt_tokens), int(usage.completion_tokens or 0)
                else:
                    tin = sum(len(str(m.get("content", ""))) for m in messages) // 4
                    tout, st.estimated_tokens = len(text) // 4, True
                st.input_tokens += tin
                st.output_tokens += tout
                if finish == "length":
                    st.truncated += 1
                return {"text": text, "finish_reason": finish, "usage": {"input": tin, "output": tout},
                        "model": r.model, "time": time.time()}
            except _Retry as e:
                st.retries[e.kind] += 1
                if attempt >= r.max_retries:
                    st.failures[e.kind] += 1
                    raise LLMCallError(role, e.kind, f"gave up after {attempt + 1} attempts {e.detail}".strip()) from None
                delay = self._backoff(r, attempt)
                if e.wait is not None:  # the server said how long: obey it, within reason
                    delay = min(e.wait, r.retry_after_max_s)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ costs

    def costs(self) -> dict:
        out, tot = {}, {"requests": 0, "cache_hits": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
                        "failures": 0, "retries": 0}
        for name, st in self.stats.items():
            r = self.roles[name]
            cost = st.input_tokens / 1e6 * r.price_in_per_1m + st.output_tokens / 1e6 * r.price_out_per_1m
            out[name] = {"model": r.model, "requests": st.requests, "completed": st.completed,
                         "cache_hits": st.cache_hits, "input_tokens": st.input_tokens,
                         "output_tokens": st.output_tokens, "estimated_tokens": st.estimated_tokens,
                         "truncated": st.truncated, "retries": dict(st.retries), "failures": dict(st.failures),
                         "price_in_per_1m": r.price_in_per_1m, "price_out_per_1m": r.price_out_per_1m,
                         "cost_usd": round(cost, 6)}
            for k in ("requests", "cache_hits", "input_tokens", "output_tokens"):
                tot[k] += getattr(st, k)
            tot["cost_usd"] = round(tot["cost_usd"] + cost, 6)
            tot["failures"] += sum(st.failures.values())
            tot["retries"] += sum(st.retries.values())
        return {"roles": out, "total": tot}


def format_costs(costs: dict) -> str:
    rows = [("role", "model", "requests", "cached", "retries", "failed", "in_tok", "out_tok", "cost_usd")]
    for name, c in costs["roles"].items():
        rows.append((name, c["model"][:24], c["requests"], c["cache_hits"], sum(c["retries"].values()),
                     sum(c["failures"].values()), c["input_tokens"], c["output_tokens"], f"{c['cost_usd']:.4f}"))
    t = costs["total"]
    rows.append(("total", "", t["requests"], t["cache_hits"], t["retries"], t["failures"], t["input_tokens"],
                 t["output_tokens"], f"{t['cost_usd']:.4f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def save_costs(path, stage: str, costs: dict) -> None:
    """Merge this stage's costs into <out>/costs.json (one entry per stage, its latest run; totals summed)."""
    path = Path(path)
    data = {"stages": {}}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = {"stages": {}}
    data.setdefault("stages", {})[stage] = costs
    total = {"requests": 0, "cache_hits": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    for c in data["stages"].values():
        for k in total:
            total[k] += c["total"].get(k, 0)
    total["cost_usd"] = round(total["cost_usd"], 6)
    data["total"] = total
    write_json_atomic(path, data)
