r"""AIME (aime = aime-2024, aime-2025): exact-match grading of integer answers (0-999), prompts,
data loading (`--data-file` JSONL, else the Hugging Face Hub), pass@k, voting.

Grading rules (`extract_answer`; `grade` applies the same number parser to the reference):

1. **The last box wins.** The answer is the content of the last complete, non-empty
   `\boxed{...}` or `\fbox{...}` (braces balanced, nesting allowed, `\{ \}` ignored), or of
   the brace-less form `\boxed 5`. Only that box is read: if it does not hold a valid answer
   the result is None -- earlier boxes and the surrounding text are not consulted.
2. **Ignored boxes.** An empty box (`\boxed{}`, e.g. an echo of the instructions) and an
   unbalanced one (`\boxed{42` from a truncated generation) count as no box.
3. **Inside a box**, after clean-up, exactly one number must remain:
   - `$`, `\left`/`\right`, `\displaystyle`, `\!` are dropped; `\text{}`, `\textbf{}`,
     `\mathrm{}`, `\mathbf{}`, `\mbox{}`... are unwrapped (`\boxed{\textbf{42}}` -> 42);
   - degrees (`42^\circ`, `42^{\circ}`, `42°`, `\degree`) and `%` / `\%` are dropped;
   - with `=`, only what follows the last `=` counts (`\boxed{x = 42}`, `\boxed{n=42}`,
     `\boxed{a+b = 40+2 = 42}` -> 42), unless what precedes it is a list of values
     (`\boxed{x=3, y=4}` -> None);
   - words are ignored, so units are fine (`\boxed{42 \text{ cm}}` -> 42), and so are
     digits right after `^` or `_` (`cm^2`, `a_1`) and digits glued to a preceding letter;
   - two or more numbers are ambiguous -> None (`\boxed{3, 4}`, `\boxed{3,4}`, `\boxed{2 \cdot 5}`);
     a number carrying an exponent is an unevaluated expression -> None (`\boxed{2^{10}}`).
4. **Numbers.** Leading zeros are fine (`007` -> 7; `073` == `73`); a `+` sign is fine
   (`+5` -> 5); a `-` directly before the digits (and not after an operand) is a sign, so `-5`
   is out of range -> None; unicode minus counts. Decimals count when integer-valued
   (`12.0`, `12.00` -> 12; `12.5`, `.5` -> None); a trailing sentence period is not a decimal
   point (`42.` -> 42). Scientific notation (`1e3`) is never an AIME answer form -> None.
5. **Thousands separators** group digits into one number: `1,000`, `1{,}000`, `1\,000`,
   `1~000`, `1\ 000`, `1 000` (one plain space) and thin/no-break spaces are 1000 (then out
   of range -> None). A separator groups only when a `[1-9]\d{0,2}` group is followed by
   groups of exactly three digits, so `3,4`, `3, 4` and `3 4` stay two numbers (a
   space-separated list like `5 100` is read as 5100: a documented limitation).
6. **Fractions** are evaluated exactly: `\frac{a}{b}`, `\dfrac`, `\tfrac`, `\frac12`, `a/b`.
   An integer-valued fraction is that integer (`\boxed{\frac{84}{1}}` -> 84, `\dfrac{84}{2}`
   -> 42: the value is the answer, which is exact matching, not fuzzy); a non-integer
   fraction (`\frac{1}{2}`) or one with non-numeric parts (`\frac{\sqrt3}{2}`) -> None.
7. **Range.** Only integers 0..999 are answers; anything else -> None.
8. **No box -> text fallback.** The *last number token* of the whole text decides, with the
   same token rules (fractions are one token, exponents/subscripts/identifier digits are not
   tokens, thousands separators group). So `... $\frac{1}{2}$` -> None (never the
   denominator 2), `**Answer: 42.**` -> 42, `42 cm` -> 42, `is 12.5` -> None, `1,000` -> None,
   `1e3` -> None. No number at all -> None.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

from picochat.common import PicochatError, hub_reachable, read_jsonl_numbered
from picochat.tasks.base import EvalTask

KIND = "generative"
FIELDS = '{"question": str, "answer": int 0-999 or its string} (also problem/Problem, Answer)'

PROMPT_TEMPLATE = (
    "Solve the following AIME problem. Reason step by step, then give the final answer "
    "-- an integer from 0 to 999 -- in \\boxed{{}}, e.g. \\boxed{{42}}.\n\n"
    "Problem: {question}\n"
)


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question.strip())


# --------------------------------------------------------------------------- tokenising numbers

_SEP = "\u2009"  # every explicit digit-grouping mark is turned into this thin space
_NUM = rf"(?:[1-9]\d{{0,2}}(?:[,{_SEP}]\d{{3}})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_TOKEN = re.compile(
    r"(?P<frac>\\[dt]?frac\s*(?:\{(?P<fa>[^{}]*)\}|(?P<fa1>\d))\s*(?:\{(?P<fb>[^{}]*)\}|(?P<fb1>\d)))"
    rf"|(?P<sign>(?<![\w)\]}}.])[-+])?(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?"
)
_UNWRAP = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|operatorname"
    r"|boldsymbol|bm|emph|underline)\s*\{([^{}]*)\}"
)
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|°")
_SPACING = re.compile(r"\\[,;: ]|~|[\u00a0\u2009\u202f]")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _normalize(s: str) -> str:
    s = s.replace("\u2212", "-").replace("\u2013", "-")
    s = _DEGREE.sub("", s)
    for _ in range(5):  # nested \text{\textbf{42}}
        t = _UNWRAP.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = re.sub(r"\\left|\\right|\\displaystyle|\\!", "", s)
    s = re.sub(r"\\?%|\$", " ", s)
    s = s.replace("{,}", ",")  # LaTeX's comma-without-space, as in 1{,}000
    s = _SPACING.sub(_SEP, s)
    s = re.sub(r"(?<=\d) (?=\d{3}(?!\d))", _SEP, s)  # 1 000: a plain space grouping digits
    # a grouping mark not between digit groups is just a space
    s = re.sub(rf"{_SEP}(?!\d)|(?<!\d){_SEP}", " ", s)
    return s


def _num_value(text: str) -> Fraction | None:
    text = text.replace(",", "").replace(_SEP, "")
    if "e" in text or "E" in text:
        return None  # scientific notation is not an AIME answer form
    return Fraction(text)


def _tokens(s: str) -> list[Fraction | None]:
    """The number tokens of normalised text, in order; None for a token with no usable value."""
    out: list[Fraction | None] = []
    for m in _TOKEN.finditer(s):
        before = s[max(0, m.start() - 16):m.start()].rstrip(" {")
        if before.endswith(("^", "_")):
            continue  # exponent or subscript
        if m.start() > 0 and (s[m.start() - 1].isalpha() and s[m.start() - 1].isascii()):
            continue  # digits glued to a letter: an identifier such as x2 or AIME2024
        if m.group("frac") is not None:
            a = m.group("fa") if m.group("fa") is not None else m.group("fa1")
            b = m.group("fb") if m.group("fb") is not None else m.group("fb1")
            ta, tb = _tokens(a), _tokens(b)
            if (len(ta) == 1 and len(tb) == 1 and ta[0] is not None and tb[0] is not None
                    and tb[0] != 0 and not re.search(r"[A-Za-z\\]", a + b)):
                out.append(ta[0] / tb[0])
            else:
                out.append(None)
            continue
        value = _num_value(m.group("num"))
        if value is not None and m.group("sign") == "-":
            value = -value
        if m.group("den") is not None:
            den = _num_value(m.group("den"))
            value = None if value is None or not den else value / den
        if re.match(r"\s*\^", s[m.end():]):
            value = None  # 2^{10}: an unevaluated power
        out.append(value)
    return out


def _as_answer(value: Fraction | None) -> int | None:
    if value is None or value.denominator != 1 or not 0 <= value <= 999:
        return None
    return int(value)


def parse_integer(s: str) -> int | None:
    """Parse one answer (the content of a box, or a reference answer) under rules 3-7."""
    s = _normalize(s)
    if "=" in s:
        head, s = s.rsplit("=", 1)
        if re.search(r"[,;]", head) and _tokens(head):
            return None  # x=3, y=4: a list of values, ambiguous
    toks = _tokens(s)
    return _as_answer(toks[0]) if len(toks) == 1 else None


def _last_box(text: str) -> str | None:
    """Content of the last complete, non-empty box (rules 1-2), or None."""
    found = None
    for m in _BOX.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth != 0:
                continue  # unbalanced: ignored
            content = text[i + 1:j]
        else:  # \boxed 5 (or \boxed5): the next run of non-space characters
            tok = re.match(r"[-+]?[0-9.][^\s$\\{}]*", text[i:])
            if tok is None:
                continue
            content = tok.group(0)
        if content.strip():
            found = content
    return found


def extract_answer(text: str) -> int | None:
    """The integer answer (0-999) a response commits to, or None; see the module rules."""
    box = _last_box(text)
    if box is not None:
        return parse_integer(box)
    toks = _tokens(_normalize(text))
    return _as_answer(toks[-1]) if toks else None


def _reference(answer: str | int) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"unparsable AIME reference answer {answer!r}")
    if isinstance(answer, int):
        value = answer if 0 <= answer <= 999 else None
    else:
        value = parse_integer(str(answer))
    if value is None:
        raise ValueError(f"unparsable AIME reference answer {answer!r} (want an integer 0-999)")
    return value


def grade(text: str, answer: str | int) -> bool:
    """True iff the response's extracted answer equals the reference as an integer."""
    return extract_answer(text) == _reference(answer)


# --------------------------------------------------------------------------- data

_QUESTION_KEYS = ("question", "problem", "Problem", "Question")
_ANSWER_KEYS = ("answer", "Answer")
_ID_KEYS = ("id", "ID", "problem_idx")


def _row(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise PicochatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    q = next((obj[k] for k in _QUESTION_KEYS if k in obj), None)
    a = next((obj[k] for k in _ANSWER_KEYS if k in obj), None)
    if not isinstance(q, str) or not q.strip():
        raise PicochatError(f"{where}: missing 'question' (or 'problem'/'Problem') text")
    if a is None:
        raise PicochatError(f"{where}: missing 'answer' (or 'Answer')")
    try:
        _reference(a)
    except ValueError:
        raise PicochatError(f"{where}: answer {a!r} is not an integer 0-999") from None
    row = {"question": q, "answer": str(a).strip()}
    ident = next((obj[k] for k in _ID_KEYS if k in obj), None)
    if ident is not None:
        row["id"] = str(ident)
    return row


def load_aime(path: str | os.PathLike) -> list[dict]:
    """Read AIME problems from JSONL: one object per line with question/answer fields
    (also problem/answer and Problem/Answer). Returns [{"question", "answer"[, "id"]}]."""
    path = Path(path)
    return [_row(obj, f"{path}: line {n}") for n, obj in read_jsonl_numbered(path, "AIME")]


_HF_SOURCES = {
    2024: [[("Maxwell-Jia/AIME_2024", None, "train")]],
    2025: [[("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")],
           [("math-ai/aime25", None, "test")]],
}


def load_aime_hf(year: int) -> list[dict]:
    """Download AIME `year` (2024 or 2025) from the Hugging Face Hub (needs `datasets`)."""
    hint = "pass --data-file path.jsonl (one {\"question\", \"answer\"} object per line)"
    if year not in _HF_SOURCES:
        raise PicochatError(f"no online AIME source for {year} (have {sorted(_HF_SOURCES)}); {hint}")
    try:
        import datasets  # optional dependency: pip install 'picochat[hf]'
    except ImportError:
        raise PicochatError(f"loading AIME {year} online needs `pip install datasets`; or {hint}") from None
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if not offline and not hub_reachable():
        raise PicochatError(f"cannot reach the Hugging Face Hub to download AIME {year} (offline?); {hint}")
    errors = []
    for parts in _HF_SOURCES[year]:
        try:
            rows = []
            for name, config, split in parts:
                ds = datasets.load_dataset(name, config, split=split)
                rows += [_row(dict(r), f"{name}[{i}]") for i, r in enumerate(ds)]
            return rows
        except Exception as e:  # network, auth, schema...: try the next source
            errors.append(f"{parts[0][0]}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise PicochatError(f"could not load AIME {year} from the Hub ({'; '.join(errors)}); {hint}")


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    """`data_file`'s problems, else the Hub's for the year (aime: 2024)."""
    if data_file:
        rows, source = load_aime(data_file), data_file
    else:
        year = 2025 if name == "aime-2025" else 2024
        rows, source = load_aime_hf(year), f"hf:AIME {year}"
    return EvalTask(
        name, "generative", rows[:limit], source, max_tokens=1024,
        grade=lambda ex, reply: grade(reply, ex["answer"]), extract=extract_answer,
        chat_prompt=lambda ex: [{"role": "user", "content": format_prompt(ex["question"])}],
        base_prompt=lambda ex: format_prompt(ex["question"]) + "\nSolution:", stop_text=())


# --------------------------------------------------------------------------- metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples, c correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: list[int | None]) -> int | None:
    """Most common non-None answer; ties go to the tied answer that appears first; None if none."""
    counts = Counter(a for a in answers if a is not None)  # most_common: ties in first-seen order
    return counts.most_common(1)[0][0] if counts else None
