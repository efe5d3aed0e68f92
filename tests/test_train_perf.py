"""Training performance knobs keep results exact: gradient checkpointing, loader workers, compile fallbacks.

- checkpointed gradients equal plain ones (MHA; MLA when picochat/model/mla.py exists)
- the loader with 2 workers yields the 0-worker token stream exactly, also across DDP ranks and resume
- a SIGKILLed worker stops training within seconds with a one-line error
- CUDA-graph compile modes fall back on CPU without crashing; gpu_speedrun.sh --dry-run works here
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from picochat.data.chat_loader import SFTLoader
from picochat.data.loader import PretrainLoader, merge_states
from picochat.tasks.arithmetic import ArithmeticTask
from picochat.data.workers import LoaderWorkerError
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer
from picochat.train.loop import compile_model, effective_compile_mode

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of the realm spoke with honour and grace while the fool sang of love "
         "and war beneath a pale moon that rose over the hills of the old kingdom").split()


# ----------------------------------------------------------------------------- gradient checkpointing

def grads(model, x, y, checkpointing: bool) -> dict:
    model.zero_grad(set_to_none=True)
    model.grad_checkpoint = checkpointing
    model(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["mha", "gqa", "mla"])
def test_grad_checkpoint_gives_the_same_gradients(attention):
    if attention == "mla":
        pytest.importorskip("picochat.model.mla", reason="MLA is not in this tree yet")
    torch.manual_seed(0)
    model = GPT(config_from_depth(2, 256, 32, attention=attention)).train()
    model.init_weights()
    for p in model.parameters():  # zero-initialised projections would make most gradients trivially 0
        p.data.add_(0.02 * torch.randn_like(p))
    x, y = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    plain, ckpt = grads(model, x, y, False), grads(model, x, y, True)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        # same ops recomputed on the same inputs: observed bit-exact on CPU; tolerance 1e-6 abs / 1e-5 rel
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_grad_checkpoint_is_per_block_and_only_when_training(monkeypatch):
    import picochat.model.gpt as gpt
    calls = []
    real = gpt.checkpoint

    def spy(fn, *args, **kw):
        calls.append((type(fn).__name__, kw.get("use_reentrant")))
        return real(fn, *args, **kw)
    monkeypatch.setattr(gpt, "checkpoint", spy)
    model = GPT(config_from_depth(3, 64, 16))
    model.grad_checkpoint = True
    x = torch.randint(0, 64, (1, 8))
    model.train()(x, x).backward()
    assert calls == [("Block", False)] * 3  # one non-reentrant checkpoint per block
    calls.clear()
    with torch.no_grad():
        model(x)
    model.eval()(x)
    assert calls == []  # inference never pays for recomputation


# ----------------------------------------------------------------------------- loader workers

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 short documents (so batches cross documents and epochs) and a tiny tokenizer."""
    from picochat.data.corpus import prepare
    src = tmp_path_factory.mktemp("src")
    rng = random.Random(0)
    for i in range(60):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))))
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(f"local:{src}", out, val_fraction=0.1)
    tok = Tokenizer.train([(src / f"doc{i:02d}.txt").read_text() for i in range(60)], vocab_size=300)
    return out, tok


def take(loader, n):
    try:
        return [torch.cat(next(loader)[:2]) for _ in range(n)], loader.state_dict()
    finally:
        loader.close()


def stream(corpus, workers, n, state=None, rank=0, world_size=1, grad_accum=1, tokenizer_batch=3):
    data, tok = corpus
    loader = PretrainLoader(data, tok, 2, 16, "train", rank, world_size, grad_accum, state,
                            tokenizer_batch=tokenizer_batch, workers=workers)
    return take(loader, n)


def test_two_workers_yield_the_same_stream_as_none(corpus):
    ref, ref_state = stream(corpus, 0, 60, grad_accum=2)
    got, state = stream(corpus, 2, 60, grad_accum=2, tokenizer_batch=5)  # chunking must not matter either
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"batch {i} differs"
    assert state == ref_state
    n_docs = 60 - 6
    assert max(s["v"] for s in state["slots"].values()) > n_docs // 2  # crossed many documents


def test_resume_with_workers_continues_the_stream(corpus):
    ref, ref_state = stream(corpus, 0, 50, grad_accum=2)
    head, mid_state = stream(corpus, 2, 21, grad_accum=2)  # odd count: stops mid-accumulation, mid-document
    assert mid_state["micro"] == 1 and any(s["offset"] for s in mid_state["slots"].values())
    tail, state = stream(corpus, 2, 29, state=mid_state, grad_accum=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, head + tail))
    assert state == ref_state


def test_workers_on_two_ranks_equal_one_rank_with_accumulation(corpus):
    ref, ref_state = stream(corpus, 0, 40, grad_accum=2)
    r0, s0 = stream(corpus, 2, 20, rank=0, world_size=2)
    r1, s1 = stream(corpus, 1, 20, rank=1, world_size=2)
    interleaved = [b for pair in zip(r0, r1) for b in pair]
    assert all(torch.equal(a, b) for a, b in zip(ref, interleaved))
    assert merge_states([s0, s1])["slots"] == ref_state["slots"]


def test_sft_loader_with_workers_matches_in_process(corpus):
    _, tok = corpus
    task = ArithmeticTask(split="train", size=50)
    ref, ref_state = take(SFTLoader(task, tok, 2, 48, grad_accum=2), 9)
    got, state = take(SFTLoader(task, tok, 2, 48, grad_accum=2, workers=2), 9)
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and state == ref_state
    padded, _ = take(SFTLoader(task, tok, 2, 48, grad_accum=2, workers=2, pad_to=48), 9)
    assert all(p.shape == (4, 48) for p in padded)  # static shape for compiled training
    for a, p in zip(ref, padded):
        assert torch.equal(p[:, :a.size(1)], a)


def test_killed_worker_raises_clear_error(corpus):
    data, tok = corpus
    loader = PretrainLoader(data, tok, 2, 16, tokenizer_batch=2, workers=2)
    try:
        next(loader)
        os.kill(loader.background.pool.pids[1], signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(LoaderWorkerError, match=r"worker 1 \(pid \d+\) killed by signal SIGKILL"):
            for _ in range(10_000):
                next(loader)
        assert time.time() - t0 < 10
    finally:
        loader.close()


def test_worker_exception_is_reported(corpus):
    data, tok = corpus

    def broken_docs():
        def docs(indices):
            raise RuntimeError("corrupt shard 7")
        return docs
    from picochat.data.loader import PackedLoader
    loader = PackedLoader(broken_docs, 10, 2, 16, workers=1)
    try:
        with pytest.raises(LoaderWorkerError, match="corrupt shard 7"):
            next(loader)
    finally:
        loader.close()


# ----------------------------------------------------------------------------- CLI end to end

def cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "picochat.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run_ok(args, env):
    proc = cli(args, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def env(corpus, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    data, tok = corpus
    (home / "data").mkdir()
    (home / "data" / "tiny").symlink_to(data)
    tok.save(home / "tokenizer")
    return dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")


TRAIN = ["train", "base", "--data", "tiny", "--depth", "1", "--seq-len", "16", "--device-batch-size", "2",
         "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--tokenizer-batch-size", "2"]


def same_run(env, tag_a, tag_b, atol):
    from safetensors.torch import load_file
    from picochat import checkpoint as ck
    os.environ["PICOCHAT_HOME"] = env["PICOCHAT_HOME"]
    a, b = ck.read_checkpoint(tag_a), ck.read_checkpoint(tag_b)
    assert a.step == b.step
    assert a.state["loader"]["slots"] == b.state["loader"]["slots"]
    wa, wb = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=atol)
    return a, b


@pytest.fixture(scope="module")
def reference_run(env):
    """6 steps, one process, gradient accumulation 2, tokenizing in-process, no checkpointing."""
    run_ok([*TRAIN, "--steps", "6", "--total-batch-size", "64", "--tag", "base/ref", "--loader-workers", "0"], env)
    return "base/ref"


@pytest.mark.slow
def test_training_resume_with_workers_matches_in_process_run(env, reference_run):
    run_ok([*TRAIN, "--steps", "6", "--total-batch-size", "64", "--tag", "base/w2", "--loader-workers", "2",
            "--stop-after", "3"], env)
    run_ok(["train", "base", "--tag", "base/w2", "--resume", "--device", "cpu", "--loader-workers", "2"], env)
    same_run(env, reference_run, "base/w2", atol=1e-6)  # observed bit-exact


@pytest.mark.slow
def test_torchrun_with_workers_and_checkpointing_equals_plain_accumulation(env, reference_run):
    """DDP x 2 ranks with 2 loader workers each and --grad-checkpoint == the reference run."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "picochat.cli", *TRAIN, "--steps", "6", "--total-batch-size", "64",
                           "--tag", "base/ddpw", "--loader-workers", "2", "--grad-checkpoint"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, b = same_run(env, reference_run, "base/ddpw", atol=1e-4)  # all-reduce sums in another order
    assert b.meta["world_size"] == 2 and b.meta["settings"]["grad_checkpoint"]


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the worker pids")
def test_sigkilled_worker_stops_training_fast(env):
    proc = cli([*TRAIN, "--steps", "100000", "--tag", "base/kill", "--loader-workers", "2"], env)
    try:
        deadline = time.time() + 120
        while len(children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let training start
        os.kill(children(proc.pid)[0], signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - t0
        assert elapsed < 10, elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    lines = [ln[ln.index("picochat: error:"):] for ln in err.splitlines() if "picochat: error:" in ln]
    assert lines and "killed by signal SIGKILL" in lines[-1] and "--resume" in lines[-1], err[-2000:]


def test_gpu_speedrun_dry_run_checks_every_command():
    proc = subprocess.run(["bash", str(REPO / "gpu_speedrun.sh"), "--dry-run", "--gpus", "8"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "torchrun --standalone --nproc_per_node=8" in proc.stdout
    assert "--compile max-autotune" in proc.stdout and "all flags parse" in proc.stdout
    bad = subprocess.run(["bash", str(REPO / "gpu_speedrun.sh"), "--dry-run", "--gpus", "three"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--gpus" in bad.stderr


# ----------------------------------------------------------------------------- compile fallbacks

def test_compile_modes_fall_back_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert effective_compile_mode("reduce-overhead", cpu)[0] == "default"
    assert effective_compile_mode("max-autotune", cpu)[0] == "max-autotune-no-cudagraphs"
    assert effective_compile_mode("default", cpu) == ("default", "")
    assert effective_compile_mode("reduce-overhead", torch.device("mps"))[0] == "off"
    assert effective_compile_mode("reduce-overhead", torch.device("cuda"))[0] == "reduce-overhead"
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without a C++ compiler
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "max-autotune", cpu) is model


@pytest.mark.skipif(not os.environ.get("PICOCHAT_SLOW_TESTS"),
                    reason="compiles with inductor: ~90 s on a 2-core machine; set PICOCHAT_SLOW_TESTS=1")
@pytest.mark.skipif(not any(map(__import__("shutil").which, ("g++", "c++"))), reason="inductor needs a C++ compiler")
def test_reduce_overhead_on_cpu_trains_like_eager():
    """--compile reduce-overhead on CPU runs (as 'default') with checkpointing on and gives eager's loss."""
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, 64, 16)).train()
    model.init_weights()
    model.grad_checkpoint = True
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    eager = model(x, y)
    compiled = compile_model(model, "reduce-overhead", torch.device("cpu"))(x, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_workers_exit_when_their_parent_dies_without_closing_them():
    """An aborted parent (a C-level crash: no Python cleanup) must not leave its workers running,
    holding its stdout open: they see the parent gone and exit."""
    code = ("import os; from picochat.data.workers import WorkerPool; pool = WorkerPool(abs, 2, name='t'); "
            "print(' '.join(str(p.pid) for p in pool.procs), flush=True); os.abort()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert proc.wait(timeout=60) == -signal.SIGABRT and len(pids) == 2

    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.time() + 30
    while time.time() < deadline and any(map(running, pids)):
        time.sleep(0.2)
    assert not any(map(running, pids))
    assert proc.stdout.read() == ""  # EOF: no worker holds the pipe any more
