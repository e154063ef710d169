#!/usr/bin/env bash
# Sets up, builds and runs the whole test suite:
#   1. C++ (ctest) in the release build,
#   2. the same tests under AddressSanitizer + UBSan,
#   3. the Python module (pip install . into .venv) and its tests, including interop with the
#      real SAELens (sae-lens and torch from PyPI).
# Usage: bash scripts/test.sh [--no-asan] [--no-python]
set -euo pipefail
cd "$(dirname "$0")/.."
asan=1
python=1
for a in "$@"; do
  case $a in
    --no-asan) asan=0 ;;
    --no-python) python=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
jobs=$(nproc)

cmake --preset release
cmake --build --preset release -j "$jobs"
ctest --preset release -j "$jobs"

if ((asan)); then
  cmake --preset asan
  cmake --build --preset asan -j "$jobs"
  ctest --preset asan -j "$jobs"
fi

if ((python)); then
  venv=${SAECPP_VENV:-.venv}
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q ".[test]"
  "$venv/bin/python" -m pytest -q tests/python
fi
