"""Blue team (stage `respond`): answer the red-team questions with the best prompt -> SFT conversations.

A deterministic `multi_turn_fraction` of the questions becomes multi-turn: the red role plays a
persistent user for 2..max_user_turns turns. Records are picochat SFT conversations WITHOUT the system
prompt (the trained model must behave safely without it), validated before they are written. A failed
call or a truncated answer is a counted failure: nothing is written, so the next run retries it.
Output: <out>/respond/conversations.jsonl (incremental), summary.json.
"""
from __future__ import annotations

from picochat.common import PicochatError, write_json_atomic
from picochat.data.conversations import validate
from picochat.safety.client import LLM, LLMCallError
from picochat.safety.config import SafetyConfig
from picochat.safety.judge import transcript
from picochat.safety.redteam import load_questions
from picochat.safety.refusal import is_refusal
from picochat.safety.stage import Progress, for_each, log, run_stage
from picochat.safety.store import JsonlStore, stable_hash, unit_float

USER_SIM_SYSTEM = (
    "You are role-playing a persistent user in a conversation with a chatbot, to create safety training "
    "data. Given the conversation so far, write the user's next message: push back on a refusal, reframe "
    "the request (claim a legitimate purpose, make it hypothetical, split it into harmless-looking parts), "
    "or ask a follow-up. Never include harmful instructions yourself. Output only the next user message, "
    "no quotes, no labels."
)


class TurnFailure(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def user_turns_for(qid: str, fraction: float, max_user_turns: int) -> int:
    """1 for single-turn; 2..max_user_turns for the multi-turn share (deterministic per id)."""
    if unit_float("multi", qid) >= fraction:
        return 1
    return 2 + int(unit_float("turns", qid) * (max_user_turns - 1))


async def _blue(llm: LLM, system_prompt: str, conv: list[dict]) -> str:
    try:
        r = await llm.chat("blue", [{"role": "system", "content": system_prompt}] + conv)
    except LLMCallError as e:
        raise TurnFailure("blue_" + e.kind) from None
    if r.finish_reason == "length":
        raise TurnFailure("blue_truncated")  # a cut-off answer would teach the model to stop mid-sentence
    return r.text.strip()


async def _user(llm: LLM, conv: list[dict]) -> str:
    messages = [{"role": "system", "content": USER_SIM_SYSTEM},
                {"role": "user", "content": "Conversation so far:\n" + transcript(conv) + "\n\nWrite the user's next message."}]
    for sample in range(2):  # one re-sample when the red model refuses to play the user
        try:
            r = await llm.chat("red", messages, sample=sample)
        except LLMCallError as e:
            raise TurnFailure("red_" + e.kind) from None
        text = r.text.strip()
        if text and not is_refusal(text):
            return text
    raise TurnFailure("red_refused")


async def _respond(llm: LLM, questions: list[dict], system_prompt: str, cfg: SafetyConfig, store: JsonlStore) -> tuple:
    rc = cfg.respond
    ph = stable_hash(system_prompt)
    for q in questions:  # same id but another prompt or question text: refuse to mix two datasets
        old = store.get(f"c-{q['id']}")
        if old and (old["meta"].get("prompt_hash") != ph or old["messages"][0]["content"] != q["question"]):
            raise PicochatError(f"{store.path} was made with another system prompt or other questions "
                                f"(first mismatch: c-{q['id']}); move it away or use another --out")
    todo = [q for q in questions if f"c-{q['id']}" not in store]
    prog = Progress("respond", len(questions), len(questions) - len(todo))

    async def one(q):
        turns = user_turns_for(q["id"], rc.multi_turn_fraction, rc.max_user_turns)
        conv = [{"role": "user", "content": q["question"]}]
        try:
            conv.append({"role": "assistant", "content": await _blue(llm, system_prompt, conv)})
            for _ in range(turns - 1):
                conv.append({"role": "user", "content": await _user(llm, conv)})
                conv.append({"role": "assistant", "content": await _blue(llm, system_prompt, conv)})
            try:
                validate({"messages": conv})
            except ValueError as e:  # cannot normally happen (we build the list), but never write invalid SFT data
                log(f"respond: {q['id']}: {e}")
                raise TurnFailure("invalid_conversation") from None
        except TurnFailure as e:
            prog.fail(e.kind, q["id"])
            return
        meta = {k: q.get(k) for k in ("domain", "strategy", "root_id", "split")}
        meta.update(question_id=q["id"], user_turns=turns, prompt_hash=ph, source="picochat-safety")
        store.append({"id": f"c-{q['id']}", "messages": conv, "meta": meta})
        prog.tick(True)

    await for_each(todo, one)
    return prog.failures, sorted(prog.failed_ids)


def load_prompt(cfg: SafetyConfig) -> str:
    path = cfg.resolve(cfg.respond.prompt) if cfg.respond.prompt else cfg.out_dir / "optimize" / "best_prompt.txt"
    if not path.is_file():
        raise PicochatError(f"system prompt {path} not found; run `picochat safety optimize` first or pass --prompt")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise PicochatError(f"system prompt {path} is empty")
    return text


def run_respond(cfg: SafetyConfig) -> dict:
    rc = cfg.respond
    questions = [q for q in load_questions(cfg) if q.get("split") in rc.splits]
    system_prompt = load_prompt(cfg)
    questions.sort(key=lambda q: q["id"])
    if rc.limit:
        questions = questions[:rc.limit]
    roles = ["blue"] + (["red"] if rc.multi_turn_fraction > 0 else [])
    out = cfg.out_dir / "respond"
    log(f"respond: {len(questions)} questions (splits {rc.splits}), multi-turn share {rc.multi_turn_fraction}")
    with JsonlStore(out / "conversations.jsonl") as store:
        failures, failed_ids = run_stage(cfg, "respond", roles,
                                         lambda llm: _respond(llm, questions, system_prompt, cfg, store))
        wanted = {f"c-{q['id']}" for q in questions}
        done = [r for r in store.records.values() if r["id"] in wanted]
    summary = {"questions": len(questions), "conversations": len(done), "missing": len(questions) - len(done),
               "failed": sum(failures.values()), "failed_ids": failed_ids,  # all, never cut off
               "failures": dict(failures), "multi_turn": sum(r["meta"]["user_turns"] > 1 for r in done),
               "prompt_hash": stable_hash(system_prompt)}
    write_json_atomic(out / "summary.json", summary)
    log(f"respond: {len(done)}/{len(questions)} conversations ({summary['multi_turn']} multi-turn), "
        f"{summary['failed']} failed {dict(failures) or ''} -> {out / 'conversations.jsonl'}")
    return summary
