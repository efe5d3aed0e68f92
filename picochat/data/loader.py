"""Pretraining data: parquet documents -> tokens -> (inputs, targets) batches, and the interface every
training loader shares (`next(loader) -> Batch`, `state_dict()`, `merge_states()`, `close()`).

What a row holds: each document is tokenized with BOS prepended and the documents are concatenated,
in order, into one endless token stream per slot (below). A micro-batch takes the slot's next
B x T + 1 tokens: inputs are the first B x T, targets the same shifted by one, both viewed as B rows
of T. So a row starts wherever the previous one ended, usually mid-document and not on a BOS, and may
span several documents (each of which still begins with its BOS). Nothing is dropped or padded; a
slot's consecutive batches overlap by one token so no target is lost. (nanochat instead
starts every row on a BOS and fills it best-fit, cropping documents: on the embedded corpus, whose
documents average ~1,600 tokens, that would drop ~84% of the tokens at --seq-len 256: a one-off
count, 2026-12-08, vocab 2048, no script in the repo.)

Determinism and resumability are the point:
- Documents are dealt round-robin to `n_slots = world_size * grad_accum` independent streams.
  Rank r's micro-step a reads slot r * grad_accum + a, so one process with accumulation 2 sees
  exactly the data that two torchrun ranks see (tested).
- Each slot's position is (virtual doc index, tokens of it already consumed): the whole resume
  state. On --resume the slot re-tokenizes from that document and skips the offset, so the stream
  continues exactly where it stopped without saving any token buffers. Virtual doc index v maps
  to document v % n_docs, so the stream loops over epochs forever.

Everything here runs in the training process. `workers > 0` is an optional speed-up (workers.py):
forked processes tokenize the same chunks and a thread packs batches ahead; the stream is the same
token for token, and state_dict() then describes the batches handed out, not the prefetched ones.
"""
from __future__ import annotations

import contextlib
from collections import deque
from itertools import count, islice
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from picochat.data.corpus import count_documents, iter_documents
from picochat.data import workers as data_workers

DEFAULT_PREFETCH = 4  # ready batches queued per process: enough to hide a slow chunk, small in memory


class Batch(NamedTuple):
    """One micro-batch, what the training loop takes from every stage's loader."""
    inputs: torch.Tensor      # (B, T) token ids
    targets: torch.Tensor     # (B, T) next tokens; -1 where no loss is wanted
    tokens: int               # tokens it counts toward the run's total, this process
    metrics: dict = {}        # what the step did, for the run history (RL: rewards, rollout speed); read-only


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
                               num_threads=1 if data_workers.IN_WORKER else 8)


class SlotStream:
    """One deterministic token stream over documents slot, slot + n, slot + 2n, ... (mod n_docs).

    requests() gives the doc indices of each chunk in order; `chunks` yields their token lists (in this
    process: map(docs, requests()); with workers: the workers' results for the same requests)."""

    def __init__(self, n_docs: int, slot: int, n_slots: int, saved: dict, tokenizer_batch: int):
        self.n_docs, self.slot, self.n_slots, self.tokenizer_batch = n_docs, slot, n_slots, tokenizer_batch
        self.next_v = saved.get("v", slot)            # next document to tokenize
        self.skip = saved.get("offset", 0)            # tokens of the first doc already consumed
        self.chunks: Iterator[list] | None = None
        self.buffer: deque[list] = deque()            # [v, tokens (np.int64), consumed]
        self.buffered = 0

    def requests(self) -> Iterator[list[int]]:
        for v0 in count(self.next_v, self.tokenizer_batch * self.n_slots):
            yield [(v0 + i * self.n_slots) % self.n_docs for i in range(self.tokenizer_batch)]

    def _fill(self) -> None:
        for i, tokens in enumerate(next(self.chunks)):
            arr = np.asarray(tokens, dtype=np.int64)
            start, self.skip = min(self.skip, len(arr)), 0  # resuming mid-document
            self.buffer.append([self.next_v + i * self.n_slots, arr, start])
            self.buffered += len(arr) - start
        self.next_v += self.tokenizer_batch * self.n_slots

    def take(self, n: int) -> np.ndarray:
        """Return the next n tokens; the final one stays for the next call (consecutive batches
        overlap by one token, so no target is ever lost)."""
        while self.buffered < n:
            self._fill()
        out, need = [], n
        for v, arr, start in self.buffer:
            out.append(arr[start:start + need])
            need -= len(out[-1])
            if need == 0:
                break
        consume = n - 1
        self.buffered -= consume
        while consume:
            chunk = self.buffer[0]
            k = min(consume, len(chunk[1]) - chunk[2])
            chunk[2] += k
            consume -= k
            if chunk[2] == len(chunk[1]):
                self.buffer.popleft()
        return np.concatenate(out)

    def state(self) -> dict:
        v, _, start = self.buffer[0] if self.buffer else (self.next_v, None, 0)
        return {"v": int(v), "offset": int(start)}


class SlotLoader:
    """What the pretraining, mid and SFT loaders share: the slot layout and its resume check, the
    micro-step order, the Batch they hand out and their state. Subclasses define _produce() (the next
    micro-step's CPU (x, y)) and _positions() (per-slot resume positions)."""
    background = None  # workers.Background when workers > 0: it calls _produce() ahead, in a thread

    def __init__(self, split: str, rank: int, world_size: int, grad_accum: int, state: dict | None, device):
        self.split, self.grad_accum, self.device = split, grad_accum, torch.device(device)
        self.n_slots = world_size * grad_accum
        self.slots = range(rank * grad_accum, (rank + 1) * grad_accum)
        state = state or {}
        if state and (state.get("n_slots") != self.n_slots or state.get("split") != split):
            raise ValueError(f"loader state was saved with {state.get('n_slots')} slots on split {state.get('split')!r}; "
                             f"now {self.n_slots} slots on {split!r} (world_size x grad_accum must match to resume)")
        self.micro = state.get("micro", 0)
        self.saved = state.get("slots", {})  # str(slot) -> position

    def _next_micro(self) -> int:
        """Which of this rank's slots (0 .. grad_accum - 1) the next micro-step reads."""
        a = self.micro % self.grad_accum
        self.micro = (self.micro + 1) % self.grad_accum
        return a

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        # pinned (in the prefetch thread when there is one, off the training thread): the copy is then async
        return t.pin_memory() if self.device.type == "cuda" else t

    def __next__(self) -> Batch:
        x, y = self.background.get() if self.background else self._produce()
        x, y = (t.to(self.device, non_blocking=t.is_pinned()) for t in (x, y))
        return Batch(x, y, x.numel())

    def __iter__(self):
        return self

    def live_state(self) -> dict:
        return {"split": self.split, "n_slots": self.n_slots, "micro": self.micro, "slots": self._positions()}

    def state_dict(self) -> dict:
        """Positions after the last batch handed out (combine ranks with merge_states under DDP)."""
        return self.background.state if self.background else self.live_state()

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Combine every rank's state_dict into one (slots are disjoint across ranks)."""
        merged = dict(states[0])
        merged["slots"] = {k: v for st in states for k, v in st["slots"].items()}
        return merged

    def close(self) -> None:
        """Stop the background workers, if any (idempotent)."""
        if self.background is not None:
            self.background.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


merge_states = SlotLoader.merge_states


class PackedLoader(SlotLoader):
    """Yields Batches of (B, T) rows cut from this rank's slot streams, one slot per micro-step.

    `make_docs()` returns a `docs(indices) -> token lists` callable (one per slot, so each slot keeps
    its own sequential file reader): tokenized text for pretraining (TextDocs), rendered conversations
    for midtraining. `split` is only a label checked on resume. `workers` > 0 moves tokenization into
    that many forked processes and packing into a thread holding up to `prefetch` ready batches
    (pinned on CUDA); call close() when done.
    """

    def __init__(self, make_docs, n_docs: int, batch_size: int, seq_len: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, state: dict | None = None,
                 tokenizer_batch: int = 64, device: torch.device | str = "cpu", workers: int = 0,
                 prefetch: int = DEFAULT_PREFETCH):
        if tokenizer_batch < 1 or workers < 0:
            raise ValueError(f"tokenizer_batch must be >= 1 and workers >= 0, got {tokenizer_batch}, {workers}")
        super().__init__(split, rank, world_size, grad_accum, state, device)
        self.B, self.T = batch_size, seq_len
        self.streams = [SlotStream(n_docs, s, self.n_slots, self.saved.get(str(s), {}), tokenizer_batch)
                        for s in self.slots]
        if workers:
            self.background = data_workers.tokenize_in_background(self, make_docs, workers, prefetch)
        else:
            for stream in self.streams:  # one document reader per slot, in this process
                stream.chunks = map(make_docs(), stream.requests())

    def _produce(self) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._pinned(torch.from_numpy(self.streams[self._next_micro()].take(self.B * self.T + 1)))
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def _positions(self) -> dict:
        return {str(s.slot): s.state() for s in self.streams}


def PretrainLoader(data_dir, tokenizer, batch_size: int, seq_len: int, split: str = "train", *args,
                   **kwargs) -> PackedLoader:
    """The pretraining stream over a prepared corpus split (the other arguments are PackedLoader's)."""
    return PackedLoader(lambda: TextDocs(data_dir, split, tokenizer), count_documents(Path(data_dir), split),
                        batch_size, seq_len, split, *args, **kwargs)
