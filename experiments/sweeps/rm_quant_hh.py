"""Issue #33's quality check on Anthropic HH-RLHF harmless pairs (Bradley-Terry): the shipped HH LoRA RM recipe on a
float32, an nf4 and an int8 frozen base, 2 seeds, one held-out split; pair accuracy, paired per pair by compare_rms.
Seed-major, so a sweep cut short still compares the bases on seed 0. (TM-4: rm_quant.py.)
Shortened to 60 steps for every base (the shipped 120 took ~52 min a run on 2 CPU cores; the shipped run's held-out
accuracy was 0.667 / 0.676 / 0.672 at steps 40 / 80 / 120, so most of it is learned by step 60).

  python scripts/ablate.py --sweep experiments/sweeps/rm_quant_hh.py --workdir runs/rm_quant_hh
  python scripts/compare_rms.py --data experiments/data/hh-rlhf-harmless/pairs.jsonl.gz \
      --runs "runs/rm_quant_hh/seed=0,shuffle_seed=0,quant=none" \
      --runs "runs/rm_quant_hh/seed=0,shuffle_seed=0,quant=nf4" \
      --runs "runs/rm_quant_hh/seed=0,shuffle_seed=0,quant=int8"
(Both seeds' commands and the table: experiments/results/quant/README.md, "HH-RLHF harmless".)
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:hh_lora"  # The shipped HH recipe.
  c.axes = [  # The grid: the product of these axes, the first varying slowest.
      [{"seed": s, "data.shuffle_seed": s} for s in (0, 1)],  # Seeds: init and batch order; one held-out split.
      [{"model.quant": q} for q in ("none", "nf4", "int8")],  # How the frozen base is stored.
  ]
  c.fixed = [{"probe_cache": "runs/probe_cache",  # LP-FT features per base, computed once and shared by the seeds.
              "steps": 60, "eval_every": 30, "checkpoint_every": 30}]  # Half the shipped recipe, every base alike.
  c.metrics = ("accuracy",)  # Report column: held-out pair accuracy.
  return c
