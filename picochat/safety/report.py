"""Data-quality report (stage `report`) for ANY conversation JSONL: Markdown + PNG plots.

Counts per domain and strategy, judge score distributions, rejection reasons, lengths, diversity of
assistant text (template collapse), duplicate rates, offline refusal share and, for a run directory,
every stage's failures, retries, costs and eval results. Without matplotlib the Markdown is written
alone, with a note.
"""
from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

from picochat.common import write_json_atomic, write_text_atomic
from picochat.safety.config import DIMENSIONS
from picochat.safety.dedup import find_duplicates
from picochat.safety.refusal import classify
from picochat.safety.stage import md_table, pct
from picochat.safety.store import read_conversations, read_jsonl
from picochat.safety.usage import load_costs


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))  # tool-use parts


def load_any(path: Path) -> tuple[list[dict], list[dict]]:
    good, bad = read_conversations(path)
    return [{"id": str(rec.get("id", n)), "messages": msgs, "meta": meta} for n, rec, msgs, meta in good], bad


def _stats(xs: list[int]) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "mean": round(statistics.fmean(s), 1), "median": statistics.median(s), "p10": q(0.1),
            "p90": q(0.9), "min": s[0], "max": s[-1]}


def _words(t: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", t.lower())


def distinct_n(texts: list[str], n: int) -> float | None:
    grams, total = set(), 0
    for t in texts:
        w = _words(t)
        g = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        grams.update(g)
        total += len(g)
    return round(len(grams) / total, 4) if total else None


def _score_counts(records: list[dict]) -> dict[str, Counter]:
    """{dimension: Counter(score)}: our 6 first, then any other numeric dims the data has (meta.judge.scores,
    as filter writes them, else meta.scores)."""
    scores = {d: Counter() for d in DIMENSIONS}
    for r in records:
        judge = r["meta"].get("judge")
        s = (judge.get("scores") if isinstance(judge, dict) else None) or r["meta"].get("scores")
        for d, v in (s if isinstance(s, dict) else {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scores.setdefault(d, Counter())[int(v)] += 1
    return scores


def _means(scores: dict[str, Counter]) -> dict[str, float]:
    return {d: round(sum(k * v for k, v in c.items()) / sum(c.values()), 3) for d, c in scores.items() if c}


def analyze(records: list[dict], bad: list[dict], rejected: list[dict] | None = None) -> dict:
    user = [_text(m["content"]) for r in records for m in r["messages"] if m["role"] == "user"]
    asst = [_text(m["content"]) for r in records for m in r["messages"] if m["role"] == "assistant"]
    first_asst = [_text(next(m["content"] for m in r["messages"] if m["role"] == "assistant")) for r in records]
    openings = Counter(" ".join(_words(t)[:5]) for t in asst if _words(t))
    dom = Counter(r["meta"].get("domain") for r in records if r["meta"].get("domain"))
    strat = Counter(r["meta"].get("strategy") for r in records if r["meta"].get("strategy"))
    cross = Counter((r["meta"].get("domain"), r["meta"].get("strategy")) for r in records
                    if r["meta"].get("domain") and r["meta"].get("strategy"))
    scores = _score_counts(records)
    rej_scores = _score_counts([{"meta": r.get("meta") if isinstance(r.get("meta"), dict) else {}}
                                for r in rejected or [] if isinstance(r, dict)])
    dups = find_duplicates([(r["id"], "\n".join(_text(m["content"]) for m in r["messages"])) for r in records], 0.85)
    asst_dups = find_duplicates([(str(i), t) for i, t in enumerate(first_asst)], 0.85)
    refusals = Counter(classify(t)[0] for t in first_asst)
    from picochat.safety.filter import _reason_kind
    reasons = Counter(_reason_kind(x) for r in rejected or [] for x in r.get("reasons", []))
    n = len(records)
    return {
        "conversations": n, "invalid_lines": len(bad), "invalid": bad,
        "turns": dict(Counter(sum(m["role"] == "user" for m in r["messages"]) for r in records)),
        "domains": dict(dom), "strategies": dict(strat),
        "domain_strategy": {f"{d}|{s}": c for (d, s), c in cross.items()},
        "scores": {d: dict(sorted(c.items())) for d, c in scores.items() if c},
        "score_means": _means(scores),
        "rejected_scores": {d: dict(sorted(c.items())) for d, c in rej_scores.items() if c},
        "rejected_score_means": _means(rej_scores),
        "lengths": {"user_chars": _stats([len(t) for t in user]), "assistant_chars": _stats([len(t) for t in asst]),
                    "assistant_words": _stats([len(_words(t)) for t in asst])},
        "diversity": {"distinct_1": distinct_n(asst, 1), "distinct_2": distinct_n(asst, 2),
                      "top_openings": [[o, c, round(c / len(asst), 3)] for o, c in openings.most_common(10)]},
        "duplicates": {"exact": sum(d["kind"] == "exact" for d in dups.values()),
                       "near": sum(d["kind"] == "near" for d in dups.values()),
                       "rate": round(len(dups) / n, 4) if n else 0.0,
                       "first_reply_dup_rate": round(len(asst_dups) / n, 4) if n else 0.0},
        "refusal_share_offline": {k: round(v / n, 3) for k, v in refusals.items()} if n else {},
        "rejected": len(rejected) if rejected is not None else None, "rejection_reasons": dict(reasons.most_common()),
    }


def pipeline_counts(run_dir: Path) -> dict:
    """Failure/retry/error counts of each stage of a run directory (whatever exists)."""
    out = {}
    for stage in ("questions", "respond", "filter"):
        p = run_dir / stage / "summary.json"
        if p.exists():
            s = json.loads(p.read_text(encoding="utf-8"))
            out[stage] = {k: s[k] for k in ("failed", "failures", "judge_errors", "reasons", "missing") if k in s}
    p = run_dir / "optimize" / "versions.json"
    if p.exists():
        from picochat.safety.optimize import judge_errors
        vs = json.loads(p.read_text(encoding="utf-8"))["versions"]
        out["optimize"] = {"versions": [v["status"] for v in vs], "judge_errors": dict(judge_errors(vs))}
    evals = {}
    for p in sorted((run_dir / "eval").glob("*/summary.json")):
        e = json.loads(p.read_text(encoding="utf-8"))
        evals[p.parent.name] = {"model": e.get("target", {}).get("model"), "judge": e.get("judge"),
                                "refusal_rate": e.get("refusal_rate"), "over_refusal_rate": e.get("over_refusal_rate"),
                                **{f"{k}_{f}": e.get(k, {}).get(f) for k in ("attack", "benign")
                                   for f in ("n", "labelled", "target_failures")},
                                "label_errors": sum(sum(e.get(k, {}).get("label_errors", {}).values())
                                                    for k in ("attack", "benign"))}
    if evals:
        out["eval"] = evals
    c = load_costs(run_dir)  # from usage.jsonl: right even when a stage was killed before writing costs.json
    if c is not None:
        out["stage_costs"] = {st: {k: sc["total"].get(k, 0) for k in ("requests", "cache_hits", "cost_usd")}
                              for st, sc in c.get("stages", {}).items()}
        out["llm_calls"] = {f"{st}/{role}": {"retries": v["retries"], "failures": v["failures"]}
                            for st, sc in c.get("stages", {}).items() for role, v in sc["roles"].items()}
        out["cost_usd"] = c.get("total", {}).get("cost_usd")
    return out


def _score_bars(plt, scores: dict, prefix: str):
    dims = list(scores)
    fig, axes = plt.subplots(1, len(dims), figsize=(2.4 * len(dims), 2.6), squeeze=False)
    for ax, d in zip(axes[0], dims):
        c = scores[d]
        ax.bar([int(k) for k in c], list(c.values()), color="#c44e52" if prefix else "#4c72b0")
        ax.set_title(prefix + d.replace("_", " "), fontsize=8)
        ax.set_xticks([1, 2, 3, 4, 5])
    return fig


def _plots(a: dict, lengths: list[int], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)

    for key, name in (("scores", "scores.png"), ("rejected_scores", "scores_rejected.png")):
        if a.get(key):
            save(_score_bars(plt, a[key], "rejected: " if key == "rejected_scores" else ""), name)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(lengths, bins=30, color="#55a868")
    ax.set_xlabel("assistant reply length (chars)")
    ax.set_ylabel("replies")
    save(fig, "lengths.png")
    if a["domain_strategy"]:
        doms, strs, grid = _grid(a["domain_strategy"])
        fig, ax = plt.subplots(figsize=(1 + 0.9 * len(strs), 1 + 0.45 * len(doms)))
        im = ax.imshow(grid, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(strs)), [s.split("_")[0] for s in strs], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(doms)), doms, fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        fig.colorbar(im)
        save(fig, "domain_strategy.png")
    return files


def _kv(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"


def _scores_md(title: str, scores: dict, means: dict) -> list[str]:
    if not scores:
        return []
    return ["", f"## {title}", ""] + md_table(["dimension", "mean", "1", "2", "3", "4", "5"],
                                               [[d, means[d]] + [scores[d].get(k, 0) for k in range(1, 6)] for d in scores])


def _grid(cross: dict) -> tuple[list, list, list[list[int]]]:
    """Domains, strategies and the counts grid of a {"domain|strategy": n} table."""
    doms = sorted({k.split("|")[0] for k in cross})
    strs = sorted({k.split("|")[1] for k in cross})
    return doms, strs, [[cross.get(f"{d}|{s}", 0) for s in strs] for d in doms]


def _cross_md(cross: dict) -> list[str]:
    doms, strs, grid = _grid(cross)
    rows = [[d] + row + [sum(row)] for d, row in zip(doms, grid)]
    rows.append(["total"] + [sum(col) for col in zip(*grid)] + [sum(cross.values())])
    return md_table(["domain"] + strs + ["total"], rows)


def render_md(a: dict, src: Path, plots: list[str], note: str, pipeline: dict | None) -> str:
    L = [f"# Data-quality report: {src.name}", "", f"Source: `{src}`", "",
         f"- conversations: **{a['conversations']}**, invalid lines skipped: **{a['invalid_lines']}**",
         f"- user turns per conversation: {a['turns']}",
         f"- duplicates: {a['duplicates']['exact']} exact, {a['duplicates']['near']} near "
         f"(rate {a['duplicates']['rate']:.1%}); duplicate first replies {a['duplicates']['first_reply_dup_rate']:.1%}",
         f"- first-reply refusal share (offline classifier): {a['refusal_share_offline']}"]
    for b in a["invalid"][:10]:
        L.append(f"  - line {b['line']}: {b['reason']}")
    if len(a["invalid"]) > 10:
        L.append(f"  - ... and {len(a['invalid']) - 10} more invalid lines, all listed in report.json")
    if a["domains"]:
        L += ["", "## Domains and strategies", ""] + md_table(["domain", "count"], sorted(a["domains"].items()))
        L += [""] + md_table(["strategy", "count"], sorted(a["strategies"].items()))
    if a["domain_strategy"]:
        L += ["", "Conversations per domain x strategy (the same numbers as domain_strategy.png):", ""]
        L += _cross_md(a["domain_strategy"])
    L += _scores_md("Judge scores (worst turn per conversation)", a["scores"], a["score_means"])
    if a["rejected"] is not None:
        L += ["", f"## Rejections ({a['rejected']})", ""] + (
            md_table(["reason", "count"], list(a["rejection_reasons"].items())) if a["rejection_reasons"] else ["none"])
        L += _scores_md("Judge scores of the rejected conversations (those that were judged)",
                        a["rejected_scores"], a["rejected_score_means"])
    ls = a["lengths"]
    L += ["", "## Lengths", ""] + md_table(["what", "n", "mean", "median", "p10", "p90", "max"],
                                            [[k, v.get("n"), v.get("mean"), v.get("median"), v.get("p10"), v.get("p90"),
                                              v.get("max")] for k, v in ls.items()])
    dv = a["diversity"]
    L += ["", "## Diversity of assistant text", "", f"distinct-1 {dv['distinct_1']}, distinct-2 {dv['distinct_2']}", "",
          "Most repeated openings (first 5 words):", ""] + md_table(["opening", "count", "share"], dv["top_openings"])
    if dv["top_openings"] and dv["top_openings"][0][2] > 0.2:
        L.append(f"\n**Warning: template collapse** - {dv['top_openings'][0][2]:.0%} of replies open the same way.")
    if pipeline:
        L += ["", "## Pipeline failures, retries and judge errors", ""]
        rows = []
        for stage in ("questions", "optimize", "respond", "filter"):
            p = pipeline.get(stage)
            if p:
                fails = p.get("failures") or {}
                rows.append([stage, p.get("failed", sum(fails.values())), _kv(fails), _kv(p.get("judge_errors") or {}),
                             _kv(p.get("reasons") or {})])
        L += md_table(["stage", "failed", "failures by kind", "judge errors", "rejections"], rows)
        calls = [[k, _kv(v["retries"]), _kv(v["failures"])] for k, v in pipeline.get("llm_calls", {}).items()]
        L += ["", "LLM calls (retried errors are recovered; failures were given up on):", ""]
        L += md_table(["stage/role", "retries", "failures"], calls)
        if pipeline.get("stage_costs"):
            L += ["", "LLM usage by stage, summed over every run of it (cache hits cost nothing):", ""]
            L += md_table(["stage", "requests", "cache hits", "cost USD"],
                           [[st, c["requests"], c["cache_hits"], f"{c['cost_usd']:.4f}"]
                            for st, c in pipeline["stage_costs"].items()])
        if pipeline.get("cost_usd") is not None:
            L.append(f"\nEstimated LLM cost of the run: ${pipeline['cost_usd']:.4f} (see costs.json)")
    if pipeline and pipeline.get("eval"):
        L += ["", "## Safety eval", "", "Refusal rate on held-out attacks (higher is better) and over-refusal on "
              "benign look-alikes (lower is better); details in eval/<name>/report.md.", ""]
        L += md_table(["eval", "model", "labels", "refusal rate", "attacks labelled", "over-refusal",
                        "benign labelled", "label errors", "target failures"],
                       [[name, e["model"], e["judge"], pct(e["refusal_rate"]), f"{e['attack_labelled']}/{e['attack_n']}",
                         pct(e["over_refusal_rate"]), f"{e['benign_labelled']}/{e['benign_n']}", e["label_errors"],
                         (e["attack_target_failures"] or 0) + (e["benign_target_failures"] or 0)]
                        for name, e in pipeline["eval"].items()])
    L += ["", "## Plots", ""] + ([f"![{p}]({p})" for p in plots] or [note])
    return "\n".join(L) + "\n"


def run_report(input_path: str | Path, out_dir: str | Path, rejected: str | Path | None = None,
               run_dir: str | Path | None = None) -> dict:
    src = Path(input_path)
    records, bad = load_any(src)
    rej = read_jsonl(rejected, strict=False) if rejected else None
    a = analyze(records, bad, rej)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = ""
    try:
        lengths = [len(_text(m["content"])) for r in records for m in r["messages"] if m["role"] == "assistant"]
        plots = _plots(a, lengths, out) if records else []
    except ImportError:
        plots, note = [], "matplotlib is not installed: no plots (pip install matplotlib)."
    pipeline = pipeline_counts(Path(run_dir)) if run_dir else None
    if pipeline is not None:
        a["pipeline"] = pipeline
    write_text_atomic(out / "report.md", render_md(a, src, plots, note, pipeline))
    write_json_atomic(out / "report.json", a)
    print(f"report: {a['conversations']} conversations, {a['invalid_lines']} invalid lines -> {out / 'report.md'}"
          + (f" (+{len(plots)} plots)" if plots else f" ({note or 'no plots'})"), flush=True)
    return a
