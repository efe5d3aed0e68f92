"""The safety workflow's output is SFT data: `picochat train sft --data kept.jsonl` trains on it.

Runs the blue-team and filter stages against the scripted fake OpenAI server, then fine-tunes a
tiny base model on the kept conversations alone (no other task) and checks the run saw exactly
those conversations and that the loss was computed on their assistant turns.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")

from fake_openai import KEY_ENV, FakeOpenAI, make_questions, write_config, write_questions  # noqa: E402

from picochat.safety import config as C  # noqa: E402
from picochat.safety.filter import run_filter  # noqa: E402
from picochat.safety.respond import run_respond  # noqa: E402
from picochat.safety.store import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "how do I stay safe online and protect my accounts from harm please help me with this question".split()


def cli(args, env):
    proc = subprocess.run([sys.executable, "-m", "picochat.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"picochat {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def kept_jsonl(monkeypatch, tmp_path):
    with FakeOpenAI() as fake:
        monkeypatch.setenv(KEY_ENV, fake.api_key)
        (tmp_path / "prompt.txt").write_text("You are careful and helpful. Decline harmful requests briefly.")
        cfg = C.load(write_config(fake, tmp_path, respond={"prompt": str(tmp_path / "prompt.txt"),
                                                           "multi_turn_fraction": 0.5, "max_user_turns": 2}))
        write_questions(cfg.out_dir, make_questions(2, 2, split_test_roots=1))
        run_respond(cfg)
        run_filter(cfg)
    return cfg.out_dir / "filter" / "kept.jsonl"


@pytest.mark.slow
def test_train_sft_accepts_safety_output(kept_jsonl, tmp_path):
    kept = read_jsonl(kept_jsonl)
    assert len(kept) >= 5 and any(len(r["messages"]) > 2 for r in kept)  # single- and multi-turn records
    home, src = tmp_path / "home", tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    for i in range(6):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    env = dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")
    cli(["data", "prepare", "--source", f"local:{src}", "--name", "tiny"], env)
    cli(["tokenizer", "train", "--data", "tiny", "--vocab-size", "300"], env)
    cli(["train", "base", "--data", "tiny", "--depth", "1", "--seq-len", "64", "--device-batch-size", "2",
         "--steps", "2", "--eval-every", "0", "--device", "cpu", "--loader-workers", "0"], env)
    proc = cli(["train", "sft", "--model", "base/d1", "--tasks", "", "--data", str(kept_jsonl), "--seq-len", "512",
                "--device-batch-size", "2", "--steps", "3", "--eval-every", "0", "--log-every", "1",
                "--device", "cpu", "--loader-workers", "0"], env)
    out = proc.stdout + proc.stderr
    # the loader reports what it read: every kept record valid, none skipped
    assert f"{len(kept)} conversations" in out and "0 bad" in out, out
    state = json.loads((home / "checkpoints" / "sft" / "d1" / "step_000003" / "state.json").read_text())
    losses = [h["loss"] for h in state["history"] if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
