"""An imported nanochat checkpoint works with the rest of picochat, as a user runs it: `picochat chat -p`,
`picochat serve` + the OpenAI SDK and the safety eval, `picochat eval` (AIME included), SFT on top (the tokenizer
travels), `export hf` (2025 design -> transformers' nanochat; 2026 refused by name), and a
speculative draft with another vocabulary refused by name."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from picochat import checkpoint as ck
from picochat.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nanochat"  # scripts/make_nanochat_fixtures.py
AIME = Path(__file__).resolve().parent / "fixtures" / "aime" / "aime_made_up.jsonl"  # scripts/make_aime_fixture.py


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One home with both fixtures imported (and no home tokenizer: each checkpoint brings its own)."""
    assert FIXTURES.is_dir(), f"nanochat fixtures missing: {FIXTURES}"  # committed: missing fails, never skips
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PICOCHAT_HOME", str(home))
        for name, tag in (("v2025_d2", "nc/v2025"), ("v2026_d2", "nc/v2026")):
            assert main(["import", "nanochat", "--path", str(FIXTURES / name / "base_checkpoints" / "d2"),
                         "--tag", tag]) == 0
        yield home


def picochat(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "picochat.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_chat_one_shot(home):
    r = picochat("chat", "--model", "nc/v2026", "-p", "Hello there", "--temperature", "0", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    model, _ = ck.load_model("nc/v2026")
    tok = ck.load_tokenizer("nc/v2026")
    from picochat.inference.chat import Reply, stream_chat
    from picochat.inference.engine import Engine
    from picochat.inference.sampling import Sampling
    reply = Reply()
    expected = "".join(stream_chat(Engine(model, tok), tok, [{"role": "user", "content": "Hello there"}], 12,
                                   Sampling(0.0), reply=reply))
    assert r.stdout.strip() == expected.strip() and expected.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_sdk_and_the_safety_eval(home, tmp_path):
    import openai
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "picochat.cli", "serve", "--model", "nc/v2025", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="nc/v2025", temperature=0, max_tokens=10,
                                               messages=[{"role": "user", "content": "Who are you?"}])
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        assert isinstance(choice.message.content, str)
        # the safety eval reaches the served model over HTTP, like any OpenAI-compatible target
        from fake_openai import make_questions, write_questions
        out = tmp_path / "safety"
        write_questions(out, make_questions(1, 1, split_test_roots=1))
        (tmp_path / "safety.toml").write_text(
            f'out_dir = "{out}"\n[roles.target]\nbase_url = "http://127.0.0.1:{port}/v1"\nmodel = "nc/v2025"\n'
            'api_key_env = ""\ncheck_model = false\nmax_tokens = 16\ntemperature = 0.0\n')
        r = picochat("safety", "eval", "--config", str(tmp_path / "safety.toml"), "--judge", "offline", "--limit", "2",
                     "--name", "nc")
        assert r.returncode == 0, r.stderr
        summary = json.loads((out / "eval" / "nc" / "summary.json").read_text())
        assert summary["attack"]["n"] == 2 and summary["benign"]["labelled"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_eval_every_kind_of_task_including_aime(home, tmp_path):
    args = ["eval", "chat", "--model", "nc/v2026", "--tasks", "arithmetic,spelling,aime", "--limit", "2",
            "--max-tokens", "8", "--data-file", f"aime={AIME}"]
    r = picochat(*args)
    assert r.returncode == 0, r.stderr
    for task in ("arithmetic", "spelling", "aime"):
        assert task in r.stdout
    r = picochat("eval", "base", "--model", "nc/v2025", "--tasks", "arithmetic", "--limit", "2", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr


def test_sft_on_top_keeps_the_nanochat_tokenizer(home):
    r = picochat("train", "sft", "--model", "nc/v2026", "--tag", "sft/nc", "--steps", "2", "--device-batch-size", "2",
                 "--eval-every", "0", "--tasks", "spelling=1", "--task-size", "20", "--loader-workers", "0")
    assert r.returncode == 0, r.stderr
    assert ck.load_tokenizer("sft/nc").same_encoding(ck.load_tokenizer("nc/v2026"))
    assert ck.read_checkpoint("sft/nc").config == ck.read_checkpoint("nc/v2026").config


def test_draft_with_another_vocabulary_is_refused_by_name(home, tmp_path):
    from picochat.tokenizer import Tokenizer
    other = Tokenizer.train(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=300)
    model, c = ck.load_model("nc/v2025")
    ck.save_checkpoint("other/tok", 0, model, c.config, {"stage": "test"}, tokenizer=other)  # same size, other tokens
    r = picochat("serve", "--model", "nc/v2025", "--draft", "other/tok", "--port", str(_free_port()))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "--draft other/tok has another vocabulary than --model nc/v2025" in r.stderr


def test_export_hf_2025_design_and_2026_refused_by_name(home, tmp_path):
    pytest.importorskip("transformers")
    from picochat.export.hf import _load_hf_model
    out = tmp_path / "hf2025"
    assert main(["export", "hf", "--model", "nc/v2025", "--out", str(out)]) == 0
    hf = _load_hf_model(out)
    model, _ = ck.load_model("nc/v2025")
    ids = torch.tensor([ck.load_tokenizer("nc/v2025").encode("ROMEO. But soft", prepend="<|bos|>")])
    with torch.no_grad():
        diff = (hf(ids).logits.float() - model(ids)).abs().max().item()
    assert diff < 5e-3  # transformers computes rotary tables in fp32, nanochat 2025 rounded them to bf16
    r = picochat("export", "hf", "--model", "nc/v2026", "--out", str(tmp_path / "hf2026"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    for field in ("value_embeds", "layer_scalars", "smear", "backout", "window_pattern"):
        assert field in r.stderr
    assert not (tmp_path / "hf2026").exists()
