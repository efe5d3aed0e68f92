#!/usr/bin/env bash
# Install everything (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PICOCHAT_TEST_BROWSER=1 bash scripts/install.sh   # the test path also installs chromium for the UI test
. .venv/bin/activate
python -m pytest tests "$@"
