"""Red-team stage: seed bank, balanced strategy assignment, root-seed split, near-dup removal (fake server)."""
import json
from collections import Counter

import pytest

from picochat.common import PicochatError
from picochat.safety.dedup import MinHasher, find_duplicates, jaccard, shingles
from picochat.safety.redteam import (STRATEGY_NAMES, load_seed_bank, plan_questions, select_seeds, split_roots)


def test_shipped_seed_bank_is_even_and_has_no_operational_detail():
    domains, seeds = load_seed_bank()
    assert len(domains) == 7 and len(seeds) == 50
    counts = Counter(s["domain"] for s in select_seeds(domains, seeds, 50))
    assert set(counts) == set(domains) and set(counts.values()) <= {7, 8}
    for s in seeds:
        assert s["behavior"].startswith("asks ") and len(s["behavior"]) < 120  # a behaviour, not a recipe


def test_select_seeds_round_robin_on_an_uneven_bank():
    domains = {"a": "", "b": "", "c": ""}
    seeds = [{"id": f"a{i}", "domain": "a"} for i in range(10)] + [{"id": "b0", "domain": "b"}] + \
        [{"id": f"c{i}", "domain": "c"} for i in range(4)]
    got = Counter(s["domain"] for s in select_seeds(domains, seeds, 9))
    assert got == {"a": 4, "b": 1, "c": 4}  # b runs out; the others stay within one of each other


@pytest.mark.parametrize("per_seed", [1, 2, 3, 5, 7, 9])
def test_strategies_balanced_per_domain(per_seed):
    domains, seeds = load_seed_bank()
    plan = plan_questions(domains, select_seeds(domains, seeds, 50), per_seed)
    for d in domains:
        c = Counter(p["strategy"] for p in plan if p["domain"] == d)
        counts = [c[s] for s in STRATEGY_NAMES]
        assert max(counts) - min(counts) <= 1, (d, counts)
        if per_seed == 7:
            assert set(counts) == {len([s for s in seeds if s["domain"] == d])}
    by_seed = {}
    for p in plan:
        by_seed.setdefault(p["root_id"], []).append(p["strategy"])
    assert all(len(set(v)) == min(per_seed, 7) for v in by_seed.values())
    assert len({p["id"] for p in plan}) == len(plan)


def test_split_by_root_is_disjoint_stratified_and_deterministic():
    domains, seeds = load_seed_bank()
    a = split_roots(domains, seeds, 0.2, 0)
    assert a == split_roots(domains, seeds, 0.2, 0)
    for d in domains:
        roots = [s["id"] for s in seeds if s["domain"] == d]
        assert {a[r] for r in roots} == {"train", "test"}
    assert sum(v == "test" for v in a.values()) == 10  # 0.2 of 50 roots, 1-2 per domain


def test_bad_seed_bank(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(json.dumps({"domains": {"x": ""}, "seeds": [{"id": "1", "domain": "y", "behavior": "asks"}]}))
    with pytest.raises(PicochatError, match="unknown domain 'y'"):
        load_seed_bank(p)
    p.write_text("{oops")
    with pytest.raises(PicochatError, match="invalid JSON"):
        load_seed_bank(p)


def test_minhash_near_duplicates():
    a = "Explain how to pick a lock on a front door, step by step please."
    b = "Explain how to pick the lock on a front door, step by step, please!"
    c = "What is the capital of France and why is it famous for art?"
    mh = MinHasher(128)
    sa, sb, sc = shingles(a), shingles(b), shingles(c)
    est = float((mh.signature(sa) == mh.signature(sb)).mean())
    assert abs(est - jaccard(sa, sb)) < 0.15 and jaccard(sa, sc) < 0.2
    d = find_duplicates([("1", a), ("2", b), ("3", c), ("4", c.upper())], threshold=0.7)
    assert d["2"]["of"] == "1" and d["2"]["kind"] == "near" and d["4"] == {"of": "3", "kind": "exact", "jaccard": 1.0}
    assert "3" not in d


pytest.importorskip("openai")


def test_questions_stage_end_to_end(tmp_path, monkeypatch):
    from fake_openai import KEY_ENV, FakeOpenAI, small_seed_bank, write_config

    from picochat.safety import config as C
    from picochat.safety.redteam import run_questions
    from picochat.safety.store import read_jsonl
    extra = [{"id": f"dup-{i}", "domain": "cyber", "behavior": "asks the DUPLICATE thing"} for i in range(2)] + \
        [{"id": "near-0", "domain": "hate", "behavior": "asks the NEARDUP thing"},
         {"id": "refuse-0", "domain": "financial", "behavior": "asks something REDREFUSE"}]
    with FakeOpenAI() as fake:
        monkeypatch.setenv(KEY_ENV, fake.api_key)
        bank = small_seed_bank(tmp_path / "bank.json", per_domain=2, extra=extra)
        cfg = C.load(write_config(fake, tmp_path, questions={"seed_bank": bank, "num_seeds": 18, "per_seed": 3,
                                                            "test_fraction": 0.34}))
        s = run_questions(cfg)
        calls = fake.calls["red"]
    qs = read_jsonl(cfg.out_dir / "questions" / "questions.jsonl")
    dups = read_jsonl(cfg.out_dir / "questions" / "duplicates.jsonl")
    # 18 seeds: 2 per domain + the 4 extra (round-robin picks them up) -> 54 planned
    assert s["planned"] == 54 and s["failures"] == {"red_refused": 3} and s["generated"] == 51
    assert calls == 54 + 3  # each refusal re-sampled once
    # the two DUPLICATE seeds give 6 identical questions, NEARDUP gives 3 near-identical ones
    assert s["duplicates_removed"] == len(dups) >= 5 + 2
    assert {d["dup_kind"] for d in dups} == {"exact", "near"}
    assert len(qs) == s["kept"] == 51 - len(dups)
    for q in qs:
        assert {"id", "question", "domain", "strategy", "root_id", "split"} <= set(q)
    train = {q["root_id"] for q in qs if q["split"] == "train"}
    test = {q["root_id"] for q in qs if q["split"] == "test"}
    assert train and test and not train & test
    table = s["strategy_counts_planned"]
    for d, row in table.items():
        assert max(row.values()) - min(row.values()) <= 1
    assert "| domain |" in (cfg.out_dir / "questions" / "questions.md").read_text()


def test_questions_summary_keeps_every_failed_id(tmp_path, monkeypatch):
    from fake_openai import KEY_ENV, FakeOpenAI, small_seed_bank, write_config

    from picochat.safety import config as C
    from picochat.safety.redteam import run_questions
    refusing = [{"id": f"refuse-{i:02d}", "domain": "cyber", "behavior": "asks something REDREFUSE"} for i in range(55)]
    with FakeOpenAI() as fake:
        monkeypatch.setenv(KEY_ENV, fake.api_key)
        bank = small_seed_bank(tmp_path / "bank.json", per_domain=1, extra=refusing)
        cfg = C.load(write_config(fake, tmp_path, questions={"seed_bank": bank, "num_seeds": 62, "per_seed": 1}))
        s = run_questions(cfg)
    assert s["failures"] == {"red_refused": 55} and len(s["failed_ids"]) == 55
    assert {i.rsplit("-", 2)[0] for i, _ in s["failed_ids"]} == {f"refuse-{i:02d}" for i in range(55)}
