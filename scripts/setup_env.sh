#!/usr/bin/env bash
# Source me: create .venv once, with torch's CPU build installed BEFORE the project, so that
# the project's plain `torch>=2.3` requirement never pulls the multi-GB CUDA build.
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build on a GPU machine).
# Each step that does something says so first; an up-to-date .venv costs no pip call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { echo "-- setup: $*"; }
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $("${PYTHON:-python3}" --version 2>&1) (first run only)"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    say "installing ${TORCH_SPEC:-torch==2.13.0} (the largest download of the set-up)"
    pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# The project itself (editable) with its dependencies; again only when pyproject.toml changed.
stamp=.venv/.ebm-vae-pyproject.toml
if ! cmp -s pyproject.toml "$stamp"; then
    say "installing ebm-vae and its dependencies into .venv (pip install -e '.[dev]')"
    pip install -q -e ".[dev]"
    cp pyproject.toml "$stamp"
fi
