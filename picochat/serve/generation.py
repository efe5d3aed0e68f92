"""The bridge between async HTTP handlers and the scheduler: n choices, stop strings, cancellation.

Each choice runs a synchronous text generator (`chat_turn`: inference/chat.py's stream_chat, its
calculator calls reported as tool runs, not as text; `text_turn` for plain completions) in its own
thread over a ScheduledEngine, so the model only ever runs on the scheduler thread. Text pieces come
back to the event loop through an asyncio queue. Stop strings are matched on the text (a possible
prefix of a stop string is held back until decided), and a match cancels the generation at once.
`Generation.close()` (client gone) frees every choice's batch slot at the scheduler's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field

from picochat.inference.chat import Reply, stream_chat, tool_turns
from picochat.inference.engine import default_stop_tokens
from picochat.inference.sampling import Sampling
from picochat.inference.scheduler import Request, Scheduler
from picochat.tokenizer import SPECIAL_TOKENS


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


def stream_text(engine, tokenizer, ids: list[int], max_tokens: int, sampling: Sampling, reply: Reply) -> Iterator[str]:
    """Plain text continuation (the /v1/completions counterpart of stream_chat): yield decoded
    pieces, special tokens counted but never shown; fill `reply` (tokens, finish_reason). The
    loop is inference/chat.py's tool_turns without tools, stopped at <|assistant_end|> or <|bos|>."""
    return tool_turns(engine, tokenizer, [ids], max_tokens, sampling, [reply], tools=False, stream=True,
                      stops=default_stop_tokens(tokenizer))


def strip_special(text: str) -> str:
    """Remove special-token strings (a special token decodes whole, so never split across pieces)."""
    for name in SPECIAL_TOKENS:
        text = text.replace(name, "")
    return text


class ScheduledEngine:
    """The `generate_stream` call shape of Engine (one prompt at a time), served by the Scheduler, so
    inference/chat.py's stream_chat runs unchanged on top of continuous batching. One per choice.
    `cancel()` (any thread) ends the current and any later generation of this object."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.cancelled = False
        self._current: Request | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._current is not None:
            self._current.cancel()

    def generate_stream(self, prompts, max_new_tokens, sampling: Sampling | None = None, *, stop_tokens):
        if len(prompts) != 1:
            raise ValueError("ScheduledEngine generates one prompt at a time")
        if self.cancelled:
            return
        req = self.scheduler.submit(prompts[0], max_new_tokens, sampling, stop_tokens)
        self._current = req
        if self.cancelled:  # cancel() ran between the check above and _current being set
            req.cancel()
        try:
            for t in req:
                yield [t]
        finally:
            req.cancel()  # the consumer stopped early (stop token, stop string, client gone)


# (engine, reply) -> iterator of text pieces and tool runs ({"type": "calculator", "input", "output"})
PieceFn = Callable[[ScheduledEngine, Reply], Iterator["str | dict"]]


def chat_turn(tokenizer, messages: list[dict], max_tokens: int, sampling: Sampling) -> PieceFn:
    """inference/chat.py's stream_chat for the API: the text pieces of the reply, without
    special-token strings, and each calculator call (from its on_tool) as a tool run instead of
    the '[calculator: expr = result] ' text stream_chat shows a terminal user."""
    def run(engine, reply: Reply):
        calls = []  # the call on_tool reported just before its '[calculator: ...]' piece
        for piece in stream_chat(engine, tokenizer, messages, max_tokens, sampling, reply=reply,
                                 on_tool=lambda code, result: calls.append((code, result))):
            if calls:
                expr, output = calls.pop()
                yield {"type": "calculator", "input": strip_special(expr), "output": strip_special(output)}
            elif strip_special(piece):
                yield strip_special(piece)
    return run


def text_turn(tokenizer, ids: list[int], max_tokens: int, sampling: Sampling) -> PieceFn:
    return lambda engine, reply: stream_text(engine, tokenizer, ids, max_tokens, sampling, reply)


@dataclass
class ChoiceResult:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    tool_runs: list[dict] = field(default_factory=list)


class Generation:
    """n choices running concurrently, each with its own stop strings; iterate `events()` on the
    event loop. Events: ("delta", index, text), ("tool", index, tool run), ("end", index,
    finish_reason, completion_tokens), ("error", index, exception). `on_close` runs exactly once,
    when every choice has ended or the generation was cancelled (admission is released there)."""

    def __init__(self, scheduler: Scheduler, pieces: list[PieceFn], stops: list[list[str] | None],
                 on_close: Callable[[], None] | None = None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engines = [ScheduledEngine(scheduler) for _ in pieces]
        self.results = [ChoiceResult() for _ in pieces]
        self._pending = len(pieces)
        self._on_close, self._closed = on_close, False
        self._lock = threading.Lock()
        for i, (fn, eng, stop) in enumerate(zip(pieces, self.engines, stops)):
            threading.Thread(target=self._run, args=(i, fn, eng, stop), daemon=True,
                             name=f"picochat-choice-{i}").start()

    def _push(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _run(self, index: int, fn: PieceFn, engine: ScheduledEngine, stops) -> None:
        reply, matcher = Reply(), StopMatcher(stops)
        gen = fn(engine, reply)
        try:
            for piece in gen:
                if isinstance(piece, dict):  # a tool run, not content: stop strings apply to the text only
                    self._push(("tool", index, piece))
                    continue
                text, hit = matcher.feed(piece)
                if text:
                    self._push(("delta", index, text))
                if hit:
                    engine.cancel()
                    finish = "stop"
                    break
            else:  # no stop string: the text held back as a possible start of one is text after all
                if matcher.buf:
                    self._push(("delta", index, matcher.buf))
                finish = reply.finish_reason
            self._push(("end", index, finish, reply.tokens))
        except Exception as e:  # reported to the client; the server goes on
            self._push(("error", index, e))
        finally:
            gen.close()

    def _gone(self, task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a broken connection counts as gone too
            self.queue.put_nowait(("gone",))

    async def events(self, gone: Callable[[], Awaitable] | None = None):
        """Every event until each choice has ended, then close(). `gone()`, if given, returns when
        the client disconnects: it is watched all along, so a client that hangs up while tokens
        flow is cancelled at once (its slots freed at the scheduler's next step) and
        ConnectionAbortedError is raised."""
        watcher = None if gone is None else asyncio.ensure_future(gone())
        if watcher is not None:
            watcher.add_done_callback(self._gone)
        try:
            while self._pending:
                ev = await self.queue.get()
                if ev[0] == "gone":
                    raise ConnectionAbortedError("client disconnected")
                r = self.results[ev[1]]
                if ev[0] == "delta":
                    r.text += ev[2]
                elif ev[0] == "tool":
                    r.tool_runs.append(ev[2])
                else:
                    if ev[0] == "end":
                        r.finish_reason, r.completion_tokens = ev[2], ev[3]
                    self._pending -= 1
                yield ev
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()

    async def collect(self, gone: Callable[[], Awaitable]) -> list[ChoiceResult]:
        """Wait for every choice (see events()); the first error event is re-raised."""
        async with aclosing(self.events(gone)) as events:
            async for ev in events:
                if ev[0] == "error":
                    raise ev[2]
        return self.results

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
