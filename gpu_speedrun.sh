#!/usr/bin/env bash
# The whole pipeline at GPU scale: FineWeb-Edu -> 65k tokenizer -> d20 base (~560M params,
# Chinchilla 20 tokens/param) -> mid -> SFT -> eval, under torchrun on 1 or 8 GPUs, bf16 autocast.
# Evals are what users compare with nanochat: the base model's CORE (DCLM eval bundle, downloaded)
# and val bits per byte; the chat model's ARC-E/C, MMLU, GSM8K, HumanEval, AIME 2024/2025; then
# the report card ($PICOCHAT_HOME/report/report.md) with all of it (evals: ~30 min more, unmeasured).
#
#   bash gpu_speedrun.sh                 # 8 GPUs
#   bash gpu_speedrun.sh --gpus 1        # one GPU: same data and batch (8x gradient accumulation)
#   bash gpu_speedrun.sh --dry-run       # print the plan and check every command's flags; runs nothing
#
# Expected time (an ESTIMATE, not yet measured on GPUs: see docs/performance.md): base training is
# ~21.4k steps x 524,288 tokens = 11.2B tokens ~ 2e19 FLOPs; at 40% MFU on 8xH100 (~3.2 PFLOP/s)
# that is ~3.5 h, plus ~1 h of data download/prep and tokenizer, mid and SFT ~20 min: ~5 h on 8xH100,
# ~30 h on one H100. Knobs (env): DEPTH (20), BASE_STEPS (21400), DEVICE_BATCH (32 rows x 2048),
# TOTAL_BATCH (524288 tokens), COMPILE (max-autotune-no-cudagraphs), DATA_CHARS (55e9 chars of
# FineWeb-Edu, ~11.5B tokens), MID_STEPS (1500), SFT_STEPS (800), GRAD_CKPT (0; 1 adds --grad-checkpoint),
# EVAL_BATCH (16 rows per scoring forward), DOLLARS_PER_HOUR (3 per GPU, for the report's cost line).
# COMPILE: at d20 every kernel is large, so CUDA graphs (reduce-overhead) save almost nothing
# while pinning extra memory and clashing with DDP; max-autotune's GEMM tuning is paid once
# (minutes) against hours of training. Change it with COMPILE=... once measured.
set -euo pipefail
cd "$(dirname "$0")"

GPUS=8
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=${2:-}; shift 2 || { echo "gpu_speedrun.sh: error: --gpus needs a value" >&2; exit 2; } ;;
    --gpus=*) GPUS=${1#--gpus=}; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_speedrun.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$GPUS" in 1|2|4|8) ;; *) echo "gpu_speedrun.sh: error: --gpus must be 1, 2, 4 or 8 (got '$GPUS')" >&2; exit 2 ;; esac

DEPTH=${DEPTH:-20}
SEQ=2048
DEVICE_BATCH=${DEVICE_BATCH:-32}
TOTAL_BATCH=${TOTAL_BATCH:-524288}
BASE_STEPS=${BASE_STEPS:-21400}
MID_STEPS=${MID_STEPS:-1500}
SFT_STEPS=${SFT_STEPS:-800}
COMPILE=${COMPILE:-max-autotune-no-cudagraphs}
DATA_CHARS=${DATA_CHARS:-55000000000}
EVAL_BATCH=${EVAL_BATCH:-16}
DOLLARS_PER_HOUR=${DOLLARS_PER_HOUR:-$((3 * GPUS))}
EXTRA=()
[ "${GRAD_CKPT:-0}" = 1 ] && EXTRA+=(--grad-checkpoint)
export PICOCHAT_HOME=${PICOCHAT_HOME:-$HOME/.cache/picochat}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # per torchrun rank; loader workers do the tokenizing
RUN=(torchrun --standalone --nproc_per_node="$GPUS" -m picochat.cli)
TRAIN_COMMON=(--device-batch-size "$DEVICE_BATCH" --total-batch-size "$TOTAL_BATCH" --compile "$COMPILE"
              --device cuda "${EXTRA[@]}")

PLAN=()
add() { PLAN+=("$(printf '%q ' "$@")"); }
add picochat data prepare --source hf:HuggingFaceFW/fineweb-edu --hf-config sample-100BT --name fineweb \
    --max-chars "$DATA_CHARS" --val-fraction 0.001
add picochat tokenizer train --data fineweb --vocab-size 65536 --max-chars 2000000000
add "${RUN[@]}" train base --data fineweb --depth "$DEPTH" --seq-len "$SEQ" --steps "$BASE_STEPS" \
    "${TRAIN_COMMON[@]}" --eval-every 1000 --save-every 2000 --warmdown-ratio 0.2 --overwrite
# evals: no --device, so each torchrun rank takes cuda:LOCAL_RANK ("cuda" alone would put all on GPU 0)
add "${RUN[@]}" eval base --model "base/d$DEPTH" --tasks core,bpb --corpus fineweb --batch-size "$EVAL_BATCH"
add "${RUN[@]}" train mid --model "base/d$DEPTH" --tasks "smoltalk=1,mmlu=0.5,gsm8k=0.5,spelling=0.2,arithmetic=0.2,identity=0.05" \
    --task-size 200000 --seq-len "$SEQ" --steps "$MID_STEPS" "${TRAIN_COMMON[@]}" --eval-every 0 --overwrite
add "${RUN[@]}" train sft --model "mid/d$DEPTH" --tasks "smoltalk=1,arc-easy=0.3,arc-challenge=0.3,gsm8k=0.5,spelling=0.2,arithmetic=0.2,identity=0.05" \
    --task-size 50000 --seq-len "$SEQ" --steps "$SFT_STEPS" "${TRAIN_COMMON[@]}" --eval-every 200 --overwrite
add "${RUN[@]}" eval chat --model "sft/d$DEPTH" --tasks arc-easy,arc-challenge,mmlu,gsm8k,humaneval,aime-2024,aime-2025 \
    --batch-size "$EVAL_BATCH"
add picochat eval chat --model "sft/d$DEPTH" --tasks spelling,arithmetic --limit 500
add picochat chat --model "sft/d$DEPTH" -p "Why is the sky blue?" --temperature 0
add picochat report --dollars-per-hour "$DOLLARS_PER_HOUR"

echo "gpu_speedrun: $GPUS GPU(s), depth $DEPTH, $BASE_STEPS base steps x $TOTAL_BATCH tokens, compile $COMPILE"
i=0
for cmd in "${PLAN[@]}"; do i=$((i + 1)); echo "  [$i] $cmd"; done

if [ "$DRY" = 1 ]; then
  # parse every command with picochat's own parser (and torchrun's), and check the batch arithmetic
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  printf '%s\n' "${PLAN[@]}" | GPUS="$GPUS" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/speedrun_check.py
  exit 0
fi

command -v nvidia-smi >/dev/null || { echo "gpu_speedrun.sh: error: no nvidia-smi: this script needs NVIDIA GPUs" >&2; exit 1; }
PICOCHAT_TORCH=${PICOCHAT_TORCH:-torch==2.13.0} bash scripts/install.sh
. .venv/bin/activate
mkdir -p "$PICOCHAT_HOME"
TIMES="$PICOCHAT_HOME/gpu_speedrun_times.tsv"
: > "$TIMES"
i=0
for cmd in "${PLAN[@]}"; do
  i=$((i + 1))
  echo; echo "=== [$i] $cmd"
  t0=$EPOCHREALTIME
  eval "$cmd"
  name=$(sed -E 's/.*picochat(\.cli)? ([a-z]+)( ([a-z]+))?.*/\2 \4/; s/ +$//' <<<"$cmd")  # e.g. "train base"
  awk -v n="[$i] $name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%s\t%.1f\n", n, b - a}' | tee -a "$TIMES"
done
echo; echo "=== wall time per step (seconds; also in the report card)"; cat "$TIMES"
