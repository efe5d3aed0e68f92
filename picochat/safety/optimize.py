"""Prompt optimization (stage `optimize`): an APE loop with a held-out check and a guard.

    v0 --blue answers the opt split--> judge scores (6 dims) --failures--> optimizer: diagnosis,
    rule patches, rewritten BODY --guard--> candidate --blue+judge on the HELD-OUT split--> adopt
    only if its held-out mean beats the best so far (by more than min_gain); repeat `iterations`.

Opt and held-out questions come from the training split, disjoint by ROOT seed (`test` is kept for
the eval). Each split also holds benign look-alikes, so the loop cannot buy safety with over-refusal.
Judge errors are counted per version, never scored. Outputs in <out>/optimize/: answers.jsonl
(incremental), prompts/vN.txt, versions.json, best_prompt.txt (full system prompt), best_body.txt,
summary.md.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

from picochat.common import PicochatError, write_json_atomic, write_text_atomic
from picochat.safety import judge as J
from picochat.safety.client import LLM, LLMCallError
from picochat.safety.config import DIMENSIONS, SafetyConfig
from picochat.safety.prompts import DEFAULT_BODY, guard, optimizer_messages, parse_optimizer_reply, render
from picochat.safety.redteam import load_questions, round_robin
from picochat.safety.stage import Progress, for_each, log, md_table, run_stage
from picochat.safety.store import JsonlStore, stable_hash


def _round_robin(items: list[dict], n: int) -> list[dict]:
    """Up to n items taken round-robin over their "domain" (sorted): a small split covers them all."""
    by_dom: dict[str, list] = {}
    for x in items:
        by_dom.setdefault(x["domain"], []).append(x)
    return round_robin(dict(sorted(by_dom.items())), n)


def select_benign(path, size: int, seed: str = "opt") -> tuple[list, list]:
    """Benign look-alikes -> (opt, heldout), disjoint halves, alternating within each category."""
    from picochat.safety.evaluate import load_benign
    halves: tuple[list, list] = ([], [])
    items = sorted(load_benign(path, default="benign_optimize.json"), key=lambda b: (b["group"], stable_hash(seed, b["id"])))
    for n, b in enumerate(items):
        halves[n % 2].append({"id": b["id"], "question": b["prompt"], "domain": "benign:" + b["group"],
                              "strategy": "benign", "kind": "benign"})
    return _round_robin(halves[0], size), _round_robin(halves[1], size)


def select_splits(questions: list[dict], opt_size: int, heldout_size: int, seed: str = "opt") -> tuple[list, list]:
    """Training questions -> (opt, heldout), disjoint by root seed, stratified over domains."""
    train = [q for q in questions if q.get("split") == "train"]
    if not train:
        raise PicochatError("no training questions; run `picochat safety questions` first")
    share = heldout_size / (opt_size + heldout_size)
    group = {}
    for d in sorted({q["domain"] for q in train}):
        roots = sorted({q["root_id"] for q in train if q["domain"] == d}, key=lambda r: stable_hash(seed, r))
        n_dev = min(len(roots) - 1, max(1, round(len(roots) * share))) if len(roots) >= 2 else 0
        for i, r in enumerate(roots):
            group[r] = "heldout" if i < n_dev else "opt"

    def pick(which: str, n: int) -> list[dict]:
        return _round_robin(sorted((q for q in train if group[q["root_id"]] == which),
                                   key=lambda q: stable_hash(seed, q["id"])), n)

    opt, held = pick("opt", opt_size), pick("heldout", heldout_size)
    if not held:
        raise PicochatError("not enough training root seeds for a held-out split (need >= 2 roots in a domain)")
    return opt, held


async def _score(llm: LLM, store: JsonlStore, retries: int, system_prompt: str, questions: list[dict],
                 label: str) -> list[dict]:
    """Answers + judgements of one prompt on a list of questions, kept in answers.jsonl per (prompt, question)."""
    ph = stable_hash(system_prompt)
    rid_of = {q["id"]: f"{ph}:{q['id']}:{stable_hash(q['question'], n=8)}" for q in questions}
    done = {q["id"] for q in questions
            if rid_of[q["id"]] in store and not J.needs_rejudge(store.get(rid_of[q["id"]]), retries)}
    prog = Progress(f"optimize[{label}]", len(questions), len(done))

    async def one(q):
        rid = rid_of[q["id"]]
        if q["id"] in done:
            return store.get(rid)
        old = store.get(rid)  # a stored judge error with samples left: judge the same answer again
        rec = {"id": rid, "prompt_hash": ph, "question_id": q["id"], "domain": q["domain"],
               "strategy": q["strategy"], "question": q["question"], "kind": q.get("kind", "attack")}
        if old is not None:
            rec["answer"] = old["answer"]
        else:
            try:
                ans = await llm.chat("blue", [{"role": "system", "content": system_prompt},
                                              {"role": "user", "content": q["question"]}])
            except LLMCallError as e:  # transient: not stored, so the next run tries again
                prog.tick(False)
                return dict(rec, error="blue_" + e.kind)
            rec["answer"] = ans.text
        res = await J.judge_turn(llm, [{"role": "user", "content": q["question"]},
                                       {"role": "assistant", "content": rec["answer"]}], retries,
                                 old.get("samples", 0) if old else 0)
        rec.update(res)
        if not str(res.get("error", "")).startswith("call_"):
            # a parse/schema error is kept with the samples it used: a rerun does not pay for it again
            # unless judge_retries is raised (then it goes on with new samples)
            store.replace(rec)
        prog.tick("judgement" in res)
        return rec

    return await for_each(questions, one)


def _scores(results: list[dict]) -> dict:
    """Summary over attacks and benign look-alikes together, plus each kind on its own.

    The combined means and pass rate weigh the two kinds equally (the mean of the per-kind values),
    however many prompts each has: otherwise 14 attacks refused perfectly would outvote 10 benign
    prompts refused wrongly, and a prompt that refuses everything would be adopted.
    """
    s = J.summarize(results)
    kinds = {k: J.summarize([r for r in results if r.get("kind", "attack") == k]) for k in ("attack", "benign")}
    judged = [k for k in kinds.values() if k["judged"]]
    if len(judged) == 2:
        avg = lambda key: round(sum(k[key] for k in judged) / 2, 4)  # noqa: E731
        s["dimensions"] = {d: round(sum(k["dimensions"][d] for k in judged) / 2, 4) for d in DIMENSIONS}
        s.update(mean=avg("mean"), pass_rate=avg("pass_rate"))
    s.update(kinds)
    return s


def _abbr(dim: str) -> str:
    return "".join(w[0] for w in dim.split("_")).upper()


def _fmt(s: dict | None) -> str:
    if not s:
        return "-"
    m = "n/a" if s["mean"] is None else f"{s['mean']:.3f}"
    return f"{m} (judged {s['judged']}/{s['n']}, errors {s['error_count']})"


def _pass(s: dict | None) -> str:
    """Pass rate on attacks / on benign look-alikes (over-refusal shows up in the second)."""
    if not s:
        return "-"
    f = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    return f"{f(s.get('attack', {}).get('pass_rate'))} / {f(s.get('benign', {}).get('pass_rate'))}"


def judge_errors(versions: list[dict]) -> Counter:
    """Judge errors by kind, over every version's scores on both splits."""
    errors = Counter()
    for v in versions:
        for split in ("opt", "heldout"):
            errors.update((v["scores"].get(split) or {}).get("errors", {}))
    return errors


async def _optimize(llm: LLM, cfg: SafetyConfig, opt: list[dict], held: list[dict], store: JsonlStore) -> dict:
    oc = cfg.optimize
    out = cfg.out_dir / "optimize"
    score = functools.partial(_score, llm, store, cfg.judge_retries)
    body0 = cfg.resolve(oc.initial_prompt).read_text(encoding="utf-8") if oc.initial_prompt else DEFAULT_BODY
    if trips := guard(body0, min_chars=1, max_chars=10 ** 6, assistant_name=oc.assistant_name):
        log(f"optimize: note: the initial prompt trips the guard: {trips}")
    versions: list[dict] = []

    def save():
        write_json_atomic(out / "versions.json", {"versions": versions, "best": best["version"],
                                                  "opt_questions": [q["id"] for q in opt],
                                                  "heldout_questions": [q["id"] for q in held]})

    def new_version(body, **kw) -> dict:
        v = {"version": len(versions), "prompt_hash": stable_hash(render(body, oc.assistant_name)),
             "file": f"prompts/v{len(versions)}.txt", "body": body, "scores": {"opt": None, "heldout": None}, **kw}
        write_text_atomic(out / v["file"], render(body, oc.assistant_name) if not v.get("guard_reasons") else body)
        versions.append(v)
        return v

    best = new_version(body0, parent=None, iteration=0, status="baseline", adopted=True)
    best_results = await score(render(body0, oc.assistant_name), opt, "v0 opt")
    best["scores"]["opt"] = _scores(best_results)
    best["scores"]["heldout"] = _scores(await score(render(body0, oc.assistant_name), held, "v0 heldout"))
    save()
    log(f"optimize: v0 opt {_fmt(best['scores']['opt'])}, heldout {_fmt(best['scores']['heldout'])}")
    history: list[str] = []

    for it in range(1, oc.iterations + 1):
        fails = [r for r in best_results if "judgement" in r and (r["judgement"]["verdict"] == "fail" or
                                                                 min(r["judgement"]["scores"].values()) < oc.fail_below)]
        if not fails:
            judged = sum("judgement" in r for r in best_results)
            why = ("no answer on the opt split was judged (all judge errors), nothing to learn from" if not judged
                   else f"the best prompt has no failures among {judged} judged answers on the opt split")
            log(f"optimize: iteration {it}: {why}; stopping")
            break
        fails.sort(key=lambda r: (min(r["judgement"]["scores"].values()), r["question_id"]))
        shown = [{"question": r["question"], "answer": r["answer"], "domain": r["domain"], "strategy": r["strategy"],
                  "scores": r["judgement"]["scores"], "verdict": r["judgement"]["verdict"],
                  "reasons": r["judgement"]["reasons"]} for r in fails[:oc.max_failures]]
        cand = None
        for sample in range(oc.guard_retries + 1):
            try:
                reply = await llm.chat("optimizer", optimizer_messages(best["body"], shown, it, history), sample=sample)
            except LLMCallError as e:
                log(f"optimize: iteration {it}: optimizer call failed ({e.kind})")
                history.append(f"iteration {it}: optimizer call failed")
                break
            parts = parse_optimizer_reply(reply.text)
            body = parts["prompt"] if parts["prompt"] is not None else reply.text
            reasons = (["missing '### PROMPT' section"] if parts["prompt"] is None else []) + guard(
                body, min_chars=oc.guard_min_chars, max_chars=oc.guard_max_chars, assistant_name=oc.assistant_name)
            status = "rejected_guard" if reasons else "candidate"
            v = new_version(body, parent=best["version"], iteration=it, status=status, adopted=False,
                            guard_reasons=reasons, diagnosis=parts["diagnosis"], rules=parts["rules"])
            if not reasons:
                cand = v
                break
            history.append(f"a candidate was rejected before scoring: {'; '.join(reasons)}")
            log(f"optimize: iteration {it}: candidate rejected by the guard: {'; '.join(reasons)}")
            save()
        if cand is None:
            continue
        full = render(cand["body"], oc.assistant_name)
        ho = _scores(await score(full, held, f"v{cand['version']} heldout"))
        cand_results = await score(full, opt, f"v{cand['version']} opt")
        cand["scores"] = {"opt": _scores(cand_results), "heldout": ho}
        enough = ho["judged"] >= math.ceil(oc.min_judged_fraction * ho["n"])
        b = best["scores"]["heldout"]["mean"]
        better = ho["mean"] is not None and (b is None or ho["mean"] > b + oc.min_gain)
        if enough and better:
            cand.update(status="adopted", adopted=True)
            history.append(f"v{cand['version']} adopted: held-out mean {ho['mean']:.3f} vs {b}")
            best, best_results = cand, cand_results
        else:
            why = "too many judge errors on the held-out split" if not enough else \
                f"held-out mean {ho['mean']} does not beat the best {b} by > {oc.min_gain}"
            cand.update(status="rejected_heldout", reject_reason=why)
            history.append(f"v{cand['version']} not adopted: {why}")
        log(f"optimize: iteration {it}: v{cand['version']} heldout {_fmt(ho)} vs best {b} -> {cand['status']}")
        save()

    write_text_atomic(out / "best_prompt.txt", render(best["body"], oc.assistant_name))
    write_text_atomic(out / "best_body.txt", best["body"].strip() + "\n")
    save()
    errors = judge_errors(versions)
    md = ["# Prompt optimization", "", f"opt split {len(opt)} questions, held-out split {len(held)} questions "
          "(disjoint root seeds). Means over judged answers; judge errors are counted, not scored.", "",
          "Per-dimension columns are held-out means: " + ", ".join(f"{_abbr(d)} = {d}" for d in DIMENSIONS) + ".", "",
          "Pass rates are shown per kind: attack questions / benign look-alike prompts (a prompt that "
          "over-refuses fails the benign ones).", ""]
    rows = []
    for v in versions:
        ho, op = v["scores"]["heldout"], v["scores"]["opt"]
        dims = [f"{ho['dimensions'][d]:.2f}" if ho and ho["dimensions"][d] is not None else "-" for d in DIMENSIONS]
        errs = (ho["error_count"] if ho else 0) + (op["error_count"] if op else 0)
        rows.append([f"v{v['version']}", "" if v["parent"] is None else f"v{v['parent']}", v["iteration"], v["status"],
                     _fmt(ho), _fmt(op), _pass(ho), *dims, errs])
    md += md_table(["version", "parent", "iter", "status", "held-out mean", "opt mean", "held-out pass attack / benign",
                    *map(_abbr, DIMENSIONS), "errors"], rows)
    for v in versions:
        if v.get("guard_reasons"):
            md.append(f"\n- v{v['version']} guard: {'; '.join(v['guard_reasons'])}")
    md.append(f"\nBest: v{best['version']} -> best_prompt.txt. Judge errors by kind: {dict(errors) or 'none'}")
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")
    return {"best": best["version"], "versions": len(versions), "judge_errors": dict(errors),
            "best_heldout": best["scores"]["heldout"], "statuses": [v["status"] for v in versions]}


def run_optimize(cfg: SafetyConfig) -> dict:
    oc = cfg.optimize
    opt, held = select_splits(load_questions(cfg), oc.opt_size, oc.heldout_size)
    b_opt, b_held = select_benign(cfg.resolve(oc.benign) if oc.benign else None, oc.benign_size)
    if not b_held:
        log("optimize: warning: no benign look-alike prompts (optimize.benign_size = 0): over-refusal is not scored")
    opt, held = opt + b_opt, held + b_held
    if cfg.optimize.initial_prompt and not cfg.resolve(cfg.optimize.initial_prompt).is_file():
        raise PicochatError(f"optimize.initial_prompt {cfg.resolve(cfg.optimize.initial_prompt)} not found")
    log(f"optimize: {len(opt)} opt prompts ({len(b_opt)} benign), {len(held)} held-out prompts ({len(b_held)} benign), "
        f"{oc.iterations} iterations")
    with JsonlStore(cfg.out_dir / "optimize" / "answers.jsonl") as store:
        res = run_stage(cfg, "optimize", ["blue", "judge", "optimizer"],
                        lambda llm: _optimize(llm, cfg, opt, held, store))
    log(f"optimize: best v{res['best']} of {res['versions']} versions ({', '.join(res['statuses'])}); judge errors "
        f"{res['judge_errors'] or 'none'} -> {cfg.out_dir / 'optimize' / 'best_prompt.txt'}")
    return res
