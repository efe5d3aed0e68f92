"""Data-quality report: works on any conversation JSONL, with and without matplotlib."""
import builtins
import json

from picochat.safety.report import analyze, distinct_n, load_any, run_report


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


ARBITRARY = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],  # bare list
    {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                                    {"type": "python_output", "text": "4"},
                                                    {"type": "text", "text": "It is 4."}]}]},  # tool-use parts
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "assistant", "content": "starts wrong"}]},
    "{not json",
    {"messages": [{"role": "user", "content": "tell me a joke"}, {"role": "assistant", "content": "I can't help with that."}],
     "meta": {"domain": "hate", "strategy": "roleplay_simulation", "scores": {"safety_integrity": 5, "helpfulness": 2}}},
]


def test_report_on_arbitrary_jsonl(tmp_path):
    src = _write(tmp_path / "any.jsonl", ARBITRARY)
    a = run_report(src, tmp_path / "rep")
    assert a["conversations"] == 4 and a["invalid_lines"] == 2
    assert a["duplicates"]["exact"] == 1 and a["domains"] == {"hate": 1}
    assert a["scores"] == {"safety_integrity": {5: 1}, "helpfulness": {2: 1}}
    assert a["refusal_share_offline"]["full"] == 0.25
    md = (tmp_path / "rep" / "report.md").read_text()
    for section in ("Lengths", "Diversity", "distinct-1", "Most repeated openings", "line 4:", "invalid JSON"):
        assert section in md
    assert (tmp_path / "rep" / "lengths.png").stat().st_size > 1000 and (tmp_path / "rep" / "scores.png").exists()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["conversations"] == 4


def test_report_without_matplotlib_writes_markdown_with_a_note(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    src = _write(tmp_path / "any.jsonl", ARBITRARY)
    run_report(src, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "matplotlib is not installed" in md and not list((tmp_path / "rep").glob("*.png"))


def test_diversity_and_template_collapse(tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"I can't help with that, sorry. Topic {i}."}]}
            for i in range(10)]
    recs.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Totally different words here"}]})
    src = _write(tmp_path / "c.jsonl", recs)
    good, bad = load_any(src)
    a = analyze(good, bad, rejected=[{"reasons": ["turn 0: safety_integrity 2 < 4", "exact duplicate of c-1"]}])
    assert a["diversity"]["top_openings"][0][:2] == ["i can't help with that", 10]
    assert a["rejection_reasons"] == {"low_safety_integrity": 1, "exact duplicate of c-1": 1}
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == round(2 / 3, 4)
    run_report(src, tmp_path / "r")
    assert "template collapse" in (tmp_path / "r" / "report.md").read_text()


def test_report_of_a_run_has_eval_costs_rejected_scores_and_a_cross_table(tmp_path, monkeypatch, capsys):
    import pytest
    pytest.importorskip("openai")
    from fake_openai import KEY_ENV, FakeOpenAI, make_questions, write_config, write_questions

    from picochat.safety import config as C
    from picochat.cli import main
    from picochat.safety.evaluate import run_eval
    from picochat.safety.filter import run_filter
    from picochat.safety.respond import run_respond
    (tmp_path / "p.txt").write_text("You are careful. Decline harmful requests briefly.")
    with FakeOpenAI() as fake:
        monkeypatch.setenv(KEY_ENV, fake.api_key)
        path = write_config(fake, tmp_path, respond={"prompt": str(tmp_path / "p.txt"), "multi_turn_fraction": 0.0},
                            eval={"judge": "offline", "limit": 5})
        cfg = C.load(path)
        write_questions(cfg.out_dir, make_questions(2, 2, split_test_roots=1, marker={"cybe1-00": " [[unsafe]]"}))
        run_respond(cfg)
        run_filter(cfg)
        run_eval(cfg)
        assert main(["safety", "report", "--config", path]) == 0
    rep = cfg.out_dir / "report"
    md = (rep / "report.md").read_text()
    assert "## Safety eval" in md and "| 100.0% | 5/5 |" in md and "eval:" in md  # results and the eval's cost
    costs = json.loads((cfg.out_dir / "costs.json").read_text())
    assert f"${costs['total']['cost_usd']:.4f}" in md
    assert "Judge scores of the rejected conversations" in md and (rep / "scores_rejected.png").stat().st_size > 1000
    a = json.loads((rep / "report.json").read_text())
    assert a["rejected_scores"]["safety_integrity"] == {"1": 1}
    # the domain x strategy counts as a Markdown table, not only as a plot
    assert "| domain | roleplay_simulation | socratic_method | total |" in md
    cross = [line for line in md.splitlines() if line.startswith("| cyber |")][-1]
    assert cross == f"| cyber | 0 | 1 | {a['domains']['cyber']} |" and f"| total | 6 | 7 | {a['conversations']} |" in md
