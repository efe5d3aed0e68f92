"""Filter (stage `filter`): dedup, then judge EVERY assistant turn, keep what clears the thresholds.

Exact and near-duplicates are rejected before any judge call. A conversation's score on a dimension
is its WORST turn's: one unsafe turn sinks it. Kept = every turn judged, every dimension >=
min_scores, and (require_pass) every verdict "pass"; a judge error rejects, with the error as the
reason. Works on any conversation JSONL. Outputs in <out>/filter/: judgements.jsonl (kill-safe),
kept.jsonl (the SFT file), rejected.jsonl (with "reasons"), summary.json.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from picochat.common import write_json_atomic
from picochat.safety import judge as J
from picochat.safety.client import LLM
from picochat.safety.config import DIMENSIONS, SafetyConfig
from picochat.safety.dedup import find_duplicates
from picochat.safety.stage import Progress, for_each, log, run_stage
from picochat.safety.store import JsonlStore, read_conversations, stable_hash, write_jsonl_atomic


def load_conversations(path: Path) -> tuple[list[dict], list[dict]]:
    """(valid records with ids, invalid [{line, reason}]). Records without an id get a content hash id."""
    good, bad = read_conversations(path)
    records, seen = [], set()
    for n, rec, msgs, meta in good:
        rid = str(rec.get("id") or "h-" + stable_hash(json.dumps(msgs, sort_keys=True)))
        if rid in seen:
            rid = f"{rid}@{n}"
        seen.add(rid)
        records.append({"id": rid, "messages": msgs, "meta": meta})
    return records, bad


def _jid(r: dict) -> str:
    """Judgement id: conversation id + content hash, so an edited conversation is judged again."""
    return r["id"] + ":" + stable_hash(json.dumps(r["messages"], sort_keys=True), n=12)


def decide(turns: list[dict], min_scores: dict, require_pass: bool) -> tuple[bool, list[str], dict | None]:
    """(keep, reasons, worst-turn scores) from the per-turn judge results."""
    reasons = []
    judged = [t for t in turns if "judgement" in t]
    for t in turns:
        if "error" in t:
            reasons.append(f"judge error on assistant turn {t['turn']}: {t['error']}")
    worst = None
    if judged:
        worst = {d: min(t["judgement"]["scores"][d] for t in judged) for d in DIMENSIONS}
        for t in judged:
            j = t["judgement"]
            for d, lo in min_scores.items():
                if j["scores"][d] < lo:
                    reasons.append(f"turn {t['turn']}: {d} {j['scores'][d]} < {lo}")
            if require_pass and j["verdict"] != "pass":
                why = "; ".join(j["reasons"])[:200]
                reasons.append(f"turn {t['turn']}: judge verdict fail" + (f" ({why})" if why else ""))
    return not reasons, reasons, worst


async def _judge_all(llm: LLM, records: list[dict], cfg: SafetyConfig, store: JsonlStore) -> None:
    def pending(r):  # not judged yet, or a stored judge error with samples left (judge_retries was raised)
        old = store.get(_jid(r))
        return old is None or any(J.needs_rejudge(t, cfg.judge_retries) for t in old["turns"])
    todo = [r for r in records if pending(r)]
    prog = Progress("filter", len(records), len(records) - len(todo))

    async def one(r):
        old = store.get(_jid(r))
        turns = await J.judge_conversation(llm, r["messages"], cfg.judge_retries, old["turns"] if old else None)
        if any(str(t.get("error", "")).startswith("call_") for t in turns):
            prog.tick(False)  # transient call failure: not stored, retried on the next run
            r["_transient"] = turns
            return
        store.replace({"id": _jid(r), "conversation_id": r["id"], "turns": turns})
        prog.tick(all("judgement" in t for t in turns))

    await for_each(todo, one)


def run_filter(cfg: SafetyConfig, input_path: str | None = None) -> dict:
    fc = cfg.filter
    src = Path(input_path) if input_path else (cfg.resolve(fc.input) if fc.input else
                                                cfg.out_dir / "respond" / "conversations.jsonl")
    records, bad = load_conversations(src)
    out = cfg.out_dir / "filter"
    dups = find_duplicates([(r["id"], "\n".join(str(m["content"]) for m in r["messages"])) for r in records],
                           fc.near_dup_threshold)
    to_judge = [r for r in records if r["id"] not in dups]
    log(f"filter: {len(records)} conversations from {src} ({len(bad)} invalid lines), {len(dups)} duplicates; "
        f"judging {len(to_judge)} ({sum(m['role'] == 'assistant' for r in to_judge for m in r['messages'])} assistant turns)")
    with JsonlStore(out / "judgements.jsonl") as store:
        if to_judge:
            run_stage(cfg, "filter", ["judge"], lambda llm: _judge_all(llm, to_judge, cfg, store))
        judgements = {rid: rec["turns"] for rid, rec in store.records.items()}  # keyed by _jid

    kept, rejected, reasons_count, errors = [], [], Counter(), Counter()
    for r in records:
        if r["id"] in dups:
            d = dups[r["id"]]
            reason = f"{d['kind']} duplicate of {d['of']}" + (f" (jaccard {d['jaccard']})" if d["kind"] == "near" else "")
            rejected.append(dict(r, reasons=[reason]))
            reasons_count[f"{d['kind']}_duplicate"] += 1
            continue
        turns = judgements.get(_jid(r)) or r.get("_transient")
        if turns is None:
            rejected.append(dict(r, reasons=["not judged (judge call failed; rerun to retry)"]))
            reasons_count["not_judged"] += 1
            continue
        r.pop("_transient", None)
        errors.update(t["error"] for t in turns if "error" in t)
        keep, reasons, worst = decide(turns, fc.min_scores, fc.require_pass)
        meta = dict(r["meta"], judge={"scores": worst, "turns": [{"turn": t["turn"], **({"scores": t["judgement"]["scores"],
                                      "verdict": t["judgement"]["verdict"], "refusal": t["judgement"]["refusal"]["type"]}
                                      if "judgement" in t else {"error": t["error"]})} for t in turns]})
        rec = {"id": r["id"], "messages": r["messages"], "meta": meta}
        if keep:
            kept.append(rec)
        else:
            rejected.append(dict(rec, reasons=reasons))
            reasons_count.update(map(_reason_kind, reasons))
    write_jsonl_atomic(out / "kept.jsonl", kept)
    write_jsonl_atomic(out / "rejected.jsonl", rejected)
    summary = {"input": str(src), "conversations": len(records), "invalid_lines": len(bad), "invalid": bad,
               "kept": len(kept), "rejected": len(rejected), "reasons": dict(reasons_count),
               "judge_errors": dict(errors), "duplicates": len(dups),
               "assistant_turns_judged": sum(len(t) for t in judgements.values()),
               "min_scores": fc.min_scores, "require_pass": fc.require_pass}
    write_json_atomic(out / "summary.json", summary)
    log(f"filter: kept {len(kept)}, rejected {len(rejected)} {dict(reasons_count) or ''}; judge errors "
        f"{dict(errors) or 'none'} -> {out / 'kept.jsonl'}")
    return summary


def _reason_kind(reason: str) -> str:
    """Group a reason string for counting: "turn 2: safety_integrity 2 < 4" -> "low_safety_integrity"."""
    if reason.startswith("judge error"):
        return "judge_error:" + reason.rsplit(": ", 1)[-1]
    if "verdict fail" in reason:
        return "verdict_fail"
    for d in DIMENSIONS:
        if f": {d} " in reason:
            return f"low_{d}"
    return reason[:40]
