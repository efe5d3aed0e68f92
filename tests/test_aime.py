"""AIME grader: the documented extraction rules, pass@k, majority vote, data loading."""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from picochat.common import PicochatError
from picochat.tasks import aime
from picochat.tasks.aime import (extract_answer, format_prompt, grade, load_aime, load_aime_hf,
                                majority_vote, parse_integer, pass_at_k)

REPO = Path(__file__).resolve().parents[1]
AIME_FILE = REPO / "tests" / "fixtures" / "aime" / "aime_made_up.jsonl"  # made-up problems: scripts/make_aime_fixture.py

# (response text, expected extracted answer) -- one line per rule in aime.py's docstring
CASES = [
    # 1. last box wins, box forms
    (r"so the answer is $\boxed{42}$.", 42),
    (r"First \boxed{12}, but on reflection \boxed{34}", 34),
    (r"\boxed{\boxed{8}}", 8),
    (r"The answer is \boxed 5", 5),
    (r"hence $\boxed 7$.", 7),
    (r"\fbox{73}", 73),
    (r"\boxed{5} and later \boxed{12.5}", None),   # last box invalid -> None, no fallback
    # 2. empty / unbalanced boxes are no box
    (r"I'll put it in \boxed{}. The answer is 17", 17),
    (r"\boxed{5} and \boxed{ }", 5),
    (r"so the total is \boxed{42", 42),
    # 3. clean-up inside a box
    (r"\boxed{\text{42}}", 42),
    (r"\boxed{\textbf{42}}", 42),
    (r"\boxed{\text{\textbf{42}}}", 42),
    (r"\boxed{42^\circ}", 42),
    (r"\boxed{42^{\circ}}", 42),
    ("\\boxed{42°}", 42),
    (r"\boxed{x = 42}", 42),
    (r"\boxed{n=42}", 42),
    (r"\boxed{a+b = 40+2 = 42}", 42),
    (r"\boxed{x=3, y=4}", None),
    (r"\boxed{42 \text{ cm}}", 42),
    (r"\boxed{42\text{ cm}^2}", 42),
    (r"\boxed{42\%}", 42),
    (r"\boxed{\left(42\right)}", 42),
    (r"\boxed{\displaystyle 42}", 42),
    (r"\boxed{3, 4}", None),
    (r"\boxed{3,4}", None),
    (r"\boxed{2 \cdot 5}", None),
    (r"\boxed{2^{10}}", None),
    (r"\boxed{n}", None),
    # 4. signs, decimals, leading zeros, scientific notation
    (r"\boxed{-5}", None),
    ("\\boxed{\u22125}", None),   # unicode minus
    (r"\boxed{+5}", 5),
    (r"\boxed{12.0}", 12),
    (r"\boxed{12.00}", 12),
    (r"\boxed{12.5}", None),
    (r"\boxed{42.}", 42),
    (r"\boxed{007}", 7),
    (r"\boxed{073}", 73),
    (r"\boxed{1e3}", None),
    (r"the answer is 1e3", None),
    # 5. thousands separators
    (r"\boxed{1,000}", None),
    (r"\boxed{1{,}000}", None),
    (r"\boxed{1\,000}", None),
    (r"\boxed{1 000}", None),
    (r"the answer is 1,000", None),
    ("the answer is 1\u2009000", None),
    (r"\boxed{3 4}", None),
    # 6. fractions
    (r"\boxed{\frac{84}{1}}", 84),
    (r"\boxed{\dfrac{84}{2}}", 42),
    (r"\boxed{84/2}", 42),
    (r"\boxed{\frac{1}{2}}", None),
    (r"\boxed{\tfrac12}", None),
    (r"\boxed{\frac{\sqrt{3}}{2}}", None),
    # 7. range
    (r"\boxed{0}", 0),
    (r"\boxed{999}", 999),
    (r"\boxed{1000}", None),
    # 8. text fallback: last number token
    (r"**Answer: 42.**", 42),
    (r"It is 42 cm", 42),
    (r"We get 5 and then $\frac{1}{2}$.", None),   # never the denominator 2
    (r"We get 5 and then $\frac{84}{2}$.", 42),
    (r"the probability is 12.5", None),
    (r"answer = -5", None),
    (r"answer 10 - 5", 5),                         # a spaced minus is an operator, not a sign
    (r"$x^2 = 49$, so x = 7", 7),
    (r"x_1 = 3, so the answer is $a_{12}$", 3),    # subscripts are not numbers
    (r"computed for AIME2024", None),              # digits glued to letters: identifier
    (r"the answer is 017", 17),
    ("", None),
    ("no numbers here", None),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_case_table_is_big_and_distinct():
    assert len(CASES) >= 30
    assert len({t for t, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("text,ref,ok", [
    (r"\boxed{73}", "073", True),
    (r"\boxed{073}", 73, True),
    (r"\boxed{336}", r"336^\circ", True),
    (r"\boxed{336^\circ}", "336", True),
    (r"\boxed{74}", "073", False),
    (r"no answer", "5", False),
    (r"\boxed{12.5}", 12, False),
    (r"\boxed{5.0}", "5", True),
    (r"The answer is 5", " 5 ", True),
])
def test_grade(text, ref, ok):
    assert grade(text, ref) is ok


@pytest.mark.parametrize("ref", ["abc", "", "1000", "-3", "12.5", "3, 4", 1000, -1, True])
def test_grade_unparsable_reference_raises(ref):
    with pytest.raises(ValueError):
        grade(r"\boxed{5}", ref)


def test_parse_integer():
    assert parse_integer(r"336^\circ") == 336
    assert parse_integer("073") == 73
    assert parse_integer("x") is None


def test_extract_answer_long_text_is_fast():
    text = ("step 12 gives $\\frac{3}{4}$ and x^2 = 1,234; " * 5000) + "\\boxed{42}"
    t0 = time.perf_counter()
    assert extract_answer(text) == 42
    assert extract_answer(text[:-len("\\boxed{42}")]) is None  # fallback: last token 1,234
    assert time.perf_counter() - t0 < 5.0


def test_format_prompt():
    p = format_prompt("  What is $1+1$?  ")
    assert "What is $1+1$?" in p
    assert "\\boxed{}" in p and "step by step" in p and "0 to 999" in p
    assert aime.PROMPT_TEMPLATE.format(question="Q").count("Q") >= 1


# --------------------------------------------------------------------------- pass@k / voting

def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert 0.0 <= pass_at_k(200, 7, 100) <= 1.0
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@pytest.mark.parametrize("answers,expected", [
    ([1, 2, 2, 1], 1),          # tie: the earliest-appearing tied answer
    ([2, 1, 1, 2, 3], 2),
    ([3, 1, 2], 3),
    ([5, None, 7, 7], 7),
    ([None, None, 3], 3),
    ([None, 4, None, None, 5, 5, 4], 4),
    ([None, None], None),
    ([], None),
    ([0, 0, None, None, None], 0),   # 0 is an answer, not "missing"
])
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


# --------------------------------------------------------------------------- data

def _fixture_problems() -> list[dict]:
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_aime_fixture", REPO / "scripts" / "make_aime_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.problems()


def test_load_aime_fixture():
    rows = load_aime(AIME_FILE)
    expected = _fixture_problems()  # the committed file is what its committed script writes
    assert len(rows) == len(expected) == 10
    assert [(r["question"], r["answer"]) for r in rows] == [(e["question"], e["answer"]) for e in expected]
    for r in rows:
        assert r["question"].strip()
        a = int(r["answer"])
        assert 0 <= a <= 999
        assert parse_integer(r["answer"]) == a


def test_round_trip_on_fixture_answers():
    for r in load_aime(AIME_FILE):
        a = r["answer"]
        text = f"... after some work we find \\boxed{{{a}}}"
        assert grade(text, a)
        assert grade(text, int(a))
        assert not grade(text, (int(a) + 1) % 1000)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_load_aime_bad_line_names_line_number(tmp_path):
    p = _write(tmp_path, "bad.jsonl", [json.dumps({"question": "Q1", "answer": "5"}), "{not json"])
    with pytest.raises(PicochatError, match="line 2"):
        load_aime(p)


def test_load_aime_missing_field_names_line_number(tmp_path):
    p = _write(tmp_path, "bad.jsonl", [json.dumps({"question": "Q1", "answer": "5"}),
                                       "", json.dumps({"question": "Q3"})])
    with pytest.raises(PicochatError, match="line 3"):
        load_aime(p)


def test_load_aime_bad_answer_and_non_object(tmp_path):
    with pytest.raises(PicochatError, match="line 1"):
        load_aime(_write(tmp_path, "a.jsonl", [json.dumps({"question": "Q", "answer": "1/2"})]))
    with pytest.raises(PicochatError, match="line 1"):
        load_aime(_write(tmp_path, "b.jsonl", ["[1, 2]"]))


def test_load_aime_missing_or_empty_file(tmp_path):
    with pytest.raises(PicochatError, match="not found"):
        load_aime(tmp_path / "nope.jsonl")
    with pytest.raises(PicochatError):
        load_aime(_write(tmp_path, "empty.jsonl", [""]))


def test_load_aime_accepts_hf_field_names(tmp_path):
    p = _write(tmp_path, "hf.jsonl", [
        json.dumps({"ID": "2024-I-1", "Problem": "P1", "Solution": "...", "Answer": 204}),
        json.dumps({"problem": "P2", "answer": "073", "id": 7}),
        json.dumps({"question": "P3", "answer": "25"}),
    ])
    rows = load_aime(p)
    assert [r["question"] for r in rows] == ["P1", "P2", "P3"]
    assert [int(r["answer"]) for r in rows] == [204, 73, 25]
    assert rows[0]["id"] == "2024-I-1" and rows[1]["id"] == "7" and "id" not in rows[2]


def test_load_aime_hf_offline_fails_fast(monkeypatch):
    monkeypatch.setattr(aime, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(PicochatError) as e:
        load_aime_hf(2024)
    assert time.monotonic() - t0 < 30
    assert "--data-file" in str(e.value) and "\n" not in str(e.value)


def test_load_aime_hf_unknown_year():
    with pytest.raises(PicochatError, match="--data-file"):
        load_aime_hf(1999)
