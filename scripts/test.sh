#!/usr/bin/env bash
# Runs the whole test suite in .venv (created on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${VENV:-.venv}/bin/python" -m pytest -q --durations=15 "$@" tests
