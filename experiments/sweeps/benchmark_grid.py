"""The memory grid: compiled peak memory of one RM step and one RL update step, LoRA vs full, across the model
presets, from shapes alone (--abstract: nothing is allocated, so 7B comes out on a CPU). Each point is an
ordinary scripts/benchmark.py run (both modes) writing its rows to POINT/rows.jsonl.

  python scripts/ablate.py --sweep experiments/sweeps/benchmark_grid.py --workdir runs/benchmark_grid
  python scripts/plot_benchmark.py runs/benchmark_grid/*/rows.jsonl --prefix experiments/results/benchmark_grid
On an accelerator drop "abstract" (--set abstract=False) to time the steps and read peak_bytes_in_use as well.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/benchmark.py"  # A flags-only script: overrides become --KEY=VALUE.
  c.args = "flags"  # benchmark.py takes flags, not a config: overrides become --KEY=VALUE.
  c.out_flag = "out"  # Each point's rows go to --out=POINT/rows.jsonl ...
  c.done = "rows.jsonl"  # ... whose presence marks it done.
  c.config = ""  # Unused with args "flags".
  c.axes = [  # The grid: the product of these axes.
      [{"phase": "rm"}, {"phase": "rl"}],  # The RM train step, or the RL update step with every role resident.
      [{"model": m} for m in ("smollm2-135m", "1b", "2b", "7b")],  # Presets (random weights, real shapes).
  ]
  c.fixed = [{"abstract": True, "modes": "full,lora"}]  # Every point: compile only, both modes.
  return c
