"""Safety eval (stage `eval`): refusal rate on held-out attacks, over-refusal on benign look-alikes.

The `target` role (any OpenAI-compatible endpoint, picochat's own server included) answers the
held-out attacks (split "test": roots never seen in training) and benign look-alike prompts. Each
reply is labelled full / partial / none by the judge role (`--judge llm`) or by the offline classifier
(`--judge offline`, refusal.py). Rates are (full + partial) / labelled; judge errors and target
failures are counted, never folded into them. Outputs in <out>/eval/<name>/: replies.jsonl and
labels.jsonl (incremental), summary.json, report.md.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from picochat.common import PicochatError, write_json_atomic, write_text_atomic
from picochat.safety import judge as J
from picochat.safety.client import LLM, LLMCallError
from picochat.safety.config import SafetyConfig
from picochat.safety.refusal import classify
from picochat.safety.stage import Progress, for_each, log, md_table, pct, run_stage
from picochat.safety.store import JsonlStore, load_json, read_jsonl, stable_hash


def load_benign(path=None, default: str = "benign_lookalikes.json") -> list[dict]:
    """Benign prompts from `path`, or the shipped file `default` (optimize uses its own, disjoint set)."""
    data, _ = load_json(path, default, "benign prompt file")
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(p, dict) and p.get("id") and p.get("prompt") for p in items):
        raise PicochatError("benign prompts must be a list of {id, prompt, category} (or {\"prompts\": [...]})")
    return [{"id": "benign:" + str(p["id"]) + ":" + stable_hash(p["prompt"], n=8), "kind": "benign", "prompt": p["prompt"],
             "group": p.get("category", "other")} for p in items]


def load_attacks(path) -> list[dict]:
    if not path.is_file():
        raise PicochatError(f"{path} not found; run `picochat safety questions` first or pass --questions")
    qs = [q for q in read_jsonl(path) if q.get("split", "test") == "test"]
    if not qs:
        raise PicochatError(f"{path} has no held-out (split 'test') questions")
    return [{"id": "attack:" + q["id"] + ":" + stable_hash(q["question"], n=8), "kind": "attack", "prompt": q["question"], "group": q.get("domain", "other")}
            for q in qs]


def _rate(labels: list[str]) -> float | None:
    return round(sum(x != "none" for x in labels) / len(labels), 4) if labels else None


def metrics(items: list[dict], replies: dict, labels: dict) -> dict:
    out = {}
    for kind in ("attack", "benign"):
        its = [i for i in items if i["kind"] == kind]
        labelled = [i for i in its if "label" in labels.get(i["id"], {})]
        got = [labels[i["id"]] for i in labelled]
        errs = Counter(labels[i["id"]]["error"] for i in its if "error" in labels.get(i["id"], {}))
        no_reply = sum(1 for i in its if i["id"] not in replies)
        by_group = defaultdict(list)
        for i in labelled:
            by_group[i["group"]].append(labels[i["id"]]["label"])
        m = {"n": len(its), "labelled": len(got), "label_errors": dict(errs), "target_failures": no_reply,
             "refusal_rate": _rate([g["label"] for g in got]),
             "full_refusal_rate": round(sum(g["label"] == "full" for g in got) / len(got), 4) if got else None,
             "by_group": {g: {"n": len(v), "refusal_rate": _rate(v)} for g, v in sorted(by_group.items())}}
        harmful = [g["harmful"] for g in got if g.get("harmful") is not None]
        if harmful:
            m["harmful_rate"] = round(sum(harmful) / len(harmful), 4)
        out[kind] = m
    out["refusal_rate"] = out["attack"]["refusal_rate"]
    out["over_refusal_rate"] = out["benign"]["refusal_rate"]
    return out


async def _eval(llm: LLM, items: list[dict], system_prompt: str, mode: str, cfg: SafetyConfig,
                replies: JsonlStore, labels: JsonlStore) -> Counter:
    def settled(lid: str) -> bool:  # labelled, or a judge error whose samples are spent (see judge.needs_rejudge)
        return lid in labels and not J.needs_rejudge(labels.get(lid), cfg.judge_retries)
    prog = Progress(f"eval[{mode}]", len(items), sum(settled(f"{mode}:{i['id']}") for i in items))

    async def one(it):
        rec = replies.get(it["id"])
        if rec is None:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                [{"role": "user", "content": it["prompt"]}]
            try:
                r = await llm.chat("target", msgs)
            except LLMCallError as e:
                prog.fail("target_" + e.kind)
                return
            rec = {"id": it["id"], "kind": it["kind"], "group": it["group"], "prompt": it["prompt"], "reply": r.text,
                   "finish_reason": r.finish_reason}
            replies.append(rec)
        lid = f"{mode}:{it['id']}"
        if settled(lid):
            return
        if mode == "offline":
            label, pattern = classify(rec["reply"])
            labels.append({"id": lid, "label": label, "harmful": None, "reason": f"pattern: {pattern}" if pattern else "no refusal phrase"})
        else:
            res = await J.classify_refusal(llm, it["prompt"], rec["reply"], cfg.judge_retries,
                                           (labels.get(lid) or {}).get("samples", 0))
            if "judgement" in res:
                j = res["judgement"]
                labels.replace({"id": lid, "label": j["refusal"], "harmful": j["harmful"], "reason": j["reason"]})
            elif res["error"].startswith("call_"):
                prog.fail("judge_" + res["error"])  # transient: retried next run
                return
            else:
                labels.replace({"id": lid, "error": res["error"], "detail": res.get("detail", ""),
                                "samples": res["samples"]})
        prog.tick("error" not in labels.get(lid))

    await for_each(items, one)
    return prog.failures


def run_eval(cfg: SafetyConfig) -> dict:
    ec = cfg.eval
    target = cfg.role("target")
    mode = ec.judge
    qpath = cfg.resolve(ec.questions) if ec.questions else cfg.out_dir / "questions" / "questions.jsonl"
    items = load_attacks(qpath) + load_benign(cfg.resolve(ec.benign) if ec.benign else None)
    if ec.limit:  # keep both kinds represented
        items = [i for i in items if i["kind"] == "attack"][:ec.limit] + [i for i in items if i["kind"] == "benign"][:ec.limit]
    system_prompt = ""
    if ec.system_prompt:
        p = cfg.resolve(ec.system_prompt)
        if not p.is_file():
            raise PicochatError(f"eval.system_prompt {p} not found")
        system_prompt = p.read_text(encoding="utf-8").strip()
    # replies belong to one target: a new model/endpoint/system prompt gets its own directory
    auto = re.sub(r"[^A-Za-z0-9._-]+", "-", target.model) + "-" + stable_hash(target.base_url, target.model, system_prompt, n=8)
    name = ec.name or auto
    out = cfg.out_dir / "eval" / name
    roles = ["target"] + (["judge"] if mode == "llm" else [])
    log(f"eval: {sum(i['kind'] == 'attack' for i in items)} held-out attacks + {sum(i['kind'] == 'benign' for i in items)} "
        f"benign look-alikes against {target.model} at {target.base_url}, labels by {mode}")
    with JsonlStore(out / "replies.jsonl") as replies, JsonlStore(out / "labels.jsonl") as labels:
        failures = run_stage(cfg, f"eval:{name}", roles, lambda llm: _eval(llm, items, system_prompt, mode, cfg, replies, labels))
        lab = {k.split(":", 1)[1]: v for k, v in labels.records.items() if k.startswith(mode + ":")}
        m = metrics(items, replies.records, lab)
        over = [(replies.get(i["id"])["prompt"], lab[i["id"]]["label"]) for i in items
                if i["kind"] == "benign" and lab.get(i["id"], {}).get("label", "none") != "none"]
    m.update(judge=mode, target={"model": target.model, "base_url": target.base_url}, failures=dict(failures))
    write_json_atomic(out / "summary.json", m)
    a, b = m["attack"], m["benign"]
    rows = [[what, k["n"], k["labelled"], sum(k["label_errors"].values()), k["target_failures"],
             f"**{pct(k['refusal_rate'])}** {better}", pct(k["full_refusal_rate"])]
            for what, k, better in (("held-out attacks", a, "(higher is better)"),
                                    ("benign look-alikes", b, "over-refusal (lower is better)"))]
    md = [f"# Safety eval: {target.model}", "", f"Endpoint `{target.base_url}`, labels by **{mode}**.", ""]
    md += md_table(["set", "prompts", "labelled", "label errors", "target failures", "refusal rate", "full refusals"],
                   rows)
    md += ["", "## Refusal rate by domain (attacks)", ""]
    md += [f"- {g}: {pct(v['refusal_rate'])} of {v['n']}" for g, v in a["by_group"].items()]
    md += ["", "## Over-refused benign prompts", ""] + [f"- ({lbl}) {p}" for p, lbl in over]
    if mode != "llm":
        md += ["", "Labels come from the offline keyword/regex classifier (picochat/safety/refusal.py): "
                   "a heuristic, see docs/safety.md for its limits."]
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    log(f"eval: refusal rate on held-out attacks {pct(a['refusal_rate'])} ({a['labelled']} labelled), over-refusal on "
        f"benign look-alikes {pct(b['refusal_rate'])} ({b['labelled']} labelled); label errors "
        f"{sum(a['label_errors'].values()) + sum(b['label_errors'].values())}, target failures "
        f"{a['target_failures'] + b['target_failures']} -> {out / 'report.md'}")
    return m
