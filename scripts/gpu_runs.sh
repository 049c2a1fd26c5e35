#!/usr/bin/env bash
# The GPU figures (experiments/results/benchmarks/README.md, "On one H200"; experiments/results/gpu_h200/), one
# command per stage.
#
#   bash scripts/gpu_runs.sh bench   OUTDIR             # RM and RL steps: LoRA vs full, attention kernels
#   bash scripts/gpu_runs.sh recipes OUTDIR MODEL.gguf  # the shipped RM recipes at max_len 512, 4 runs at once
#   bash scripts/gpu_runs.sh sweep   OUTDIR MODEL.gguf  # the RM rank sweep (20 points) at max_len 512, 5 shards
#   bash scripts/gpu_runs.sh quant   OUTDIR             # issue #33: LoRA steps on a bf16 / int8 / nf4 base, measured
#
# Runs under whatever python3 the machine has (PYTHON=... to change), from the repository root. Each job has its
# own time limit (BUDGET_S for the whole stage), so one failure or a slow compile costs that job alone; every
# job's output goes to OUTDIR/<job>.log and its rows to OUTDIR/*.jsonl. RECIPE_FLAGS: extra train_reward.py flags
# (a quick local try: RECIPE_FLAGS="--config.steps=2 --config.probe_examples=16").
set -uo pipefail
stage=${1:?bench or recipes}; out=${2:?OUTDIR}; model=${3:-}
py=${PYTHON:-python3}
budget=${BUDGET_S:-280}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
t0=$(date +%s)

job() {  # job NAME LIMIT_S CMD...: runs CMD unless the stage's budget is spent; prints its last lines.
  local name=$1 limit=$2; shift 2
  local left=$((budget - ($(date +%s) - t0)))
  if ((left < 20)); then echo "== $name: skipped (budget spent)"; return 0; fi
  ((limit > left)) && limit=$left
  local s=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $(($(date +%s) - s)) s"
  grep -v "^I[0-9]\{4\}\|^W[0-9]\{4\}" "$out/$name.log" | tail -n "${TAIL:-6}" | cut -c1-400
}

share_machine() {  # share_machine N: N processes share the GPU (no preallocation, each takes what it needs)
  # and the host's cores for numpy's BLAS (the LP-FT probe's fit). Each OpenBLAS otherwise starts one thread per
  # core: on the H200 lease of stop 27, five shards' probe fits (2 s alone) had not finished after 4 min, most
  # likely for this reason; on the 2-core CPU, 4 processes x 2 threads took 24-29 s per fit vs 5 s with one each.
  local t=$(($(nproc) / $1)); ((t < 1)) && t=1
  export XLA_PYTHON_CLIENT_PREALLOCATE=false OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t
}

case $stage in
bench)
  bench=(scripts/benchmark.py --steps 5)
  job versions 60 $py -c "import jax, flax, optax, orbax.checkpoint as o; print(jax.__version__, flax.__version__,
optax.__version__, jax.devices())"
  job smoke 90 $py "${bench[@]}" --model tiny --out "$out/smoke.jsonl"
  # Ordered by what a short lease should bring back first (lesson of the first H200 lease: our default "auto"
  # kernel compiled for 53 s per mode there, cuDNN's in 8.5 s and ran 2.8x faster than XLA's).
  # 1. The paper's RM claim at 135M and ~1B: full vs LoRA step time and peak memory, cuDNN attention.
  job rm_135m_cudnn 120 $py "${bench[@]}" --model smollm2-135m --batch 8 --seq 1024 --attention cudnn \
      --out "$out/rm.jsonl"
  job rm_1b_cudnn 150 $py "${bench[@]}" --model 1b --batch 8 --seq 1024 --attention cudnn --out "$out/rm.jsonl"
  # 2. The RL update step with every role resident (default kernel: sampling decodes one token at a time).
  job rl_135m 150 $py "${bench[@]}" --phase rl --model smollm2-135m --out "$out/rl.jsonl"
  # 3. The attention kernels on the same LoRA step: XLA's, then ours.
  job rm_135m_xla 60 $py "${bench[@]}" --model smollm2-135m --batch 8 --seq 1024 --modes lora \
      --attention xla --no-isolate --out "$out/attn.jsonl"
  job rm_135m_auto 120 $py "${bench[@]}" --model smollm2-135m --batch 8 --seq 1024 --modes lora \
      --no-isolate --out "$out/attn.jsonl"
  ;;
recipes)
  [[ -f $model ]] || { echo "recipes: no model file '$model'"; exit 2; }
  # Four runs share the machine. One compiled shape per run (no length buckets: each bucket would be one more
  # compile, which costs more than its padding saves here).
  share_machine 4
  for r in tm4_lora tm4_full hh_lora hh_full; do
    TAIL=3 job "$r" "$budget" $py scripts/train_reward.py --config "experiments/rm/smollm2.py:$r" \
        --workdir "$out/runs/$r" --config.model.path="$model" --config.data.max_len=512 \
        --config.data.bucket_by_length=False ${RECIPE_FLAGS:-} &
  done
  wait
  for r in tm4_lora tm4_full hh_lora hh_full; do
    echo "== $r"; grep "eval step" "$out/$r.log" | sed 's/.*eval step/eval step/' | cut -c1-200
    cp "$out/runs/$r/summary.json" "$out/$r.summary.json" 2>/dev/null
  done
  ;;
sweep)
  [[ -f $model ]] || { echo "sweep: no model file '$model'"; exit 2; }
  # experiments/sweeps/rm_ranks.py as on CPU (same 120 steps, points, names), untruncated (max_len 512, no length
  # buckets), bf16 compute with cuDNN attention (right-padded rows: no fully masked query row), no mid-run
  # checkpoints. SHARDS processes share the GPU, each runs every SHARDS-th point. SWEEP_SETS: more --set flags.
  n=${SHARDS:-5}
  share_machine "$n"
  for ((i = 0; i < n; i++)); do
    TAIL=2 job "shard$i" "$budget" $py scripts/ablate.py --sweep experiments/sweeps/rm_ranks.py \
        --workdir "$out/rm_ranks" --shard "$i/$n" --set model.path="$model" --set data.max_len=512 \
        --set data.bucket_by_length=False --set model.dtype=bfloat16 --set model.attention="${ATTENTION:-cudnn}" \
        --set checkpoint_every=100000 ${SWEEP_SETS:-} &
  done
  wait
  (cd "$out" && tar czf rm_ranks.tgz --exclude=checkpoints --exclude=tb rm_ranks)
  $py scripts/report.py --workdir "$out/rm_ranks" --out "$out/report" 2>&1 | tail -n 30
  ;;
quant)
  # experiments/results/quant's rows on an accelerator: peak_bytes_in_use and step time of the LoRA RM step and RL
  # update on a bf16, int8 and nf4 frozen base (each mode in its own process), the dequantize cost measured where
  # the matmuls are fast. MODELS: presets, smallest first (a quick local try: MODELS=tiny ATTENTION=xla).
  # One lease call: BUDGET_S=560 (the 1B rows come back first).
  bench=(scripts/benchmark.py --steps 5 --modes lora --quant none,int8,nf4,nf4dq)
  for m in ${MODELS:-1b 7b}; do
    job "quant_rm_$m" 300 $py "${bench[@]}" --model "$m" --attention "${ATTENTION:-cudnn}" --microbatches \
        "$([[ $m == 7b ]] && echo 4 || echo 1)" --out "$out/quant_rm.jsonl"
    job "quant_rl_$m" 300 $py "${bench[@]}" --phase rl --model "$m" --out "$out/quant_rl.jsonl"
  done
  ;;
*) echo "unknown stage '$stage'"; exit 2 ;;
esac
echo "stage $stage done in $(($(date +%s) - t0)) s"
