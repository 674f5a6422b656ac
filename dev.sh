#!/usr/bin/env bash
# The README's two commands:  bash dev.sh demo   |   bash dev.sh test [pytest args]
# Sets up .venv (reusing an importable torch, else installing torch==2.13.0, the CPU wheel here),
# installs LayerZero editable with its test extras, then runs the demo or the test suite (after
# ruff check and ruff format --check of src: CI runs this).
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$py" -c "import torch" >/dev/null 2>&1; then
    "$py" -m venv --system-site-packages .venv     # GPU machines: keep their CUDA torch
  else
    "$py" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
stamp=.venv/.layerzero-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]" && touch "$stamp"
fi
cmd=${1:-test}; shift || true
case "$cmd" in
  demo) exec .venv/bin/python -m layerzero.demo "$@" ;;
  test) .venv/bin/ruff check src && .venv/bin/ruff format --check src && exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash dev.sh demo|test [args]" >&2; exit 2 ;;
esac
