"""Background data workers: tokenization in forked processes, ready batches prefetched by a thread.

- WorkerPool(fn, n): n forked processes running `fn(request) -> result`. Request k goes to worker
  k % n and results are read back in submission order, so the stream never depends on the number
  or speed of the workers (2 workers give the 0-worker stream: tested). The parent waits on each
  worker's pipe *and* its process sentinel, so a worker that dies (OOM killer, SIGKILL, segfault)
  raises LoaderWorkerError within a fraction of a second instead of hanging on a queue forever.
- OrderedStreams(pool, ahead): one ordered result stream per loader slot over one pool.
- Background(loader, pool, run, depth): a thread that runs the packing generator and keeps a
  bounded queue of ready batches, each with the loader's state right after it, so the training step
  only pops a finished batch and a checkpoint saves the position of the batches handed out.
- tokenize_in_background wires a PackedLoader's slot streams to a pool (SFTLoader renders whole
  batches in its own, chat_loader.py).

Workers are forked, not spawned: they inherit the tokenizer, the task mixture and the document
readers without pickling anything and start in milliseconds. They never touch torch or CUDA, so
forking a process that holds a CUDA context is safe. Forking happens in the loader's constructor,
before its prefetch thread starts.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Iterator

import numpy as np

from picochat.common import PicochatError

MAX_DEFAULT_WORKERS = 8   # beyond this tokenization is never the bottleneck; more only costs memory
IN_WORKER = False         # set in worker processes: tokenizers there use one thread each


class LoaderWorkerError(PicochatError):
    """A data worker died or raised; training cannot continue from this loader."""


def default_workers() -> int:
    """Cores available to this process minus one (the training loop's), split across the ranks
    torchrun started on this node, capped at MAX_DEFAULT_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def _worker_main(fn, requests, results, parent: int) -> None:
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            # a parent that died without closing the pipe (an abort) leaves no EOF here, since forked
            # siblings hold its end too: a worker that outlived it kept the parent's stdout open and hung
            # a `| tee` behind it, so look for the parent once a second
            while not requests.poll(1.0):
                if os.getppid() != parent:
                    return
            req = requests.recv()
        except (EOFError, OSError):  # parent closed the pipe or went away
            return
        if req is None:
            return
        try:
            results.send(("ok", fn(req)))
        except BaseException:  # report, then stop: the parent raises with this message
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            results.send(("error", tb))
            return


def _death(proc) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class WorkerPool:
    """n forked processes running fn(request); results come back in submission order."""

    def __init__(self, fn: Callable, n: int, name: str = "data"):
        if n < 1:
            raise ValueError(f"a worker pool needs >= 1 workers, got {n}")
        if "fork" not in mp.get_all_start_methods():
            raise PicochatError("background loader workers need the 'fork' start method (Linux/macOS); "
                                "use --loader-workers 0 on this platform")
        ctx = mp.get_context("fork")
        self.name, self.n = name, n
        self.procs, self.req_conns, self.res_conns = [], [], []
        for i in range(n):
            req_r, req_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(fn, req_r, res_w, os.getpid()), name=f"picochat-{name}-{i}", daemon=True)
            p.start()
            # close the child's ends here: if the child dies, reading its pipe then gives EOF, not a hang
            req_r.close()
            res_w.close()
            self.procs.append(p)
            self.req_conns.append(req_w)
            self.res_conns.append(res_r)
        self.submitted = self.received = 0
        self.closed = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _fail(self, i: int, why: str) -> LoaderWorkerError:
        self.close()
        return LoaderWorkerError(f"{self.name} loader worker {i} (pid {self.procs[i].pid}) {why}; training stopped "
                                 f"(checkpoints already written are intact: rerun with --resume, or with "
                                 f"--loader-workers 0 to tokenize in the training process)")

    def submit(self, request) -> None:
        i = self.submitted % self.n
        try:
            self.req_conns[i].send(request)
        except (BrokenPipeError, OSError):
            raise self._fail(i, _death(self.procs[i]) if not self.procs[i].is_alive() else "closed its pipe") from None
        self.submitted += 1

    def get(self, stop: threading.Event | None = None):
        """The result of the oldest request not yet returned (blocks; raises if its worker died)."""
        if self.received >= self.submitted:
            raise RuntimeError("WorkerPool.get() with no request outstanding")
        i = self.received % self.n
        conn, proc = self.res_conns[i], self.procs[i]
        while True:
            ready = wait([conn, proc.sentinel], timeout=1.0)
            if conn in ready:
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):  # died mid-message: the pipe closes with the process
                    proc.join(timeout=1.0)
                    raise self._fail(i, _death(proc)) from None
                if status == "error":  # the exception line; the full traceback went to the worker's stderr
                    raise self._fail(i, f"raised {payload.strip().splitlines()[-1]}")
                self.received += 1
                return payload
            if proc.sentinel in ready:
                proc.join(timeout=1.0)
                raise self._fail(i, _death(proc))
            if stop is not None and stop.is_set():
                raise _Stopped()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.req_conns:
            with contextlib.suppress(OSError):  # BrokenPipeError is one
                conn.send(None)
        for p in self.procs:
            p.join(timeout=0.5)
            if p.is_alive():  # blocked sending a result nobody will read
                p.terminate()
                p.join(timeout=2.0)
        for c in self.req_conns + self.res_conns:
            c.close()


class _Stopped(Exception):
    """Internal: the prefetcher was closed while waiting."""


class OrderedStreams:
    """Per-key ordered result streams over one WorkerPool (one key per loader slot).

    Each key keeps `ahead` requests in flight. Results come back in global submission order, so a
    key waiting for its next result stashes the other keys' results it reads on the way."""

    def __init__(self, pool: WorkerPool, ahead: int):
        self.pool, self.ahead = pool, max(1, ahead)
        self.pending: deque = deque()        # keys of submitted, not yet received requests, in order
        self.ready: dict = {}                # key -> deque of received results
        self.makers: dict = {}               # key -> iterator of that key's requests
        self.stop: threading.Event | None = None

    def add(self, key, requests: Iterator) -> None:
        self.makers[key] = requests
        self.ready[key] = deque()
        for _ in range(self.ahead):
            self._submit(key)

    def _submit(self, key) -> None:
        self.pool.submit(next(self.makers[key]))
        self.pending.append(key)

    def chunks(self, key) -> Iterator[list[np.ndarray]]:
        """Key's tokenized chunks, in order: each result (flat tokens, per-doc lengths) split per doc."""
        while True:
            while not self.ready[key]:
                got = self.pending.popleft()
                self.ready[got].append(self.pool.get(stop=self.stop))
            self._submit(key)
            flat, lens = self.ready[key].popleft()
            yield np.split(flat, np.cumsum(lens)[:-1])


class Background:
    """A loader's batches made ahead in a thread: `run(stop)` yields (batch, the loader's state right
    after it) and up to `depth` of them wait in a queue. get() returns the next batch and makes its
    state `state`, which the loader's state_dict() returns (the queued batches are not consumed yet).
    Errors in the thread (a dead worker included) are re-raised by get() in the training thread."""

    def __init__(self, loader, pool: WorkerPool, run: Callable[[threading.Event], Iterator], depth: int):
        self.pool, self.state = pool, loader.live_state()  # before the thread starts moving the loader on
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(run,), name="picochat-prefetch", daemon=True)
        self.thread.start()

    def _put(self, entry) -> bool:
        """Queue entry, waiting for room; False once close() was called."""
        while not self.stop.is_set():
            try:
                self.q.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, run) -> None:
        try:
            for item in run(self.stop):
                if not self._put(("ok", item)):
                    return
        except _Stopped:
            return
        except BaseException as e:  # handed to the training thread (it may be draining the queue)
            self._put(("error", e))

    def get(self):
        while True:
            try:
                status, item = self.q.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive() and self.q.empty():
                    raise LoaderWorkerError("the data prefetch thread stopped without an error") from None
                continue
            if status == "error":
                raise item
            batch, self.state = item
            return batch

    def close(self) -> None:
        """Stop the thread, then the worker processes (idempotent)."""
        self.stop.set()
        self.thread.join(timeout=5.0)
        self.pool.close()


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


def tokenize_in_background(loader, make_docs, workers: int, prefetch: int) -> Background:
    """A PackedLoader's speed-up: its slot streams' chunks tokenized by `workers` forked processes (the
    same requests it would make in process, so the same tokens), batches packed ahead in a thread."""
    pool = WorkerPool(_tokenize_job(make_docs), workers, name=loader.split)
    # keep every worker busy: at least 2 chunks in flight per slot, ~2 per worker overall
    ordered = OrderedStreams(pool, ahead=max(2, -(-2 * workers // loader.grad_accum)))
    for stream in loader.streams:
        ordered.add(stream.slot, ((stream.slot, indices) for indices in stream.requests()))
        stream.chunks = ordered.chunks(stream.slot)

    def run(stop):
        ordered.stop = stop  # closing interrupts a wait on the pool
        while True:
            yield loader._produce(), loader.live_state()

    return Background(loader, pool, run, prefetch)
