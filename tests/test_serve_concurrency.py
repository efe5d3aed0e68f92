"""Continuous batching under load, through the real server: many concurrent streaming clients each
get exactly the greedy answer their prompt gets alone; clients that vanish mid-stream free their
batch slots; speculative decoding (with a draft) keeps greedy answers exact; the scheduler's
shared cache merges rows that join a running batch correctly."""
import asyncio
import threading

import httpx
import openai
import pytest
import torch

from picochat.inference.engine import Engine
from picochat.inference.scheduler import Scheduler
from picochat.model.kv_cache import KVCache
from serve_helpers import model, tok  # noqa: F401  (shared module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
from modelkit import random_model
from serve_helpers import CONTEXT, alone_chat, serve, wait_until

WORDS = "fox dog quick lazy hello world today fine thank you brown jumps over".split()


def prompt(i: int) -> list[dict]:
    # different lengths and contents, so rows join the batch with different paddings
    return [{"role": "user", "content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7))}]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_merge_appends_rows_to_a_running_cache(attention):
    """KVCache.merge: rows joining mid-decode compute what they compute alone (the primitive
    continuous batching rests on), with the common padding dropped and room for more steps;
    whatever the attention layer caches (k/v, or MLA's latent)."""
    m = random_model(256, seed=3, attention=attention, seq_len=CONTEXT)
    g = torch.Generator().manual_seed(0)
    a = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9)]
    b = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 14)]
    eng = Engine(m)
    ref = eng.generate(a + b, 6, temperature=0.0, stop_tokens=set())
    with torch.inference_mode():
        cache = KVCache(0, 0)
        run = KVCache(2, 9, pad=[4, 0])
        x = torch.tensor([[0] * 4 + a[0], a[1]])
        la = m.logits(m.hidden(x, kv_cache=run)[:, -1])
        cache.merge(run, 9 + 20)
        toks = [[int(t)] for t in la.argmax(-1)]
        for _ in range(2):  # the first batch decodes two steps alone
            la = m.logits(m.hidden(torch.tensor([[t[-1]] for t in toks]), kv_cache=cache)[:, -1])
            for t, n in zip(toks, la.argmax(-1).tolist()):
                t.append(n)
        new = KVCache(2, 14, pad=[11, 0])
        lb = m.logits(m.hidden(torch.tensor([[0] * 11 + b[0], b[1]]), kv_cache=new)[:, -1])
        toks += [[int(t)] for t in lb.argmax(-1)]
        cache.merge(new, 14 + 20)
        assert cache.batch_size == 4 and cache.pos == 14  # the older rows' leading padding was dropped
        for _ in range(5):
            lg = m.logits(m.hidden(torch.tensor([[t[-1]] for t in toks]), kv_cache=cache)[:, -1])
            for t, n in zip(toks, lg.argmax(-1).tolist()):
                t.append(n)
    assert [t[:6] for t in toks] == ref


async def _streams(url: str, conversations, max_tokens: int) -> list[tuple[str, str]]:
    """All conversations as concurrent streaming requests through one SDK client."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        async def one(messages):
            text, finish = "", None
            async for c in await client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                                max_tokens=max_tokens, stream=True):
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            return text, finish
        return await asyncio.gather(*(one(m) for m in conversations))


def _stream(url: str, messages, max_tokens: int) -> tuple[str, str]:
    return asyncio.run(_streams(url, [messages], max_tokens))[0]


def test_32_concurrent_streams_equal_their_alone_answers(model, tok, monkeypatch):
    refs = [alone_chat(model, tok, prompt(i), 12) for i in range(32)]
    # the model's first forward (the first prefill) waits until every other request is queued, so they all join
    # the batch in one prefill at the next step boundary, however the threads are scheduled
    gate, hidden, first_rows = threading.Event(), model.hidden, []

    def gated_hidden(tokens, **kw):
        if not gate.is_set():
            first_rows.append(len(tokens))
            gate.wait(120)
        return hidden(tokens, **kw)

    monkeypatch.setattr(model, "hidden", gated_hidden)
    with serve(model, tok, max_batch=32) as s:
        def open_gate():
            try:
                wait_until(lambda: first_rows and httpx.get(s.url + "/health").json()["queued"] + first_rows[0] == 32,
                           timeout=120)
            finally:
                gate.set()
        opener = threading.Thread(target=open_gate, daemon=True)
        opener.start()
        got = asyncio.run(_streams(s.url, [prompt(i) for i in range(32)], 12))
        opener.join()
        health = httpx.get(s.url + "/health").json()
    assert [t for t, _ in got] == [text for text, _ in refs]
    assert [f for _, f in got] == [r.finish_reason for _, r in refs]
    stats = health["stats"]
    assert stats["prefills"] == 2 and stats["joined"] == 32   # the rest joined the first in one step
    assert stats["max_batch_seen"] > 4        # they really shared decode steps
    assert health["stats"]["finished"] == 32 and health["active_slots"] == 0


def test_100_clients_disconnecting_mid_stream_free_every_slot(model, tok):
    with serve(model, tok, max_batch=8, max_queue=128) as s:
        async def one(i: int, h: httpx.AsyncClient) -> int:
            body = {"messages": prompt(i), "max_tokens": 100, "temperature": 1.0, "seed": i, "stream": True}
            async with h.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        return 1          # got real text: hang up mid-stream
            return 0

        async def main():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as h:
                return await asyncio.gather(*(one(i, h) for i in range(100)))
        hung_up = sum(asyncio.run(main()))
        # seeded: each reply is the same on every run, whatever the batching (a few finish on a stop token before
        # their first text), so this count is too
        assert hung_up > 80
        assert wait_until(lambda: (lambda h: h["active_slots"] == 0 and h["queued"] == 0 and h["in_flight"] == 0)(
            httpx.get(s.url + "/health").json()), timeout=30)
        stats = httpx.get(s.url + "/health").json()["stats"]
        assert stats["cancelled"] >= hung_up - stats["finished"] > 0
        # still serving correctly afterwards
        text, _ = _stream(s.url, prompt(3), 10)
        assert text == alone_chat(model, tok, prompt(3), 10)[0]


def test_speculative_decoding_keeps_greedy_answers_exact(model, tok):
    draft = random_model(tok.vocab_size, seed=7, depth=1, seq_len=CONTEXT)
    with serve(model, tok, draft=draft, max_batch=8, spec_chunk=5) as s:
        single = [_stream(s.url, prompt(i), 16)[0] for i in range(3)]   # batch 1: speculation
        together = [t for t, _ in asyncio.run(_streams(s.url, [prompt(i) for i in range(6)], 16))]
        stats = httpx.get(s.url + "/health").json()["stats"]
    assert stats["spec_chunks"] >= 3
    refs = [alone_chat(model, tok, prompt(i), 16)[0] for i in range(6)]
    assert single == refs[:3]
    assert together == refs


def test_scheduler_rejects_what_cannot_fit(model):
    s = Scheduler(model, max_batch=2)
    with pytest.raises(ValueError, match="exceeds the model's"):
        s.submit([1] * 10, int(model.cos.size(0)))
    with pytest.raises(ValueError, match="temperature"):
        s.submit([1, 2], 4, temperature=-1)
    with pytest.raises(ValueError, match="ids in"):
        s.submit([model.config.vocab_size], 4)
