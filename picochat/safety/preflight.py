"""Preflight: reach every role's endpoint before any work, and fail with ONE line that says what to fix.

1. models.list() per endpoint: an unreachable URL, a rejected key or an unlisted model stops here
   (a server without /models gets a one-line "ping" chat request instead).
2. A tiny chat request per distinct (endpoint, model, request shape), with the parameters the role
   really sends: a reasoning model's HTTP 400 naming `max_tokens` or `temperature` becomes one line
   naming the role, the parameter and the config fix. An accepted probe is remembered in the call
   cache, so reruns do not pay for it; probes are not work, so the usage log skips them.
"""
from __future__ import annotations

import re

from picochat.common import PicochatError
from picochat.safety.config import request_params, sent_names

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
    """Check every role of `llm` (see the module docstring); PicochatError on the first problem."""
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
