"""Kill-safety: torn JSONL lines, SIGKILL mid-stage then rerun (no loss, no duplicates, no repeated calls)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from picochat.safety.store import JsonlStore

REPO = Path(__file__).resolve().parents[1]


def test_store_truncates_a_torn_last_line_and_never_duplicates(tmp_path):
    p = tmp_path / "s.jsonl"
    with JsonlStore(p) as s:
        s.append({"id": "a", "v": 1})
        s.append({"id": "b", "v": 2})
        s.append({"id": "a", "v": 3})  # already done: ignored
    with open(p, "a") as f:
        f.write('{"id": "c", "v"')  # what a kill -9 in the middle of a write leaves
    with JsonlStore(p) as s:
        assert set(s.records) == {"a", "b"} and s.get("a")["v"] == 1
        s.append({"id": "c", "v": 4})
    lines = p.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


pytest.importorskip("openai")


def _kill_midway(cfg_path: str, stage: str, out: Path, at_least: int = 8) -> list[str]:
    """Run `safety <stage>` in a subprocess, SIGKILL it once `out` has `at_least` records; return their ids."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "picochat.cli", "safety", stage, "--config", cfg_path],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= at_least:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    return [json.loads(x)["id"] for x in out.read_text().splitlines() if x.endswith("}")]


def _respond_setup(fake, tmp_path, monkeypatch):
    """A respond stage over 42 training questions with a slow blue role: (config path, config, questions)."""
    from fake_openai import KEY_ENV, make_questions, write_config, write_questions

    from picochat.safety import config as C
    monkeypatch.setenv(KEY_ENV, fake.api_key)
    (tmp_path / "prompt.txt").write_text("You are careful and kind. Decline harmful requests.")
    cfg_path = write_config(fake, tmp_path, roles={"blue": {"concurrency": 2}},
                            respond={"prompt": str(tmp_path / "prompt.txt"), "multi_turn_fraction": 0.0})
    cfg = C.load(cfg_path)
    qs = make_questions(3, 2)  # 42 training questions
    write_questions(cfg.out_dir, qs)
    fake.delay["blue"] = 0.1  # ~2 s of work: slow enough to kill it half-way
    return cfg_path, cfg, qs


def test_sigkill_mid_respond_then_rerun(tmp_path, monkeypatch):
    from fake_openai import FakeOpenAI

    from picochat.safety.respond import run_respond
    from picochat.safety.store import read_jsonl
    with FakeOpenAI() as fake:
        cfg_path, cfg, qs = _respond_setup(fake, tmp_path, monkeypatch)
        out = cfg.out_dir / "respond" / "conversations.jsonl"
        before = _kill_midway(cfg_path, "respond", out)
        assert 8 <= len(before) < 42
        fake.delay["blue"] = 0.0
        s = run_respond(cfg)
        recs = read_jsonl(out)
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)) == 42 and s["conversations"] == 42  # nothing lost, nothing duplicated
        assert ids[:len(before)] == before
        # the fake saw exactly one request for every record finished before the kill
        system = (tmp_path / "prompt.txt").read_text().strip()
        by_q = {q["id"]: q for q in qs}
        for rid in before:
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": by_q[rid[2:]]["question"]}]
            assert fake.request_counts[fake.messages_key("blue", msgs)] == 1, rid
        # at most the calls in flight at kill time (concurrency 2) were sent twice
        assert 42 <= fake.calls["blue"] <= 42 + 2
        # and a full rerun, even with outputs deleted but the cache kept, makes no call at all
        out.unlink()
        calls = fake.calls["blue"]
        run_respond(cfg)
        assert fake.calls["blue"] == calls and len(read_jsonl(out)) == 42


@pytest.mark.parametrize("stage", ["questions", "filter"])
def test_sigkill_mid_stage_then_rerun(stage, tmp_path, monkeypatch):
    """Same for the red-team and filter stages: total calls <= one per record + the 2 in flight at the kill."""
    from fake_openai import KEY_ENV, FakeOpenAI, make_questions, small_seed_bank, write_config, write_questions

    from picochat.safety import config as C
    from picochat.safety.filter import run_filter
    from picochat.safety.redteam import run_questions
    from picochat.safety.respond import run_respond
    from picochat.safety.store import read_jsonl
    (tmp_path / "prompt.txt").write_text("You are careful and kind. Decline harmful requests.")
    role = {"questions": "red", "filter": "judge"}[stage]
    with FakeOpenAI() as fake:
        monkeypatch.setenv(KEY_ENV, fake.api_key)
        cfg_path = write_config(fake, tmp_path, roles={role: {"concurrency": 2}},
                                questions={"seed_bank": small_seed_bank(tmp_path / "bank.json", 3), "num_seeds": 21,
                                           "per_seed": 2},
                                respond={"prompt": str(tmp_path / "prompt.txt"), "multi_turn_fraction": 0.0})
        cfg = C.load(cfg_path)
        if stage == "filter":
            write_questions(cfg.out_dir, make_questions(3, 2))
            run_respond(cfg)
        out = cfg.out_dir / ("questions/raw.jsonl" if stage == "questions" else "filter/judgements.jsonl")
        fake.delay[role] = 0.1
        before = _kill_midway(cfg_path, stage, out)
        fake.delay[role] = 0.0
        {"questions": run_questions, "filter": run_filter}[stage](cfg)
        ids = [r["id"] for r in read_jsonl(out)]
        assert len(ids) == len(set(ids)) == 42 and ids[:len(before)] == before
        assert 42 <= fake.calls[role] <= 42 + 2


def test_usage_survives_sigkill_and_a_cached_rerun_keeps_the_spend(tmp_path, monkeypatch):
    """Costs are logged per request (not in a `finally`), and costs.json sums every run of a stage."""
    from fake_openai import FakeOpenAI

    from picochat.safety.report import run_report
    from picochat.safety.respond import run_respond
    from picochat.safety.usage import aggregate
    with FakeOpenAI() as fake:
        cfg_path, cfg, _ = _respond_setup(fake, tmp_path, monkeypatch)
        fake.fail_next("blue", "500", "429")  # retries must be counted too
        out = cfg.out_dir / "respond" / "conversations.jsonl"
        _kill_midway(cfg_path, "respond", out)
        killed = aggregate(cfg.out_dir / "usage.jsonl")["total"]
        # every request the fake answered is logged, except at most the 2 on the wire at the kill
        assert fake.calls["blue"] - 2 <= killed["requests"] <= fake.calls["blue"] and killed["retries"] == 2
        assert killed["cost_usd"] > 0
        fake.delay["blue"] = 0.0
        run_respond(cfg)
        first = json.loads((cfg.out_dir / "costs.json").read_text())
        assert fake.calls["blue"] - 2 <= first["total"]["requests"] <= fake.calls["blue"]
        assert first["total"]["cost_usd"] > killed["cost_usd"]
        # a rerun served entirely from the cache adds cache hits, not cost, and erases nothing
        out.unlink()
        run_respond(cfg)
        again = json.loads((cfg.out_dir / "costs.json").read_text())
        st = again["stages"]["respond"]
        assert again["total"]["cost_usd"] == first["total"]["cost_usd"] == st["total"]["cost_usd"]
        assert again["total"]["requests"] == first["total"]["requests"] and st["runs"] == 3
        assert st["roles"]["blue"]["retries"] == {"500": 1, "429": 1} and st["total"]["cache_hits"] >= 42
    rep = run_report(out, tmp_path / "rep", run_dir=cfg.out_dir)
    assert rep["pipeline"]["cost_usd"] == first["total"]["cost_usd"]
    assert f"${first['total']['cost_usd']:.4f}" in (tmp_path / "rep" / "report.md").read_text()
