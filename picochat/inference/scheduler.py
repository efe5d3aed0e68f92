"""Continuous batching: one scheduler thread owns the model; requests join and leave a running batch.

Engine.generate batches prompts that arrive together; a server gets them one by one, at any time,
so here a single thread loops, and each turn of the loop is
1. schedule (under the lock): forget requests cancelled while queued; with a draft model and one
   request in all, speculate `spec_chunk` tokens at a time (a newcomer waits at most one chunk);
   otherwise up to `max_batch` rows run and the next waiting requests join, in order, while the KV
   cache they would make stays within `kv_budget` bytes (the rest wait: memory queues, never overflows);
2. run: prefill the newcomers into the shared KV cache and decode one token for every row (the
   engine's ModelRunner, the decode loop Engine.generate drives too), or speculate;
3. postprocess: hand each token to its request, retire rows that finished (stop token, budget) or
   were cancelled (client gone) at once, so they stop costing compute and memory.
A greedy request gives exactly what Engine.generate gives for its prompt alone, whatever else
shares the batch (tests/test_serve_concurrency.py).
"""
from __future__ import annotations

import collections
import queue
import threading

import torch
from torch.nn.utils.rnn import pad_sequence

from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.engine import ModelRunner
from picochat.inference.sampling import Sampling, check_request
from picochat.inference.speculative import GammaController, generate_speculative_batch

_END = object()


class Request:
    """One generation: its parameters, its state (tokens so far), and the channel its tokens come out
    of (iterate it, from any thread)."""

    def __init__(self, prompt, max_tokens: int, sampling: Sampling, stop_tokens, uniforms: torch.Tensor | None):
        self.prompt, self.max_tokens, self.sampling = list(prompt), int(max_tokens), sampling
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.uniforms = uniforms        # (max_tokens,) pre-drawn from the request's seed, None when greedy
        self.tokens: list[int] = []     # generated so far; the last one is not yet fed to the model
        self.cancelled = False
        self.error: BaseException | None = None
        self._out: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.tokens)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step boundary (thread-safe)."""
        self.cancelled = True

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._out.put(_END)

    def __iter__(self):
        yield from iter(self._out.get, _END)
        if self.error is not None:
            raise self.error


PREFILL_TOKENS = 4096  # most (padded) prompt tokens one prefill forward takes in the server


class Scheduler:
    def __init__(self, model, *, draft=None, max_batch: int = 16, pad_id: int = 0, spec_chunk: int = 16,
                 decode_step: str = "eager", kv_budget: int | None = None):
        """kv_budget: most bytes of KV cache the running batch may hold (None: no limit)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.draft, self.max_batch, self.kv_budget = model, draft, max_batch, kv_budget
        self.pad_id, self.spec_chunk, self.device = pad_id, spec_chunk, next(model.parameters()).device
        # the running batch: requests in the KV cache's row order (runner.rows)
        # newcomers arrive in any number at once: their prefill runs PREFILL_TOKENS at a time, so its
        # activations stay small beside the KV budget (unbounded, a d20 server given 9 x 1,920-token prompts
        # at once peaked at 8.7 GB RSS with 0.6 GB of weights and a 4 GB budget: benchmarks/serve_memory.py)
        self.runner = ModelRunner(model, DecodeStep(model, resolve_mode(decode_step, self.device)), pad_id,
                                  prefill_tokens=PREFILL_TOKENS)
        self.gamma_ctrl = GammaController() if draft is not None else None  # adaptive γ's measurements, across chunks
        self.max_positions = min(int(m.cos.size(0)) for m in (model, draft) if m is not None)
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = dict(decode_steps=0, row_steps=0, prefills=0, joined=0, finished=0, cancelled=0, spec_chunks=0,
                          max_batch_seen=0, kv_wait_steps=0, kv_peak_bytes=0)  # row_steps / decode_steps = mean decode batch

    @property
    def active_slots(self) -> int:
        """Rows in the running decode batch (each holds KV cache)."""
        return len(self.runner.rows)

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

    def submit(self, prompt: list[int], max_tokens: int, sampling: Sampling | None = None, stop_tokens=(),
               **knobs) -> Request:
        """Queue a generation (sampling: a Sampling or its keywords, Sampling.of); raises ValueError
        for bad parameters (nothing is queued then)."""
        sampling = Sampling.of(sampling, **knobs)
        check_request([prompt], max_tokens, self.model.config.vocab_size, self.max_positions)
        need = 0 if self.kv_budget is None else self.kv_bytes_alone(len(prompt), max_tokens)
        if need > (self.kv_budget or 0):
            raise ValueError(f"this request needs {need:,} bytes of KV cache ({len(prompt)} prompt + {max_tokens} "
                             f"new tokens), more than the whole budget of {self.kv_budget:,}")
        u = sampling.uniforms(1, int(max_tokens), self.device) if max_tokens else None
        req = Request(prompt, max_tokens, sampling, stop_tokens, None if u is None else u[0])
        if req.max_tokens == 0:
            req._finish()
            return req
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            self._pending.append(req)
            self._cv.notify()
        return req

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._pending and not self.runner.rows:
                    self._cv.wait()
                if self._stop:
                    break
                self._pending = collections.deque(self._live(self._pending))  # some left before their turn
                # one request in all and a draft: speculate (it prefills for itself); else batch them
                speculate = self.draft is not None and len(self.runner.rows) + len(self._pending) <= 1
                joining = []
                while self._pending and (speculate or (len(joining) < self.max_batch - len(self.runner.rows)
                                                       and self._fits(joining + [self._pending[0]]))):
                    joining.append(self._pending.popleft())
                if self._pending and not speculate and len(joining) < self.max_batch - len(self.runner.rows):
                    self.stats["kv_wait_steps"] += 1  # room in the batch, not in memory: the next one waits
            involved = self.runner.rows + joining
            try:
                with torch.inference_mode():
                    if speculate:
                        self._speculate(involved)
                    else:
                        self._step(joining)
            except Exception as e:  # a failed step fails its requests, never the server
                for req in involved + self.runner.rows:
                    req._finish(e)
                self.runner.reset()
        with self._cv:
            for req in self.runner.rows + list(self._pending):
                req._finish(RuntimeError("the server is shutting down"))
            self.runner.reset()
            self._pending = collections.deque()

    def _step(self, joining: list[Request]) -> None:
        """Drop what was cancelled, prefill the newcomers into the batch, decode one token for every row."""
        self._drop()
        joining = self._live(joining)
        if joining:
            n0, fresh = len(self.runner.rows), [not r.tokens for r in joining]
            # a request back from speculation holds its next token already: it is fed all but that one
            tok, _ = self.runner.add(
                joining, [r.prompt + r.tokens[:-1] for r in joining], [r.max_tokens for r in joining],
                [(r.sampling.temperature, r.sampling.top_k, r.sampling.top_p) for r in joining],
                pad_sequence([r.uniforms if r.uniforms is not None else torch.zeros(1, device=self.device)
                              for r in joining], batch_first=True), [r.stop_tokens for r in joining],
                counts=[max(len(r.tokens) - 1, 0) for r in joining],
                given=[r.tokens[-1] if r.tokens else None for r in joining])
            self.stats["prefills"] += 1
            self.stats["joined"] += len(joining)
            self._hand_out(tok.tolist(), n0, fresh)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self.runner.rows))
        if self.runner.rows:
            tok, _ = self.runner.step()
            self.stats["decode_steps"] += 1
            self.stats["row_steps"] += len(tok)
            self._hand_out(tok.tolist())

    def _hand_out(self, toks: list[int], first: int = 0, fresh: list[bool] | None = None) -> None:
        """Hand rows first.. their new tokens (not to a request whose next token is known already:
        it came out of speculation) and drop the rows that finished (the runner checked stop tokens
        and budgets)."""
        done = self.runner.done.tolist()
        for i, (r, t) in enumerate(zip(self.runner.rows[first:], toks)):
            if fresh is None or fresh[i]:
                self._emit(r, t)
        self._drop([i for i in range(first, len(self.runner.rows)) if done[i]])

    def _speculate(self, rows: list[Request]) -> None:
        """Advance the row by up to spec_chunk tokens with the draft; if it goes on, it waits at the
        front of the queue and either speculates again or, when others have arrived, re-prefills
        prompt + tokens to rejoin a plain batch. Speculation has its own caches (the shared batch is
        dropped); one seed drives the chunk's generator: the first row's, moved on by its tokens."""
        self.runner.reset()
        rows = self._live(rows)
        if not rows:
            return
        first = rows[0]
        seed = None if first.sampling.seed is None else int(first.sampling.seed) + len(first.tokens)
        out, _ = generate_speculative_batch(
            self.model, self.draft, [r.prompt + r.tokens for r in rows], min(self.spec_chunk, *(r.remaining for r in rows)),
            Sampling.rows([r.sampling for r in rows], seed=seed), stop_tokens=set().union(*(r.stop_tokens for r in rows)),
            pad_id=self.pad_id, controller=self.gamma_ctrl)
        self.stats["spec_chunks"] += 1
        # any() stops at the finishing token
        finished = {i for i, (req, toks) in enumerate(zip(rows, out)) if any(self._emit(req, t) for t in toks)}
        back = [rows[i] for i in self._sift(rows, finished)]
        with self._cv:
            self._pending.extendleft(reversed(back))

    def kv_bytes_alone(self, prompt_len: int, max_tokens: int) -> int:
        """KV cache bytes one request needs when it runs alone (prefill and decode cache)."""
        return (2 * prompt_len + max_tokens) * self.model.kv_bytes_per_token()

    def kv_bytes_with(self, rows) -> int:
        """KV cache bytes at the peak of adding `rows` to the batch: the merged cache (every row at the
        longest length any row can reach) plus the newcomers' prefill cache, alive while they merge."""
        everyone = self.runner.rows + list(rows)
        if not everyone:
            return 0
        ctx = max((len(r.prompt) + len(r.tokens) for r in rows), default=0)
        end = max(self.runner.cache.pos if self.runner.rows else 0, ctx) + max(r.remaining for r in everyone)
        return (len(everyone) * end + len(rows) * ctx) * self.model.kv_bytes_per_token()

    def _fits(self, joining: list[Request]) -> bool:
        """Whether `joining` can join the running batch within the KV budget. A request that would
        run alone always goes (submit refused any that cannot fit alone)."""
        if self.kv_budget is None:
            return True
        need = self.kv_bytes_with(joining)
        ok = need <= self.kv_budget or not (self.runner.rows or joining[:-1])
        if ok:
            self.stats["kv_peak_bytes"] = max(self.stats["kv_peak_bytes"], need)
        return ok

    def _emit(self, req: Request, tok: int) -> bool:
        """Hand one token to its request; True when the request is finished (speculation's check:
        a decode step's is the runner's)."""
        req.tokens.append(tok)
        req._out.put(tok)
        return tok in req.stop_tokens or req.remaining <= 0

    def _sift(self, reqs, finished=()) -> list[int]:
        """Finish the requests at indices `finished` and the cancelled ones; the indices of the rest."""
        keep = []
        for i, req in enumerate(reqs):
            if i in finished or req.cancelled:
                self.stats["finished" if i in finished else "cancelled"] += 1
                req._finish()
            else:
                keep.append(i)
        return keep

    def _live(self, reqs) -> list[Request]:
        reqs = list(reqs)
        return [reqs[i] for i in self._sift(reqs)]

    def _drop(self, finished: list[int] = ()) -> None:
        """Remove finished rows and cancelled ones from the batch and the cache, at once."""
        self.runner.keep(self._sift(self.runner.rows, set(finished)))
