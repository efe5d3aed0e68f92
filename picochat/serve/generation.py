"""The bridge between async HTTP handlers and the scheduler: n choices, stop strings, cancellation.

Each choice runs a synchronous text generator (inference/chat.py's stream_chat for chat, with its
calculator tool calls; `stream_text` below for plain completions) in its own thread, over a
ScheduledEngine, so the model itself only ever runs on the scheduler thread. Text pieces come back
to the event loop through an asyncio queue. Stop strings are matched on the text (a possible
prefix of a stop string is held back until it is decided), and a match cancels the generation
at once. `Generation.cancel()` (client gone) ends every choice and frees its batch slot at the
scheduler's next step boundary.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from picochat.inference.chat import Reply
from picochat.inference.scheduler import ScheduledEngine, Scheduler


class StopMatcher:
    """Cut a text stream at the first stop string; hold back text that may start one."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was hit)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def stream_text(engine, tokenizer, ids: list[int], max_tokens: int, temperature, top_k, top_p, seed,
                reply: Reply) -> Iterator[str]:
    """Plain text continuation (the /v1/completions counterpart of stream_chat): yield decoded
    pieces, waiting for the rest of a multi-byte character; fill `reply` (tokens, finish_reason)."""
    stops = engine.default_stop_tokens()
    out: list[int] = []
    printed = ""
    reply.finish_reason = "length"
    for step in engine.generate_stream([ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=seed, stop_tokens=stops):
        t = step[0]
        if t is None:
            break
        reply.tokens += 1
        if t in stops:
            reply.finish_reason = "stop"
            break
        out.append(t)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text
    rest = tokenizer.decode(out)[len(printed):]
    if rest:
        yield rest


# (engine, reply) -> iterator of text pieces
PieceFn = Callable[[ScheduledEngine, Reply], Iterator[str]]


@dataclass
class ChoiceResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Generation:
    """n choices running concurrently; iterate `events()` on the event loop.

    Events: ("delta", index, text), ("end", index, finish_reason, completion_tokens),
    ("error", index, exception). `on_close` runs exactly once, when every choice has ended or the
    generation was cancelled (the server's admission count is released there)."""

    def __init__(self, scheduler: Scheduler, tokenizer, pieces: list[PieceFn], stops: list[str] | None,
                 on_close: Callable[[], None] | None = None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engines = [ScheduledEngine(scheduler, tokenizer) for _ in pieces]
        self.results = [ChoiceResult() for _ in pieces]
        self._pending = len(pieces)
        self._on_close, self._closed = on_close, False
        self._lock = threading.Lock()
        for i, (fn, eng) in enumerate(zip(pieces, self.engines)):
            threading.Thread(target=self._run, args=(i, fn, eng, stops), daemon=True, name=f"picochat-choice-{i}").start()

    def _push(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _run(self, index: int, fn: PieceFn, engine: ScheduledEngine, stops) -> None:
        reply, matcher = Reply(), StopMatcher(stops)
        gen = fn(engine, reply)
        try:
            finish = None
            for piece in gen:
                text, hit = matcher.feed(piece)
                if text:
                    self._push(("delta", index, text))
                if hit:
                    engine.cancel()
                    finish = "stop"
                    break
            if finish is None:
                tail = matcher.flush()
                if tail:
                    self._push(("delta", index, tail))
                finish = reply.finish_reason
            self._push(("end", index, finish, reply.tokens))
        except Exception as e:  # reported to the client; the server goes on
            self._push(("error", index, e))
        finally:
            gen.close()

    def _take(self, ev) -> None:
        if ev[0] == "delta":
            self.results[ev[1]].text += ev[2]
            return
        if ev[0] == "end":
            r = self.results[ev[1]]
            r.finish_reason, r.completion_tokens = ev[2], ev[3]
        self._pending -= 1

    async def events(self):
        try:
            while self._pending:
                ev = await self.queue.get()
                self._take(ev)
                yield ev
        finally:
            self.close()

    async def collect(self, is_disconnected: Callable, poll_s: float = 0.25) -> list[ChoiceResult]:
        """Wait for every choice; if the client goes away meanwhile, cancel and raise
        ConnectionAbortedError. The first error event is re-raised."""
        try:
            while self._pending:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), poll_s)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        raise ConnectionAbortedError("client disconnected") from None
                    continue
                self._take(ev)
                if ev[0] == "error":
                    raise ev[2]
            return self.results
        finally:
            self.close()

    def close(self) -> None:
        """Cancel whatever still runs (no-op for finished choices); release admission once."""
        for eng in self.engines:
            eng.cancel()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._on_close is not None:
            self._on_close()
