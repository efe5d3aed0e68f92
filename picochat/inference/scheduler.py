"""Continuous batching: one scheduler thread owns the model; requests join and leave a running batch.

Engine.generate batches prompts that arrive together. A server gets them one by one, at any time,
so here a single thread runs a loop of decode steps over one shared KV cache, and at every step
boundary
- new requests are prefilled together (left-padded, like the engine) and merged into the running
  cache (`KVCache.merge` right-aligns both batches and reallocates just enough room for the
  longest remaining budget);
- rows that finished (stop token, budget) or were cancelled (client gone) are dropped at once
  (`KVCache.select_rows`), so they stop costing compute and memory.
Each row keeps its own sampling parameters (SamplingParams over the current rows, rebuilt when the
batch changes) and its own pre-drawn uniforms (draw_uniforms with the row's seed), so a row's
tokens never depend on what else shares the batch: a greedy request gives exactly what
Engine.generate gives for its prompt alone (tests/test_serve_concurrency.py).

With a draft model and a small batch (at most `spec_max_batch` rows and nobody waiting) the loop
decodes by speculation instead (speculative.generate_speculative_batch, exact: same output
distribution as the target), `spec_chunk` tokens at a time so that newcomers wait at most one chunk;
the shared GammaController keeps adaptive γ's measurements across chunks.

`ScheduledEngine` adapts the scheduler to the `generate_stream` call shape that
inference/chat.py's stream_chat uses, so the server reuses the chat turn logic (calculator tool
calls included) unchanged.
"""
from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field

import torch

from picochat.inference.engine import Engine, prefill
from picochat.inference.cpu import prepare_cpu_inference
from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.sampling import SamplingParams, draw_uniforms, sample_next, validate_sampling
from picochat.inference.speculative import GammaController, generate_speculative_batch
from picochat.model.kv_cache import KVCache

_END = object()


class Request:
    """One generation: its parameters, and the channel its tokens come out of (iterate it)."""

    def __init__(self, prompt, max_tokens, temperature, top_k, top_p, seed, stop_tokens):
        self.prompt, self.max_tokens = list(prompt), int(max_tokens)
        self.temperature, self.top_k, self.top_p, self.seed = temperature, top_k, top_p, seed
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.cancelled = False
        self.error: BaseException | None = None
        self._out: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step boundary (thread-safe)."""
        self.cancelled = True

    def _put(self, item) -> None:
        self._out.put(item)

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._out.put(_END)

    def __iter__(self):
        while True:
            item = self._out.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item


@dataclass
class _Row:
    req: Request
    tokens: list[int] = field(default_factory=list)   # generated so far; the last one is not yet fed
    uniforms: torch.Tensor | None = None               # (max_tokens,) pre-drawn, None when greedy

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - len(self.tokens)


class Scheduler:
    def __init__(self, model, *, draft=None, max_batch: int = 16, pad_id: int = 0, spec_max_batch: int = 1,
                 spec_chunk: int = 16, gamma: int = 4, decode_step: str = "eager"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.draft = model, draft
        self.device = next(model.parameters()).device
        # decode_step.py; the batch changes as requests come and go, so a compiled step is compiled
        # with dynamic shapes (one graph for every batch size; CUDA graphs are recorded per size)
        self.decode = DecodeStep(model, resolve_mode(decode_step, self.device), dynamic=None)
        if self.device.type == "cpu":  # oneDNN where it pays (not inside a compiled step), allocator (cpu.py)
            for m in (model, draft):
                if m is not None:
                    prepare_cpu_inference(m, enable=not (m is model and self.decode.static))
        self.max_batch, self.pad_id = max_batch, pad_id
        self.spec_max_batch, self.spec_chunk = spec_max_batch, spec_chunk
        self.gamma_ctrl = GammaController(gamma) if draft is not None else None
        self.max_positions = int(model.cos.size(0)) if draft is None else min(int(model.cos.size(0)), int(draft.cos.size(0)))
        self._pending: collections.deque[_Row] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._params: SamplingParams | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = dict(decode_steps=0, row_steps=0, prefills=0, joined=0, finished=0, cancelled=0, spec_chunks=0,
                          max_batch_seen=0)  # row_steps / decode_steps = mean decode batch

    # ------------------------------------------------------------------ public API (any thread)

    @property
    def active_slots(self) -> int:
        """Rows in the running decode batch (each holds KV cache)."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="picochat-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, prompt: list[int], max_tokens: int, temperature=1.0, top_k=None, top_p=None, seed=None,
               stop_tokens=()) -> Request:
        """Queue a generation; raises ValueError for bad parameters (nothing is queued then)."""
        validate_sampling(temperature, top_k, top_p)
        V = self.model.config.vocab_size
        if not prompt or any(not 0 <= int(t) < V for t in prompt):
            raise ValueError(f"a prompt needs at least one token, all ids in [0, {V})")
        if isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.max_positions:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the model's "
                             f"{self.max_positions} positions")
        req = Request(prompt, max_tokens, temperature, top_k, top_p, seed, stop_tokens)
        if req.max_tokens == 0:
            req._finish()
            return req
        greedy = float(temperature) == 0
        row = _Row(req, uniforms=None if greedy else draw_uniforms(1, req.max_tokens, seed, self.device)[0])
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(row)
            self._cv.notify()
        return req

    # ------------------------------------------------------------------ the loop (scheduler thread)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._pending and not self._rows:
                    self._cv.wait()
                if self._stop:
                    break
                for row in [r for r in self._pending if r.req.cancelled]:  # gone before their turn
                    self._pending.remove(row)
                    self._finish_cancelled(row)
                # few rows in all and a draft: speculate (it prefills for itself); else batch them
                speculate = self.draft is not None and len(self._rows) + len(self._pending) <= self.spec_max_batch
                joining = []
                while self._pending and (speculate or len(joining) < self.max_batch - len(self._rows)):
                    joining.append(self._pending.popleft())
            involved = self._rows + joining
            try:
                with torch.inference_mode():
                    if speculate:
                        self._speculate(self._rows + joining)
                        continue
                    self._drop()
                    if joining:
                        self._admit(joining)
                    if self._rows:
                        self._decode_step()
            except Exception as e:  # a failed step fails its requests, never the server
                for row in involved + self._rows:
                    row.req._finish(e)
                self._rows, self._cache, self._params = [], None, None
        with self._cv:
            for row in self._rows + list(self._pending):
                row.req._finish(RuntimeError("the server is shutting down"))
            self._rows, self._pending = [], collections.deque()

    def _finish_cancelled(self, row: _Row) -> None:
        self.stats["cancelled"] += 1
        row.req._finish()

    def _sampling(self, rows: list[_Row]) -> SamplingParams:
        return SamplingParams.make(len(rows), [r.req.temperature for r in rows], [r.req.top_k for r in rows],
                                   [r.req.top_p for r in rows], self.device, self.model.config.vocab_size)

    def _emit(self, row: _Row, tok: int) -> bool:
        """Hand one token to its request; True when the row is finished."""
        row.tokens.append(tok)
        row.req._put(tok)
        return tok in row.req.stop_tokens or row.remaining <= 0

    def _uniforms(self, rows: list[_Row], params: SamplingParams) -> torch.Tensor | None:
        """This step's uniform per row: the one for the row's next token (index = tokens so far)."""
        if params.all_greedy:
            return None
        zero = torch.zeros((), device=self.device)
        return torch.stack([r.uniforms[min(len(r.tokens), r.req.max_tokens - 1)] if r.uniforms is not None else zero
                            for r in rows])

    def _admit(self, rows: list[_Row]) -> None:
        """Prefill the newcomers together, sample their first tokens, merge them into the batch."""
        live = []
        for r in rows:
            if r.req.cancelled:
                self._finish_cancelled(r)
            else:
                live.append(r)
        rows = live
        if not rows:
            return
        # a row coming back from speculation has tokens already: feed all but its pending last one
        contexts = [r.req.prompt + r.tokens[:-1] for r in rows]
        logits, cache = prefill(self.model, contexts, max(len(c) for c in contexts), self.pad_id, self.device)
        params = self._sampling(rows)
        first = sample_next(logits, params=params, uniforms=self._uniforms(rows, params)).tolist()
        keep = []
        for i, (row, t) in enumerate(zip(rows, first)):
            if row.tokens or not self._emit(row, t):   # resumed rows already hold their next token
                keep.append(i)
            else:
                self._retire(row)
        self.stats["prefills"] += 1
        self.stats["joined"] += len(rows)
        if not keep:
            return
        if len(keep) < len(rows):
            cache.select_rows(keep)
            rows = [rows[i] for i in keep]
        if self._cache is None or not self._rows:
            self._cache, self._rows = KVCache(0, 0, device=self.device), []
        everyone = self._rows + rows
        self._cache.merge(cache, max(self._cache.pos, cache.pos) + max(r.remaining for r in everyone))
        self._rows = everyone
        self._params = self._sampling(everyone)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(everyone))

    def _retire(self, row: _Row) -> None:
        self.stats["finished"] += 1
        row.req._finish()

    def _drop(self, finished: list[int] = ()) -> None:
        """Remove finished rows and cancelled ones from the batch and the cache, at once."""
        finished, keep = set(finished), []
        for i, row in enumerate(self._rows):
            if i in finished:
                self._retire(row)
            elif row.req.cancelled:
                self._finish_cancelled(row)
            else:
                keep.append(i)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._params = None, None
            return
        self._cache.select_rows(keep)
        self._params = self._sampling(self._rows)

    def _decode_step(self) -> None:
        rows = self._rows
        x = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        logits = self.decode(x, self._cache)
        toks = sample_next(logits, params=self._params, uniforms=self._uniforms(rows, self._params)).tolist()
        self.stats["decode_steps"] += 1
        self.stats["row_steps"] += len(rows)
        finished = [i for i, (row, t) in enumerate(zip(rows, toks)) if self._emit(row, t)]
        self._drop(finished)

    def _speculate(self, rows: list[_Row]) -> None:
        """Advance the (few) rows by up to spec_chunk tokens with the draft. Speculation keeps its
        own caches, so the shared one is dropped; rows that go on wait at the front of the queue
        and either speculate again or, when others have arrived, re-prefill prompt + tokens to
        rejoin a plain batch."""
        self._rows, self._cache, self._params = [], None, None
        live = []
        for row in rows:
            if row.req.cancelled:
                self._finish_cancelled(row)
            else:
                live.append(row)
        if not live:
            return
        seed = live[0].req.seed
        out, _ = generate_speculative_batch(
            self.model, self.draft, [r.req.prompt + r.tokens for r in live], min(self.spec_chunk, *(r.remaining for r in live)),
            temperature=[r.req.temperature for r in live], top_k=[r.req.top_k for r in live],
            top_p=[r.req.top_p for r in live], seed=None if seed is None else int(seed) + len(live[0].tokens),
            stop_tokens=set().union(*(r.req.stop_tokens for r in live)), pad_id=self.pad_id, controller=self.gamma_ctrl)
        self.stats["spec_chunks"] += 1
        back = []
        for row, toks in zip(live, out):
            if any(self._emit(row, t) for t in toks):  # any() stops at the finishing token
                self._retire(row)
            else:
                back.append(row)
        with self._cv:
            self._pending.extendleft(reversed(back))


class ScheduledEngine:
    """The `generate_stream` call shape of Engine (one prompt at a time), served by a Scheduler,
    so inference/chat.py's stream_chat runs unchanged on top of continuous batching.
    `cancel()` (any thread) ends the current and any later generation of this object."""

    def __init__(self, scheduler: Scheduler, tokenizer=None):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.cancelled = False
        self._current: Request | None = None
        self._stops = Engine(scheduler.model, tokenizer).default_stop_tokens()

    def default_stop_tokens(self) -> set[int]:
        """The same defaults as Engine: <|assistant_end|> and <|bos|>."""
        return set(self._stops)

    def cancel(self) -> None:
        self.cancelled = True
        if self._current is not None:
            self._current.cancel()

    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                        stop_tokens=None, stop_sequences=None):
        if len(prompts) != 1 or stop_sequences:
            raise ValueError("ScheduledEngine generates one prompt at a time, without stop_sequences")
        if self.cancelled:
            return
        req = self.scheduler.submit(prompts[0], max_new_tokens, temperature, top_k, top_p, seed,
                                    self.default_stop_tokens() if stop_tokens is None else stop_tokens)
        self._current = req
        if self.cancelled:  # cancel() ran between the check above and _current being set
            req.cancel()
        try:
            for t in req:
                yield [t]
        finally:
            req.cancel()  # the consumer stopped early (stop token, stop string, client gone)
