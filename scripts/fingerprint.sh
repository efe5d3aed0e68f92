#!/usr/bin/env bash
# Fingerprint a tiny uncompiled pipeline, to check that a refactor changes no behaviour:
#   bash scripts/fingerprint.sh <checkout> <out-dir> > a.txt   (e.g. a `git worktree add` of the old commit)
#   bash scripts/fingerprint.sh . <other-out-dir> > b.txt && diff a.txt b.txt
# It runs data, tokenizer, base (depth 2, 30 steps), sample, mid, sft, rl, eval base/chat, chat and report
# (about a minute on 2 cores) and prints a hash of every checkpoint's tensors and of every JSON it wrote
# (timing keys removed); <out-dir>/log.norm is the log without timings. Same output = same behaviour.
set -euo pipefail
REPO=$(cd "$1" && pwd); OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PICOCHAT_HOME=$OUT/home OMP_NUM_THREADS=1 PYTHONPATH=$REPO
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
pc() { $PY -m picochat.cli "$@"; }
cd "$REPO"
{
pc data prepare --source embedded --overwrite
pc tokenizer train --vocab-size 2048
pc tokenizer eval --max-chars 100000
pc train base --depth 2 --steps 30 --seq-len 128 --device-batch-size 4 --eval-every 15 --compile off --overwrite
pc sample --model base/d2 -p "ROMEO. " --max-tokens 40 --temperature 0.8 --top-k 40 --seed 0
pc train mid --model base/d2 --steps 20 --eval-every 0 --compile off --overwrite
pc train sft --model mid/d2 --steps 20 --device-batch-size 8 --eval-every 10 --tasks spelling=3,arithmetic=2,identity=0.2 --overwrite
pc train rl --model sft/d2 --tasks arithmetic --samples-per-prompt 4 --steps 3 --overwrite
pc eval base --model base/d2 --tasks bpb,spelling,arithmetic --limit 20
pc eval chat --model sft/d2 --tasks spelling,arithmetic --limit 10
pc chat --model sft/d2 -p "What is 123 * 45?" --temperature 0
pc report
} > "$OUT/log.txt" 2>&1
$PY - "$OUT" <<'PY'
import sys, hashlib, pathlib, json, re
from safetensors.torch import load_file
out = pathlib.Path(sys.argv[1]); home = out / "home"
for p in sorted(home.rglob("model.safetensors")):
    h = hashlib.sha256()
    for k, v in sorted(load_file(str(p)).items()):
        h.update(k.encode()); h.update(v.float().numpy().tobytes())
    print(p.relative_to(home), h.hexdigest()[:16])
for p in sorted(home.rglob("*")):
    if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".tsv") and "meta" not in p.name:
        b = p.read_bytes()
        if p.suffix == ".json":
            def clean(o):
                if isinstance(o, dict):
                    return {k: clean(v) for k, v in o.items() if not re.search(r"time|tok_per_s|data_wait|seconds|elapsed|date|_at$", k)}
                return [clean(v) for v in o] if isinstance(o, list) else o
            b = json.dumps(clean(json.loads(b)), sort_keys=True).encode()
        print(p.relative_to(home), hashlib.sha256(b).hexdigest()[:16])
log = (out / "log.txt").read_text().replace("\r", "\n")
keep = [re.sub(r"[0-9.]+ ?(s|ms|tok/s|it/s|s/it)\b", "T", l) for l in log.splitlines() if "it/s" not in l and "s/it" not in l]
(out / "log.norm").write_text("\n".join(keep))
PY
