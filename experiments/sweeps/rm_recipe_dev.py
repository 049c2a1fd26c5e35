"""How the Taskmaster-4 LoRA RM recipe was chosen: a few levers at one CPU budget, scored on a DEV split carved
from the training part (data.dev_fraction), never on the held-out split experiments/results/rm_quality reports.

  python scripts/ablate.py --sweep experiments/sweeps/rm_recipe_dev.py --workdir runs/rm_recipe_dev
  python scripts/report.py --workdir runs/rm_recipe_dev --out experiments/results/rm_recipe_dev
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:tm4_lora"  # Base config: PERL's LoRA RM (rank 4, attention q/k/v/o).
  c.axes = [  # The grid: the product of these axes.
      [{"optim.lr": 5e-4},  # The shipped default before this search.
       {"optim.lr": 2e-3},  # A 4× higher adapter learning rate.
       {"optim.lr": 2e-3, "balance_classes": True},  # ... and class-balanced BCE (86% of labels are positive).
       {"optim.lr": 5e-4, "head_init": "probe"},  # LP-FT: the head starts as a probe of the frozen features.
       {"optim.lr": 1e-4, "head_init": "probe"},  # ... fine-tuned gently (LP-FT's advice: a small lr).
       {"optim.lr": 5e-4, "head_init": "probe", "lora.targets": "attention_mlp"},  # What the MLP adds.
       # The RM starts from an SFT model (train it first: experiments/results/rm_quality's command for runs/sft_tm4_dev).
       {"optim.lr": 5e-4, "head_init": "probe", "init_from": "runs/sft_tm4_dev"}],
  ]
  c.fixed = [{  # The same budget and dev split for every point.
      "data.dev_fraction": 0.15, "steps": 40, "data.batch_size": 16, "data.max_len": 192,
      "data.bucket_by_length": True, "optim.warmup_steps": 5, "eval_every": 40, "checkpoint_every": 40,
      "head_init": "random", "probe_examples": 0,  # The defaults when the search ran; an axis value wins.
      "probe_cache": "runs/probe_cache",  # LP-FT points share one feature pass (the frozen model's).
  }]
  c.metrics = ("roc_auc", "balanced_accuracy")  # Report columns (dev split).
  return c
