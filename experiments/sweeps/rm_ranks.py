"""The paper's RM rank ablation: LoRA ranks 1, 4, 8, 16 (α = 2r, attention q/k/v/o) and full tuning, on
Taskmaster-4 (BCE, ROC-AUC) and HH harmless (Bradley-Terry, pair accuracy), 2 seeds.

  python scripts/ablate.py --sweep experiments/sweeps/rm_ranks.py --workdir runs/rm_ranks [--shard I/N]
  python scripts/report.py --workdir runs/rm_ranks --out experiments/results/rm_ranks
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:tm4_lora"  # Base config; the data axis swaps it.
  c.axes = [  # The grid: the product of these axes.
      [{"config": f"{RM}:tm4_lora"}, {"config": f"{RM}:hh_lora"}],  # Data set.
      [*({"lora.rank": r, "lora.alpha": 2.0 * r} for r in (1, 4, 8, 16)),
       {"mode": "full", "optim.lr": 2e-5}],  # Arm: LoRA rank, or full tuning at its own learning rate.
      [{"seed": s, "data.shuffle_seed": s} for s in (0, 1)],  # Seeds: init and batch order; one held-out split.
  ]
  c.fixed = [{"probe_cache": "runs/probe_cache"}]  # LP-FT's frozen features, computed once per data set and mode.
  c.metrics = ("roc_auc", "accuracy")  # Report column: TM-4 rows show ROC-AUC, HH rows pair accuracy.
  return c
