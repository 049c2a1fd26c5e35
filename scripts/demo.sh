#!/usr/bin/env bash
# End-to-end demo on the embedded SmolLM2-135M-Instruct and the paper's Taskmaster-4 data, on CPU in minutes:
#  1. load the real model into our Flax/JAX decoder, attach LoRA, continue a prompt with the KV cache;
#  2. train a PERL reward model (LoRA rank 4 on attention + scalar head, BCE on thumbs up/down) briefly,
#     evaluate it on a held-out split, and export it as a PEFT adapter and as a merged HF folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${VENV:-.venv}/bin/python  # VENV=folder: the venv setup_env.sh makes and uses (default .venv)
W=${DEMO_WORKDIR:-runs/demo_tm4_lora}
STEPS=${DEMO_STEPS:-30}
rm -rf "$W"
echo "== 1. generate =="
$PY scripts/generate.py --max_new_tokens 40
echo "== 2. PERL reward model on Taskmaster-4 ($STEPS steps) =="
$PY scripts/train_reward.py --config experiments/rm/smollm2.py:tm4_lora --workdir "$W" \
  --config.steps="$STEPS" --config.data.batch_size=8 --config.data.max_len=192 --config.eval_every="$STEPS" \
  --config.checkpoint_every="$STEPS" --config.data.max_eval_examples=128
echo "== 3. held-out metrics (scripts/eval_reward.py) =="
$PY scripts/eval_reward.py --workdir "$W" --data experiments/data/taskmaster4/reward.jsonl.gz --split eval
echo "== 4. export =="
$PY scripts/export.py --workdir "$W" --out "$W/export_peft" --format peft
$PY scripts/export.py --workdir "$W" --out "$W/export_merged" --format merged
ls "$W" "$W/export_peft" "$W/export_merged"
echo "metrics: $W/metrics.jsonl   TensorBoard: tensorboard --logdir $W/tb"
