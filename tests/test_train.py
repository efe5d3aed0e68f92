"""Pretraining end to end on a tiny corpus: exact resume, torchrun == accumulation, CLI errors, draft distillation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat import checkpoint as ck
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the king and queen of the realm spoke with honour and grace while the fool sang of love "
         "and war beneath a pale moon that rose over the hills of the old kingdom").split()


def run(args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "picochat.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"picochat {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A prepared tiny corpus + tokenizer under a private PICOCHAT_HOME."""
    home = tmp_path_factory.mktemp("home")
    src = tmp_path_factory.mktemp("src")
    import random
    rng = random.Random(0)
    for i in range(12):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) for _ in range(6))
        (src / f"doc{i:02d}.txt").write_text(text)
    e = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    run(["data", "prepare", "--source", f"local:{src}", "--name", "tiny"], e)
    run(["tokenizer", "train", "--data", "tiny", "--vocab-size", "300"], e)
    return e


TRAIN = ["train", "base", "--data", "tiny", "--depth", "2", "--seq-len", "32", "--device-batch-size", "2",
         "--eval-every", "0", "--eval-batches", "2", "--log-every", "1", "--device", "cpu"]


def final_weights(env, tag):
    os.environ["PICOCHAT_HOME"] = env["PICOCHAT_HOME"]
    c = ck.read_checkpoint(tag)
    return load_file(str(c.path / "model.safetensors")), c


@pytest.fixture(scope="module")
def full(env):
    """base/full: 8 steps, trained once for every test that reads it (so none depends on another's order)."""
    run([*TRAIN, "--steps", "8", "--tag", "base/full"], env)
    return "base/full"


@pytest.mark.slow
def test_resume_continues_exactly(env, full):
    run([*TRAIN, "--steps", "8", "--tag", "base/split", "--stop-after", "4"], env)
    _, half = final_weights(env, "base/split")
    assert half.step == 4
    run(["train", "base", "--tag", "base/split", "--resume", "--device", "cpu"], env)
    w_full, c_full = final_weights(env, "base/full")
    w_split, c_split = final_weights(env, "base/split")
    assert c_split.step == c_full.step == 8
    for k in w_full:
        torch.testing.assert_close(w_split[k], w_full[k], atol=1e-6, rtol=0)  # observed: bit-exact on CPU
    assert c_split.state["loader"] == c_full.state["loader"]
    losses = lambda c: [h["loss"] for h in c.state["history"] if "loss" in h]
    assert losses(c_split) == pytest.approx(losses(c_full), abs=1e-6)


@pytest.mark.slow
def test_resume_takes_new_grad_checkpoint_flag(env):
    """--resume keeps the run's settings but applies --grad-checkpoint (how it trains, not what)."""
    run([*TRAIN, "--steps", "6", "--tag", "base/ck-full"], env)
    run([*TRAIN, "--steps", "6", "--tag", "base/ck-split", "--stop-after", "3"], env)
    run(["train", "base", "--tag", "base/ck-split", "--resume", "--grad-checkpoint", "--device", "cpu"], env)
    w_full, _ = final_weights(env, "base/ck-full")
    w_split, c_split = final_weights(env, "base/ck-split")
    assert c_split.meta["settings"]["grad_checkpoint"] is True
    assert c_split.meta["settings"]["steps"] == 6
    for k in w_full:  # recomputed activations are the same numbers on CPU
        torch.testing.assert_close(w_split[k], w_full[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_accumulation(env):
    run([*TRAIN, "--steps", "3", "--tag", "base/accum", "--total-batch-size", "128"], env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "picochat.cli", *TRAIN, "--steps", "3", "--tag", "base/ddp", "--total-batch-size", "128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w_a, c_a = final_weights(env, "base/accum")
    w_d, c_d = final_weights(env, "base/ddp")
    assert c_d.meta["world_size"] == 2 and c_a.meta["world_size"] == 1
    la = [h["loss"] for h in c_a.state["history"] if "loss" in h]
    ld = [h["loss"] for h in c_d.state["history"] if "loss" in h]
    assert la == pytest.approx(ld, abs=1e-5)
    for k in w_a:
        torch.testing.assert_close(w_d[k], w_a[k], atol=1e-4, rtol=1e-4)
    assert c_a.state["loader"]["slots"] == c_d.state["loader"]["slots"]


@pytest.mark.slow
@pytest.mark.parametrize("pack", [[], ["--pack"]])
def test_sft_resume_continues_exactly(env, pack):
    run([*TRAIN, "--steps", "2", "--tag", "base/tiny", "--overwrite"], env)
    sft = ["train", "sft", "--model", "base/tiny", "--tasks", "arithmetic=1,identity=1", "--seq-len", "32",
           "--device-batch-size", "4", "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--steps", "6", *pack]
    full, split = f"sft/full{len(pack)}", f"sft/split{len(pack)}"
    run([*sft, "--tag", full], env)
    run([*sft, "--tag", split, "--stop-after", "3"], env)
    run(["train", "sft", "--tag", split, "--resume", "--device", "cpu"], env)
    w_full, c_full = final_weights(env, full)
    w_split, c_split = final_weights(env, split)
    assert c_full.step == c_split.step == 6 and c_full.meta["stage"] == "sft"
    for k in w_full:
        torch.testing.assert_close(w_split[k], w_full[k], atol=1e-6, rtol=0)
    assert c_split.state["loader"] == c_full.state["loader"]
    assert c_split.meta["settings"]["extra"]["pack"] is bool(pack)  # the resumed half packed as the first did


def one_line_error(proc, pattern):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.slow
def test_bad_input_gives_one_clear_line(env, full, tmp_path):
    empty = dict(env, PICOCHAT_HOME=str(tmp_path / "empty"))
    one_line_error(run([*TRAIN, "--steps", "1"], empty, check=False), "tokenizer")
    one_line_error(run(["data", "prepare", "--source", str(tmp_path / "nope")], env, check=False), "nope")
    one_line_error(run(["sample", "--model", "base/unknown"], env, check=False), "no checkpoint with tag 'base/unknown'")
    one_line_error(run([*TRAIN, "--depth", "0"], env, check=False), "--depth")
    one_line_error(run([*TRAIN, "--steps", "x"], env, check=False), "--steps")
    one_line_error(run([*TRAIN, "--compile", "turbo"], env, check=False), "--compile")
    one_line_error(run([*TRAIN, "--total-batch-size", "100"], env, check=False), "--total-batch-size")
    one_line_error(run(["sample", "--model", "base/full", "--top-p", "1.5"], env, check=False), "top_p")
    # a path the OS refuses (here $PICOCHAT_HOME below a regular file) is one line too, not a traceback
    (tmp_path / "a_file").write_text("")
    under_file = dict(env, PICOCHAT_HOME=str(tmp_path / "a_file" / "home"))
    one_line_error(run(["data", "prepare", "--source", "embedded"], under_file, check=False), "Not a directory")
    # existing tag is never overwritten by accident
    before = (Path(env["PICOCHAT_HOME"]) / "checkpoints/base/full/latest").read_text()
    one_line_error(run([*TRAIN, "--tag", "base/full"], env, check=False), "--resume")
    assert (Path(env["PICOCHAT_HOME"]) / "checkpoints/base/full/latest").read_text() == before


def test_corrupt_checkpoint_cli_error(env, full, tmp_path):
    import shutil
    home = Path(env["PICOCHAT_HOME"])
    shutil.copytree(home / "checkpoints/base/full", home / "checkpoints/base/broken")
    step_dir = sorted((home / "checkpoints/base/broken").glob("step_*"))[-1]
    w = step_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    one_line_error(run(["sample", "--model", "base/broken"], env, check=False), "corrupt")
    one_line_error(run(["train", "base", "--tag", "base/broken", "--resume"], env, check=False), "corrupt")


def test_sample_runs(env, full):
    proc = run(["sample", "--model", "base/full", "-p", "the king", "--max-tokens", "10", "--seed", "1"], env)
    assert proc.stdout.startswith("the king")   # the prompt is echoed first,
    assert proc.stdout[len("the king"):].strip(), proc.stdout  # then what the model generated


def test_threads_flag_is_applied_before_the_command(monkeypatch):
    """--threads N reaches torch.set_num_threads before the command runs (here: one that fails)."""
    import picochat.cli as cli
    seen = []
    monkeypatch.setattr(cli, "apply_threads", seen.append)
    assert cli.main(["sample", "--model", "base/none-such", "--threads", "1"]) == 1
    assert cli.main(["eval", "chat", "--model", "base/none-such", "--threads", "3"]) == 1
    assert seen == [1, 3]
    with pytest.raises(SystemExit):
        cli.main(["train", "base", "--threads", "0"])  # argparse: "expected a positive integer"


@pytest.mark.slow
def test_distill_samples_are_the_targets_own_continuations(env):
    """Greedy rows are exactly the target's greedy continuation of a corpus prefix; the CLI turns the
    samples into a prepared corpus that a draft trains on."""
    from picochat.data.corpus import iter_documents
    from picochat.inference.distill import distill_samples
    from picochat.inference.engine import Engine
    from picochat.tokenizer import Tokenizer
    home = Path(env["PICOCHAT_HOME"])
    tok = Tokenizer.load(home / "tokenizer")
    docs = list(iter_documents(home / "data/tiny", "train"))
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, tok.vocab_size, 64)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ticks = []
    samples = list(distill_samples(model, tok, docs, 50, batch=4, length=10, greedy_fraction=0.5, seed=3,
                                   progress=ticks.append))
    assert len(samples) == 8 and sum(ticks) >= 50 and [t for _, _, t in samples[:4]] == [0.0, 0.0, 1.0, 1.0]
    engine = Engine(model, tok)
    for prefix, cont, temp in samples:
        assert 16 <= len(prefix) <= 48 and any(tok.decode(prefix) in d for d in docs)
        if temp == 0.0:
            ref = engine.generate([[tok.bos_token_id] + prefix], 10, temperature=0.0, stop_tokens={tok.bos_token_id})[0]
            assert cont == [t for t in ref if t != tok.bos_token_id]

    run([*TRAIN, "--steps", "2", "--tag", "base/distill-target"], env)
    run(["data", "distill", "--target", "base/distill-target", "--name", "distilled", "--tokens", "200",
         "--batch-size", "4", "--length", "16", "--device", "cpu", "--val-fraction", "0.2", "--source-data", "tiny"], env)
    meta = json.loads((home / "data/distilled/meta.json").read_text())
    assert meta["train_docs"] + meta["val_docs"] >= 200 // 16
    run([*TRAIN, "--steps", "2", "--data", "distilled", "--tag", "draft/tiny"], env)
    one_line_error(run(["data", "distill", "--target", "base/distill-target", "--name", "distilled"], env, check=False),
                   "already exists")
