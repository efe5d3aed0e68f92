"""Pretraining stream: parquet documents -> BOS-prefixed tokens -> (inputs, targets) batches.

Determinism and resumability are the point of this module:
- Documents are dealt round-robin to `n_slots = world_size * grad_accum` independent streams.
  Rank r's micro-step a reads slot r * grad_accum + a, so one process with accumulation 2 sees
  exactly the data that two torchrun ranks see (tested).
- Each slot's position is (virtual doc index, tokens of it already consumed). That pair is the
  whole resume state: on --resume the slot re-tokenizes from that document and skips the offset,
  so the token stream continues exactly where it stopped, without saving any token buffers.
- Virtual doc index v maps to document v % n_docs, so the stream loops over epochs forever.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from picochat.data.corpus import count_documents, iter_documents


class TextDocs:
    """Tokenized documents of a prepared corpus split: docs(indices) -> token lists (BOS first)."""

    def __init__(self, data_dir: Path, split: str, tokenizer):
        self.data_dir, self.split, self.tok = Path(data_dir), split, tokenizer
        self.n_docs = count_documents(self.data_dir, split)
        self._reader: Iterator[str] | None = None
        self._next = -1  # doc index the reader yields next

    def _read(self, doc: int) -> str:
        # sequential reads are the common case; restart the reader when we jump back or wrap
        if self._reader is None or doc < self._next:
            self._reader = iter_documents(self.data_dir, self.split, start=doc)
            self._next = doc
        while True:
            text = next(self._reader)
            self._next += 1
            if self._next - 1 == doc:
                return text

    def __call__(self, indices: list[int]) -> list[list[int]]:
        return self.tok.encode([self._read(i) for i in indices], prepend=self.tok.bos_token_id)


class _SlotStream:
    """One deterministic token stream over documents slot, slot + n, slot + 2n, ... (mod n_docs)."""

    def __init__(self, docs, n_docs: int, slot: int, n_slots: int, v: int | None = None, offset: int = 0,
                 tokenizer_batch: int = 64):
        self.docs, self.n_docs = docs, n_docs
        self.slot, self.n_slots = slot, n_slots
        self.tokenizer_batch = tokenizer_batch
        self.next_v = slot if v is None else v        # next document to tokenize
        self.chunks: deque[list] = deque()            # [v, tokens (np.int64), consumed]
        self.skip = offset                            # tokens of the first doc already consumed
        self.buffered = 0

    def _fill(self) -> None:
        vs = [self.next_v + i * self.n_slots for i in range(self.tokenizer_batch)]
        ids = self.docs([v % self.n_docs for v in vs])
        for v, toks in zip(vs, ids):
            arr = np.asarray(toks, dtype=np.int64)
            start = 0
            if self.skip:  # resuming mid-document
                start, self.skip = min(self.skip, len(arr)), 0
            self.chunks.append([v, arr, start])
            self.buffered += len(arr) - start
        self.next_v = vs[-1] + self.n_slots

    def take(self, n: int, keep_last: bool = True) -> np.ndarray:
        """Return the next n tokens; with keep_last the final one stays for the next call
        (consecutive batches overlap by one token, so no target is ever lost)."""
        while self.buffered < n:
            self._fill()
        out, need = [], n
        for chunk in self.chunks:
            v, arr, start = chunk
            piece = arr[start:start + need]
            out.append(piece)
            need -= len(piece)
            if need == 0:
                break
        consume = n - 1 if keep_last else n
        while consume:
            v, arr, start = self.chunks[0]
            k = min(consume, len(arr) - start)
            self.chunks[0][2] += k
            consume -= k
            self.buffered -= k
            if self.chunks[0][2] == len(arr):
                self.chunks.popleft()
        return np.concatenate(out)

    def state(self) -> dict:
        if self.chunks:
            v, arr, start = self.chunks[0]
            return {"v": int(v), "offset": int(start)}
        return {"v": int(self.next_v), "offset": 0}


class PackedLoader:
    """Yields (x, y) int64 tensors of shape (B, T) for this rank's micro-steps, in order.

    `make_docs()` returns a `docs(indices) -> token lists` callable (one per slot, so each slot
    keeps its own sequential file reader): tokenized text for pretraining (TextDocs), rendered
    conversations for midtraining. `split` is only a label checked on resume.
    """

    def __init__(self, make_docs, n_docs: int, batch_size: int, seq_len: int, split: str = "train",
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1, state: dict | None = None,
                 tokenizer_batch: int = 64, device: torch.device | str = "cpu"):
        self.B, self.T = batch_size, seq_len
        self.grad_accum = grad_accum
        self.device = torch.device(device)
        n_slots = world_size * grad_accum
        slots = [rank * grad_accum + a for a in range(grad_accum)]
        state = state or {}
        if state and (state.get("n_slots") != n_slots or state.get("split") != split):
            raise ValueError(f"loader state was saved with {state.get('n_slots')} slots on split {state.get('split')!r}; "
                             f"now {n_slots} slots on {split!r} (world_size x grad_accum must match to resume)")
        saved = state.get("slots", {})
        self.split, self.n_slots, self.rank = split, n_slots, rank
        self.streams = [
            _SlotStream(make_docs(), n_docs, s, n_slots, v=saved.get(str(s), {}).get("v"), offset=saved.get(str(s), {}).get("offset", 0),
                        tokenizer_batch=tokenizer_batch)
            for s in slots
        ]
        self.micro = state.get("micro", 0)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self.streams[self.micro % self.grad_accum]
        self.micro = (self.micro + 1) % self.grad_accum
        buf = torch.from_numpy(stream.take(self.B * self.T + 1))
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        x = buf[:-1].view(self.B, self.T)
        y = buf[1:].view(self.B, self.T)
        return x, y

    def state_dict(self) -> dict:
        """Positions of this rank's slots (merge across ranks with merge_states under DDP)."""
        return {"split": self.split, "n_slots": self.n_slots, "micro": self.micro,
                "slots": {str(s.slot): s.state() for s in self.streams}}


def PretrainLoader(data_dir, tokenizer, batch_size: int, seq_len: int, split: str = "train", rank: int = 0,
                   world_size: int = 1, grad_accum: int = 1, state: dict | None = None, tokenizer_batch: int = 64,
                   device: torch.device | str = "cpu") -> PackedLoader:
    """The pretraining stream over a prepared corpus split."""
    n_docs = count_documents(Path(data_dir), split)
    return PackedLoader(lambda: TextDocs(data_dir, split, tokenizer), n_docs, batch_size, seq_len, split, rank, world_size, grad_accum, state,
                        tokenizer_batch, device)


def merge_states(states: list[dict]) -> dict:
    """Combine every rank's state_dict into one (slots are disjoint across ranks)."""
    merged = dict(states[0])
    merged["slots"] = {k: v for st in states for k, v in st["slots"].items()}
    return merged
