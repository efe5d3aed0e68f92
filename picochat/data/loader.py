"""Pretraining stream: parquet documents -> BOS-prefixed tokens -> (inputs, targets) batches.

Determinism and resumability are the point of this module:
- Documents are dealt round-robin to `n_slots = world_size * grad_accum` independent streams.
  Rank r's micro-step a reads slot r * grad_accum + a, so one process with accumulation 2 sees
  exactly the data that two torchrun ranks see (tested).
- Each slot's position is (virtual doc index, tokens of it already consumed): the whole resume
  state. On --resume the slot re-tokenizes from that document and skips the offset, so the stream
  continues exactly where it stopped without saving any token buffers. Virtual doc index v maps
  to document v % n_docs, so the stream loops over epochs forever.

With `workers > 0` (workers.py) the stream is the same token for token, and state_dict() describes
the batches the training loop has *consumed*, not the ones waiting in the prefetch queue.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch

from picochat.data.corpus import count_documents, iter_documents
from picochat.data.workers import OrderedStreams, Prefetcher, WorkerPool, in_worker

DEFAULT_PREFETCH = 4  # ready batches queued per process: enough to hide a slow chunk, small in memory


class TextDocs:
    """Tokenized documents of a prepared corpus split: docs(indices) -> token lists (BOS first)."""

    def __init__(self, data_dir: Path, split: str, tokenizer):
        self.data_dir, self.split, self.tok = Path(data_dir), split, tokenizer
        self._reader: Iterator[str] | None = None
        self._next = -1  # doc index the reader yields next

    def _read(self, doc: int) -> str:
        # sequential reads are the common case; restart the reader when we jump back or wrap
        if self._reader is None or doc < self._next:
            self._reader, self._next = iter_documents(self.data_dir, self.split, start=doc), doc
        text = next(islice(self._reader, doc - self._next, None))
        self._next = doc + 1
        return text

    def __call__(self, indices: list[int]) -> list[list[int]]:
        # in a worker process the parallelism is the workers themselves: one tokenizer thread each
        return self.tok.encode([self._read(i) for i in indices], prepend=self.tok.bos_token_id,
                               num_threads=1 if in_worker() else 8)


def _tokenize_job(make_docs):
    """Worker-side function: (slot, doc indices) -> (flat int32 tokens, per-doc lengths).

    Each worker keeps one document reader per slot (created on first use), so reads stay sequential.
    Flat numpy arrays pickle as one memcpy, unlike lists of Python ints."""
    readers: dict = {}

    def run(request):
        slot, indices = request
        if slot not in readers:
            readers[slot] = make_docs()
        ids = readers[slot](indices)
        lens = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int32, count=int(lens.sum()))
        return flat, lens
    return run


class _SlotStream:
    """One deterministic token stream over documents slot, slot + n, slot + 2n, ... (mod n_docs).

    `fetch(doc indices) -> token arrays` is set by the loader: tokenize here, or read from the workers."""

    def __init__(self, n_docs: int, slot: int, n_slots: int, v: int | None, offset: int, tokenizer_batch: int):
        self.n_docs, self.slot, self.n_slots, self.tokenizer_batch = n_docs, slot, n_slots, tokenizer_batch
        self.next_v = slot if v is None else v        # next document to tokenize
        self.chunks: deque[list] = deque()            # [v, tokens (np.int64), consumed]
        self.skip = offset                            # tokens of the first doc already consumed
        self.buffered = 0
        self.fetch = None
        self._requests = self.requests()

    def requests(self):
        """The (slot, doc indices) chunks _fill consumes, in order (workers are sent the same ones)."""
        for v0 in count(self.next_v, self.tokenizer_batch * self.n_slots):
            yield self.slot, [(v0 + i * self.n_slots) % self.n_docs for i in range(self.tokenizer_batch)]

    def _fill(self) -> None:
        _, indices = next(self._requests)
        for i, arr in enumerate(self.fetch(indices)):
            start, self.skip = min(self.skip, len(arr)), 0  # resuming mid-document
            self.chunks.append([self.next_v + i * self.n_slots, arr, start])
            self.buffered += len(arr) - start
        self.next_v += self.tokenizer_batch * self.n_slots

    def take(self, n: int) -> np.ndarray:
        """Return the next n tokens; the final one stays for the next call (consecutive batches
        overlap by one token, so no target is ever lost)."""
        while self.buffered < n:
            self._fill()
        out, need = [], n
        for v, arr, start in self.chunks:
            out.append(arr[start:start + need])
            need -= len(out[-1])
            if need == 0:
                break
        consume = n - 1
        self.buffered -= consume
        while consume:
            chunk = self.chunks[0]
            k = min(consume, len(chunk[1]) - chunk[2])
            chunk[2] += k
            consume -= k
            if chunk[2] == len(chunk[1]):
                self.chunks.popleft()
        return np.concatenate(out).astype(np.int64, copy=False)

    def state(self) -> dict:
        v, _, start = self.chunks[0] if self.chunks else (self.next_v, None, 0)
        return {"v": int(v), "offset": int(start)}


class BackgroundLoader:
    """What the pretraining and chat loaders share: the slot layout and its resume check, the
    micro-step order, and with workers the state to save, which is the one after the last batch
    handed out (`_consumed`), not the prefetched ones; closing (also on garbage collection) stops
    the prefetch thread and the worker pool. Subclasses call _layout() and define _positions()."""
    pool: WorkerPool | None = None
    prefetcher: Prefetcher | None = None
    _consumed: dict | None = None

    def _layout(self, split: str, rank: int, world_size: int, grad_accum: int, state: dict | None, device) -> dict:
        """Set this rank's slots and the micro-step from `state`; return its per-slot positions."""
        self.split, self.grad_accum, self.device = split, grad_accum, torch.device(device)
        self.n_slots = world_size * grad_accum
        self.slots = range(rank * grad_accum, (rank + 1) * grad_accum)
        state = state or {}
        if state and (state.get("n_slots") != self.n_slots or state.get("split") != split):
            raise ValueError(f"loader state was saved with {state.get('n_slots')} slots on split {state.get('split')!r}; "
                             f"now {self.n_slots} slots on {split!r} (world_size x grad_accum must match to resume)")
        self.micro = state.get("micro", 0)
        return state.get("slots", {})

    def _next_micro(self) -> int:
        """Which of this rank's slots (0 .. grad_accum - 1) the next micro-step reads."""
        a = self.micro % self.grad_accum
        self.micro = (self.micro + 1) % self.grad_accum
        return a

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        # pinned (in the prefetch thread when there is one, off the training thread): the copy is then async
        return t.pin_memory() if self.device.type == "cuda" else t

    def _live_state(self) -> dict:
        return {"split": self.split, "n_slots": self.n_slots, "micro": self.micro, "slots": self._positions()}

    def state_dict(self) -> dict:
        """Positions after the last batch handed out (merge across ranks with merge_states under DDP)."""
        return self._live_state() if self._consumed is None else self._consumed

    def close(self) -> None:
        """Stop the prefetch thread and the worker processes (idempotent)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.pool is not None:
            self.pool.close()

    def __iter__(self):
        return self

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class PackedLoader(BackgroundLoader):
    """Yields (x, y) int64 tensors of shape (B, T) for this rank's micro-steps, in order.

    `make_docs()` returns a `docs(indices) -> token lists` callable (one per slot, so each slot
    keeps its own sequential file reader): tokenized text for pretraining (TextDocs), rendered
    conversations for midtraining. `split` is only a label checked on resume.
    `workers` > 0 moves tokenization into that many forked processes and packing into a prefetch
    thread holding up to `prefetch` ready batches (pinned on CUDA); call close() when done.
    """

    def __init__(self, make_docs, n_docs: int, batch_size: int, seq_len: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, state: dict | None = None,
                 tokenizer_batch: int = 64, device: torch.device | str = "cpu", workers: int = 0,
                 prefetch: int = DEFAULT_PREFETCH):
        if tokenizer_batch < 1 or workers < 0:
            raise ValueError(f"tokenizer_batch must be >= 1 and workers >= 0, got {tokenizer_batch}, {workers}")
        self.B, self.T = batch_size, seq_len
        saved = self._layout(split, rank, world_size, grad_accum, state, device)
        self.streams = [_SlotStream(n_docs, s, self.n_slots, saved.get(str(s), {}).get("v"),
                                    saved.get(str(s), {}).get("offset", 0), tokenizer_batch) for s in self.slots]
        if workers == 0:
            for stream in self.streams:  # one reader per slot, in this process
                stream.fetch = lambda indices, docs=make_docs(): [np.asarray(t, dtype=np.int64) for t in docs(indices)]
            return
        self.pool = WorkerPool(_tokenize_job(make_docs), workers, name=split)
        # keep every worker busy: at least 2 chunks in flight per slot, ~2 per worker overall
        ordered = OrderedStreams(self.pool, ahead=max(2, -(-2 * workers // grad_accum)))

        def unpack(slot, n):
            flat, lens = ordered.next(slot)
            assert len(lens) == n, "worker returned a chunk of the wrong size"
            return np.split(flat, np.cumsum(lens)[:-1])

        for stream in self.streams:
            ordered.add(stream.slot, stream.requests())
            stream.fetch = lambda indices, slot=stream.slot: unpack(slot, len(indices))
        self._consumed = self._live_state()

        def produce(stop):
            ordered.stop = stop
            while True:
                yield self._pack(), self._live_state()

        self.prefetcher = Prefetcher(produce, prefetch)

    def _pack(self) -> torch.Tensor:
        return self._pinned(torch.from_numpy(self.streams[self._next_micro()].take(self.B * self.T + 1)))

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetcher is not None:
            buf, self._consumed = self.prefetcher.get()
        else:
            buf = self._pack()
        buf = buf.to(self.device, non_blocking=buf.is_pinned())
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def _positions(self) -> dict:
        return {str(s.slot): s.state() for s in self.streams}


def PretrainLoader(data_dir, tokenizer, batch_size: int, seq_len: int, split: str = "train", *args,
                   **kwargs) -> PackedLoader:
    """The pretraining stream over a prepared corpus split (the other arguments are PackedLoader's)."""
    return PackedLoader(lambda: TextDocs(data_dir, split, tokenizer), count_documents(Path(data_dir), split),
                        batch_size, seq_len, split, *args, **kwargs)


def merge_states(states: list[dict]) -> dict:
    """Combine every rank's state_dict into one (slots are disjoint across ranks)."""
    merged = dict(states[0])
    merged["slots"] = {k: v for st in states for k, v in st["slots"].items()}
    return merged
