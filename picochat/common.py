"""Shared plumbing: where artifacts live, errors, atomic writes, number flags, rank-0 printing.

Everything here is small and dependency-free on purpose (no torch: device/dtype/distributed setup is
in device.py): every other module imports it, the HTTP-only safety pipeline included.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path



class PicochatError(Exception):
    """An error the user can fix. The CLI prints its message as one line and exits non-zero."""


# --------------------------------------------------------------------------- paths

def home() -> Path:
    """Root of all artifacts: $PICOCHAT_HOME, default ~/.cache/picochat."""
    return Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()


def data_dir(name: str = "embedded") -> Path:
    return home() / "data" / name


def tokenizer_dir() -> Path:
    return home() / "tokenizer"


# --------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    A crash (or kill) mid-write leaves the old file intact and at most a stray *.tmp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts should be readable like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary folder next to `out` to build it in; only if the block succeeds does it replace
    `out` (replace_dir). A crash leaves the old `out` intact and at most a stray .<name>.*.tmp folder."""
    import shutil
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; artifacts should be readable like any other
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder tmp to out; an existing out (folder or file) is moved aside first and
    deleted only once tmp is in place, so a failure leaves the old one where it was."""
    import shutil
    import uuid
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub ($HF_ENDPOINT) answers: a fast offline check before the hub libraries
    start their own retries (data sources, AIME). Runs in a daemon thread because a hanging DNS lookup
    ignores socket timeouts. Any HTTP answer counts as up; urllib goes through $HTTPS_PROXY like the hub
    libraries do. Plain urllib, not huggingface_hub: the hub library has no bounded reachability check
    (its calls retry), and the check must come before any hub call (tests/test_corpus.py pins both)."""
    import threading
    import urllib.error
    import urllib.request
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/datasets?limit=1"
    result: list[bool] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except Exception:  # URLError, timeout, refused, TLS...
            return
        result.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(result)


# --------------------------------------------------------------------------- CLI flag types

def number_type(cast, ok, what: str):
    """argparse type: parse with `cast`, accept when ok(value), else one clear message."""
    import argparse

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
nonneg_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = number_type(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(s: str) -> int:
    """'4G', '512M', '1.5GiB', '4gb' or a plain number of bytes -> bytes (binary units: 1G = 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", s.lower())
    if not m:
        raise ValueError(f"not a size: {s!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


byte_size = number_type(parse_bytes, lambda v: v >= 1, "a size such as 4G, 512M or a number of bytes")


def fmt_bytes(n: float) -> str:
    """Bytes for people: 1.8 GB, 420 MB, 12 KB (binary units, as parse_bytes reads them)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


DTYPE_NAMES = ("fp32", "bf16", "fp16")  # device.DTYPES maps them to torch dtypes
DECODE_STEPS = ("auto", "eager", "compiled", "cuda-graphs")
QUANT_MODES = ("none", "int8", "int4")  # inference/quant.py


def add_inference_flags(p) -> None:
    """--dtype, --quant and --decode-step, the same on every command that runs a model for inference."""
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="weights, activations and KV "
                   "cache (sampling is always fp32): auto = bf16 on a CUDA card with bf16, fp32 otherwise; fp16 needs "
                   "a GPU; on a CPU without native bf16, bf16 decodes one row faster but prompts slower "
                   "(default %(default)s)")
    p.add_argument("--decode-step", default="auto", choices=DECODE_STEPS, help="how each decoded token runs: eager; "
                   "compiled (torch.compile of a static-shape step: fewer launches, minutes of compile on CPU); "
                   "cuda-graphs (the compiled step replayed as one CUDA graph, CUDA only); auto = cuda-graphs on CUDA, "
                   "eager elsewhere (default %(default)s)")
    p.add_argument("--quant", default="none", choices=QUANT_MODES, help="weights in fewer bits, for speed and memory: "
                   "int8 (per output channel; on CPU activations per token, FBGEMM), int4 (groups of 32 input "
                   "channels, lm_head int8); docs/inference.md measures speed and quality (default %(default)s)")


# --------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    enabled: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return DistInfo(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    return DistInfo(False, 0, 0, 1)


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if dist_info().rank == 0:
        print(*args, **kwargs)
        sys.stdout.flush()


def read_jsonl_numbered(path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSONL file (.gz allowed), with one
    clear PicochatError for a missing/unreadable file, a bad line or an empty file."""
    import gzip
    path = Path(path).expanduser()
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
    except FileNotFoundError:
        raise PicochatError(f"{what} data file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise PicochatError(f"cannot read {what} data file {path}: {e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise PicochatError(f"{path}: line {n}: bad JSON ({e.msg})") from None
    if not rows:
        raise PicochatError(f"{path}: no {what} examples in the file")
    return rows


THREADS_HELP = ("CPU threads for torch (default: torch's choice, one per core). On a CPU shared with other "
                "busy processes, 1 avoids OpenMP threads spin-waiting on each other (see README)")


def apply_threads(n: int | None) -> None:
    """torch.set_num_threads(n) when n is set (the --threads flag); None/0 keeps torch's default."""
    if n:
        import torch  # lazily: common.py stays torch-free for the HTTP-only commands
        torch.set_num_threads(n)

