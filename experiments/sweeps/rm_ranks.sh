#!/usr/bin/env bash
# The paper's rank ablation for the reward model: LoRA ranks 1-16 on attention, plus full tuning, one dataset.
# Usage: bash experiments/sweeps/rm_ranks.sh tm4|hh [extra --config.* overrides]   (results: runs/sweep_*)
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${1:-tm4}; shift || true
for r in 1 2 4 8 16; do
  .venv/bin/python scripts/train_reward.py --config experiments/rm/smollm2.py:${data}_lora \
    --workdir runs/sweep_${data}_r$r --config.lora.rank=$r --config.lora.alpha=$((2 * r)) "$@"
done
.venv/bin/python scripts/train_reward.py --config experiments/rm/smollm2.py:${data}_full --workdir runs/sweep_${data}_full "$@"
.venv/bin/python scripts/report_rm.py runs/sweep_${data}_r{1,2,4,8,16} runs/sweep_${data}_full
