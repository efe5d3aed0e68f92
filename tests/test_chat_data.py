"""Chat data: calculator safety, JSONL validation, mixture proportions, procedural tasks."""
import json
import math

import pytest

from picochat.calculator import CalculatorError, evaluate, run_tool
from picochat.common import PicochatError
from picochat.data.conversations import load_jsonl, validate
from picochat.tasks import build_mixture, make_eval_task
from picochat.tasks.arithmetic import ArithmeticTask
from picochat.tasks.base import ListTask, TaskMixture
from picochat.tasks.identity import IdentityTask
from picochat.tasks.spelling import SpellingTask


@pytest.mark.parametrize("expr,value", [
    ("1+2", 3), ("2*(3+4)", 14), ("7/2", 3.5), ("7//2", 3), ("-3**2", -9), ("2**10", 1024),
    ("1,234 * 2", 2468), ("10 % 3", 1), ("+5", 5), ("0.1+0.2", 0.1 + 0.2),
])
def test_calculator_arithmetic(expr, value):
    assert evaluate(expr) == pytest.approx(value)


@pytest.mark.parametrize("expr,reason", [
    ("__import__('os').system('echo hi')", "not allowed"),
    ("().__class__.__bases__[0]", "not allowed"),
    ("(1).real", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("x + 1", "not allowed"),
    ("'a' * 3", "not allowed"),
    ("[1, 2]", "not (allowed|an arithmetic)"),
    ("lambda: 1", "not allowed"),
    ("9**9**9", "exponent too large"),
    ("2**1000", "exponent too large"),
    ("10**20 * 10**20", "too large"),
    ("1/0", "division by zero"),
    ("0**-1", "division by zero"),
    ("1 +", "not an arithmetic"),
    ("", "characters"),
    ("1" * 300, "characters"),
])
def test_calculator_rejects(expr, reason):
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expr)
    assert run_tool(expr).startswith("error:")


def test_calculator_times_out_on_heavy_input():
    heavy = "*".join(["(99999999 // 7 + 3)"] * 6)  # legal but we give it no time at all
    with pytest.raises(CalculatorError, match="timed out"):
        evaluate(heavy, timeout=0.0)
    # too many nodes: rejected before any work (with no time at all, any work would say "timed out")
    with pytest.raises(CalculatorError, match="expression too long"):
        evaluate("+".join(["1"] * 100), timeout=0.0)  # 199 characters, ~300 nodes


def test_run_tool_formats():
    assert run_tool("6/3") == "2" and run_tool("0.1+0.2") == "0.3" and run_tool("12*12") == "144"


@pytest.mark.parametrize("record,msg", [
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "non-empty string"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "expected 'user'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no user/assistant"),
    ({"text": "hello"}, "expected"),
])
def test_validate_rejects(record, msg):
    with pytest.raises(ValueError, match=msg):
        validate(record)


def test_validate_accepts_system_bare_list_and_tool_parts():
    assert len(validate([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}])) == 3
    validate({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]}]})


def test_load_jsonl_reports_bad_lines(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good), "{broken", json.dumps({"messages": [{"role": "user", "content": "x"}]}), "",
             json.dumps(good)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n")
    convs, report = load_jsonl(f)
    assert len(convs) == 2 and report.total == 4 and report.kept == 2
    assert [ln for ln, _ in report.bad] == [2, 3]
    assert "invalid JSON" in report.bad[0][1] and "last message" in report.bad[1][1]
    assert "line 2" in report.summary() and "2 bad lines" in report.summary()
    with pytest.raises(PicochatError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{}\n")
    with pytest.raises(PicochatError, match="no valid conversations"):
        load_jsonl(tmp_path / "bad.jsonl")


def test_mixture_samples_in_proportion_to_weights():
    a = ListTask([{"messages": [], "id": "a"}] * 10, "a")
    b = ListTask([{"messages": [], "id": "b"}] * 1000, "b")
    c = ListTask([{"messages": [], "id": "c"}] * 5, "c")
    mix = TaskMixture([a, b, c], [1, 2, 7], length=20000, seed=3)
    counts = {"a": 0, "b": 0, "c": 0}
    for i in range(len(mix)):
        counts[mix[i]["id"]] += 1
    n = len(mix)
    expected = {"a": 0.1 * n, "b": 0.2 * n, "c": 0.7 * n}
    chi2 = sum((counts[k] - expected[k]) ** 2 / expected[k] for k in counts)
    assert chi2 < 13.8  # chi-square 2 dof, p = 0.001
    # and it would notice a wrong proportion: equal weights are rejected by the same test
    wrong = {"a": n / 3, "b": n / 3, "c": n / 3}
    assert sum((counts[k] - wrong[k]) ** 2 / wrong[k] for k in counts) > 13.8
    assert [mix[i]["id"] for i in range(50)] == [TaskMixture([a, b, c], [1, 2, 7], 20000, 3)[i]["id"] for i in range(50)]


def test_spelling_split_is_disjoint_and_graded():
    train, test = SpellingTask("train", size=100000), SpellingTask("test", size=100000)
    assert len(test) > 100 and not set(train.words) & set(test.words)
    conv = test[0]
    assert validate(conv)
    grade = make_eval_task("spelling").grade  # the eval's (and RL's) grader
    assert grade(conv, conv["answer"]) and not grade(conv, "x-y-z")


def test_arithmetic_task_uses_the_calculator():
    t, grade = ArithmeticTask("train", size=50), make_eval_task("arithmetic", limit=1).grade
    for i in range(50):
        conv = t[i]
        validate(conv)
        parts = conv["messages"][1]["content"]
        assert parts[0]["type"] == "python" and parts[1]["type"] == "python_output"
        assert parts[1]["text"] == run_tool(parts[0]["text"])
        assert grade(conv, parts[2]["text"])
    assert ArithmeticTask("test", 5)[0] != t[0]


def test_identity_and_registry(tmp_path):
    ident = IdentityTask()
    assert all("{name}" not in c["messages"][1]["content"] for c in (ident[i] for i in range(len(ident))))
    custom = tmp_path / "id.json"
    custom.write_text(json.dumps({"name": "Ada {x}", "creator": "me", "pairs": [["Who?", "I am {name}."]]}))
    assert IdentityTask(custom)[0]["messages"][1]["content"] == "I am Ada {x}."
    custom.write_text("{}")
    with pytest.raises(PicochatError, match="invalid"):
        IdentityTask(custom)
    with pytest.raises(PicochatError, match="unknown task"):
        build_mixture(["nope"], [])
    with pytest.raises(PicochatError, match="no training data"):
        build_mixture([], [])
    with pytest.raises(PicochatError, match="bad weight"):
        build_mixture(["spelling=abc"], [])
