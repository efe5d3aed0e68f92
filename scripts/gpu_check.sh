#!/usr/bin/env bash
# The GPU check: training tokens/s + MFU (d12, d20), grad-checkpoint memory, bf16 decode at batch 1/8/32
# with and without CUDA graphs, speculative decoding, MLA vs MHA decode at 4k context, a torchrun smoke
# run. At most ~10 minutes on one H100/H200. Prints a table and a final JSON line (docs/gpu.md).
#
#   bash scripts/gpu_check.sh              # on a CUDA machine
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the plan, then every part at tiny size on CPU
#
# Installs nothing when the machine's python already has torch with CUDA (GPU images usually do and
# may have no network); picochat's own pure-Python needs not in the image can be put as wheels in .whl/
# (docs/gpu.md). Otherwise set PYTHON to an interpreter that has them, or run scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/picochat-site .whl/*.whl
  export PYTHONPATH="/tmp/picochat-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
