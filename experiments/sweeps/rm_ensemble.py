"""Issue #32's members: the shipped TM-4 LoRA RM recipe trained K + 1 = 5 times on one frozen backbone, differing
in seed (LoRA A init, run RNG) and batch order (data.shuffle_seed), on one held-out split. Seeds 0-3 are the
ensemble (K = 4); seed 4 is held out of it, a judge no ensemble arm trained against.

Members are sweep points, not one run with stacked adapters: after the first layer every member's hidden states
differ, so K members cost K forward/backward passes either way, and separate runs resume, run on separate machines
and evaluate / export like any RM. Seeds 0 and 1 are the rm_quant sweep's quant=none points (the same config), so
link them rather than train them twice:

  ln -s "$PWD/runs/rm_quant/seed=0,shuffle_seed=0,quant=none" "runs/rm_ensemble/seed=0,shuffle_seed=0"
  ln -s "$PWD/runs/rm_quant/seed=1,shuffle_seed=1,quant=none" "runs/rm_ensemble/seed=1,shuffle_seed=1"
  python scripts/ablate.py --sweep experiments/sweeps/rm_ensemble.py --workdir runs/rm_ensemble
  python scripts/average_rm.py --how exact --out runs/rm_ensemble/average_exact \
      --runs "runs/rm_ensemble/seed=0,shuffle_seed=0" ... (seeds 0-3)
  python scripts/compare_rms.py --data experiments/data/taskmaster4/reward.jsonl.gz \
      --runs "runs/rm_ensemble/seed=0,shuffle_seed=0" --runs runs/rm_ensemble/average_exact ... \
      --members "runs/rm_ensemble/seed=0,shuffle_seed=0" ... (seeds 0-3)
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:tm4_lora"  # The shipped recipe: LP-FT, rank 4 on q/k/v/o, 120 steps.
  c.axes = [[{"seed": s, "data.shuffle_seed": s} for s in range(5)]]  # Members 0-3, then the held-out seed 4.
  c.fixed = [{"probe_cache": "runs/probe_cache"}]  # LP-FT features computed once for the one base.
  c.metrics = ("roc_auc",)  # Report column.
  return c
