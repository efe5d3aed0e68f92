"""Write tests/fixtures/aime/aime_made_up.jsonl: made-up problems in the AIME JSONL format
(one {"question", "answer"} object per line, answer an integer 0-999 as a string, LaTeX in $...$ as in the real
sets), each answer computed here, so the AIME loader, grader and `picochat eval --tasks aime` are tested
without the real problems (which the repo does not carry: pass them with `--data-file`).
Usage: python scripts/make_aime_fixture.py [OUT]   (the tests check the committed file equals problems())."""
import json
import sys
from math import comb
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "aime" / "aime_made_up.jsonl"


def problems() -> list[dict]:
    rows = []
    for a, b in ((7, 222), (3, 2026), (12, 345)):
        rows.append({"question": f"Find the remainder when $${a}^{{{b}}}$$ is divided by $1000$.\n",
                     "answer": str(pow(a, b, 1000))})
    for n in (360, 2024):
        s = sum(d for d in range(1, n + 1) if n % d == 0)
        rows.append({"question": f"Let $S$ be the sum of the positive divisors of ${n}$. Find the remainder when $S$ "
                                 f"is divided by $1000$.\n", "answer": str(s % 1000)})
    for n, k in ((20, 10), (30, 7)):
        rows.append({"question": f"Find the remainder when $\\binom{{{n}}}{{{k}}}$ is divided by $1000$.\n",
                     "answer": str(comb(n, k) % 1000)})
    rows.append({"question": "How many ordered pairs $(x, y)$ of positive integers satisfy $x + y = 100$?\n",
                 "answer": "99"})
    rows.append({"question": "Find the remainder when $10^{6}$ is divided by $1000$.\n", "answer": "0"})
    rows.append({"question": "A rectangle has side lengths $12$ and $35$. Find the length of its diagonal.\n",
                 "answer": "37"})
    return rows


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in problems()), encoding="utf-8")
    print(f"wrote {len(problems())} problems to {out}")


if __name__ == "__main__":
    main()
