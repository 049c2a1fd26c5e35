#!/usr/bin/env bash
# Runs the whole test suite in .venv (created on first use). Extra arguments go to pytest.
# TEST_WORKERS (default 2) pytest-xdist workers, a test file per worker at a time (module fixtures built once);
# TEST_WORKERS=0 runs in this process (for pdb or -s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
W=${TEST_WORKERS:-2}
PAR=(); [ "$W" != 0 ] && PAR=(-n "$W" --dist loadfile)
exec "${VENV:-.venv}/bin/python" -m pytest -q --durations=15 "${PAR[@]}" "$@" tests
