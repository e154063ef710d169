#!/usr/bin/env bash
# Rebuilds tests/goldens/ with the real SAELens: creates .venv (sae-lens, torch), then runs
# scripts/make_goldens.py and scripts/gen_pretrained_table.py. ctest needs none of this.
# Usage: bash scripts/make_goldens.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAECPP_VENV:-.venv}
if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q sae-lens torch
"$VENV/bin/python" scripts/make_goldens.py
"$VENV/bin/python" scripts/gen_pretrained_table.py
"$VENV/bin/python" scripts/make_window_goldens.py
