"""Issue #33's quality check: the shipped TM-4 LoRA RM recipe on a float32 and an nf4 frozen base, 2 seeds, the
same held-out split (ROC-AUC, paired per example by scripts/compare_rms.py). Seed-major, so a sweep cut short still
compares the two bases on seed 0.

  python scripts/ablate.py --sweep experiments/sweeps/rm_quant.py --workdir runs/rm_quant
  python scripts/report.py --workdir runs/rm_quant --out experiments/results/quant/rm
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:tm4_lora"  # The shipped recipe: LP-FT, rank 4 on q/k/v/o, 120 steps.
  c.axes = [  # The grid: the product of these axes, the first varying slowest.
      [{"seed": s, "data.shuffle_seed": s} for s in (0, 1)],  # Seeds: init and batch order; one held-out split.
      [{"model.quant": q} for q in ("none", "nf4")],  # How the frozen base is stored (int8: add it here).
  ]
  c.fixed = [{"probe_cache": "runs/probe_cache"}]  # LP-FT features per base (the cache key holds model.quant).
  c.metrics = ("roc_auc",)  # Report column.
  return c
