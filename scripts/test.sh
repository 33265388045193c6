#!/usr/bin/env bash
# The test command (README, CI): set up .venv, lint, then the fast test tier.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
ruff check .
python -m pytest -q "$@"
