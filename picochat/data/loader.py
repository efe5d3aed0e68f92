"""Pretraining stream: parquet documents -> BOS-prefixed tokens -> (inputs, targets) batches.

Determinism and resumability are the point of this module:
- Documents are dealt round-robin to `n_slots = world_size * grad_accum` independent streams.
  Rank r's micro-step a reads slot r * grad_accum + a, so one process with accumulation 2 sees
  exactly the data that two torchrun ranks see (tested).
- Each slot's position is (virtual doc index, tokens of it already consumed). That pair is the
  whole resume state: on --resume the slot re-tokenizes from that document and skips the offset,
  so the token stream continues exactly where it stopped, without saving any token buffers.
- Virtual doc index v maps to document v % n_docs, so the stream loops over epochs forever.

With `workers > 0` tokenization runs in forked worker processes (workers.py) and a prefetch
thread packs ready (x, y) batches into a bounded queue; the stream is the same token for token
(chunks are requested and read back in a fixed order), and state_dict() describes the batches
the training loop has *consumed*, not the ones waiting in the queue, so resume stays exact.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from picochat.data.corpus import count_documents, iter_documents
from picochat.data.workers import BackgroundLoader, OrderedStreams, Prefetcher, WorkerPool, in_worker

DEFAULT_PREFETCH = 4  # ready batches queued per process: enough to hide a slow chunk, small in memory


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
    """One deterministic token stream over documents slot, slot + n, slot + 2n, ... (mod n_docs)."""

    def __init__(self, docs, n_docs: int, slot: int, n_slots: int, v: int | None = None, offset: int = 0,
                 tokenizer_batch: int = 64, fetch=None):
        # fetch(doc indices) -> token arrays; default tokenizes here, workers pass a pool reader
        self.docs, self.n_docs = docs, n_docs
        self.fetch = fetch or (lambda indices: [np.asarray(t, dtype=np.int64) for t in self.docs(indices)])
        self.slot, self.n_slots = slot, n_slots
        self.tokenizer_batch = tokenizer_batch
        self.next_v = slot if v is None else v        # next document to tokenize
        self.chunks: deque[list] = deque()            # [v, tokens (np.int64), consumed]
        self.skip = offset                            # tokens of the first doc already consumed
        self.buffered = 0

    def _fill(self) -> None:
        vs = self.chunk_vs(self.next_v)
        ids = self.fetch([v % self.n_docs for v in vs])
        for v, arr in zip(vs, ids):
            start = 0
            if self.skip:  # resuming mid-document
                start, self.skip = min(self.skip, len(arr)), 0
            self.chunks.append([v, arr, start])
            self.buffered += len(arr) - start
        self.next_v = vs[-1] + self.n_slots

    def chunk_vs(self, v0: int) -> list[int]:
        """Virtual doc indices of the tokenizer chunk starting at v0."""
        return [v0 + i * self.n_slots for i in range(self.tokenizer_batch)]

    def requests(self):
        """The (slot, doc indices) chunk requests _fill will consume, in order (for workers)."""
        v = self.next_v
        while True:
            vs = self.chunk_vs(v)
            yield self.slot, [x % self.n_docs for x in vs]
            v = vs[-1] + self.n_slots

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
        return np.concatenate(out).astype(np.int64, copy=False)

    def state(self) -> dict:
        if self.chunks:
            v, arr, start = self.chunks[0]
            return {"v": int(v), "offset": int(start)}
        return {"v": int(self.next_v), "offset": 0}


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
            _SlotStream(None, n_docs, s, n_slots, v=saved.get(str(s), {}).get("v"), offset=saved.get(str(s), {}).get("offset", 0),
                        tokenizer_batch=tokenizer_batch)
            for s in slots
        ]
        self.micro = state.get("micro", 0)
        self.pool = self.prefetcher = None
        if workers == 0:
            for stream in self.streams:  # one reader per slot, in this process
                stream.docs = make_docs()
            self._consumed = None
            return
        self.pool = WorkerPool(_tokenize_job(make_docs), workers, name=split)
        # keep every worker busy: at least 2 chunks in flight per slot, ~2 per worker overall
        ordered = OrderedStreams(self.pool, ahead=max(2, -(-2 * workers // len(slots))))
        for stream in self.streams:
            ordered.add(stream.slot, stream.requests())
            stream.fetch = lambda indices, slot=stream.slot: self._unpack(ordered.next(slot), len(indices))
        self._consumed = self._live_state()

        def produce(stop):
            ordered.stop = stop
            while True:
                buf = self._pack()
                if self.device.type == "cuda":
                    buf = buf.pin_memory()  # here, off the training thread; the copy is then async
                yield buf, self._live_state()

        self.prefetcher = Prefetcher(produce, prefetch)

    @staticmethod
    def _unpack(result, n: int) -> list[np.ndarray]:
        flat, lens = result
        assert len(lens) == n, "worker returned a chunk of the wrong size"
        return np.split(flat, np.cumsum(lens)[:-1])

    def _pack(self) -> torch.Tensor:
        stream = self.streams[self.micro % self.grad_accum]
        self.micro = (self.micro + 1) % self.grad_accum
        return torch.from_numpy(stream.take(self.B * self.T + 1))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetcher is not None:
            buf, self._consumed = self.prefetcher.get()
        else:
            buf = self._pack()
            if self.device.type == "cuda":
                buf = buf.pin_memory()
        if self.device.type == "cuda":
            buf = buf.to(self.device, non_blocking=True)
        x = buf[:-1].view(self.B, self.T)
        y = buf[1:].view(self.B, self.T)
        return x, y

    def _live_state(self) -> dict:
        return {"split": self.split, "n_slots": self.n_slots, "micro": self.micro,
                "slots": {str(s.slot): s.state() for s in self.streams}}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def PretrainLoader(data_dir, tokenizer, batch_size: int, seq_len: int, split: str = "train", rank: int = 0,
                   world_size: int = 1, grad_accum: int = 1, state: dict | None = None, tokenizer_batch: int = 64,
                   device: torch.device | str = "cpu", workers: int = 0, prefetch: int = DEFAULT_PREFETCH) -> PackedLoader:
    """The pretraining stream over a prepared corpus split."""
    n_docs = count_documents(Path(data_dir), split)
    return PackedLoader(lambda: TextDocs(data_dir, split, tokenizer), n_docs, batch_size, seq_len, split, rank, world_size, grad_accum, state,
                        tokenizer_batch, device, workers, prefetch)


def merge_states(states: list[dict]) -> dict:
    """Combine every rank's state_dict into one (slots are disjoint across ranks)."""
    merged = dict(states[0])
    merged["slots"] = {k: v for st in states for k, v in st["slots"].items()}
    return merged
