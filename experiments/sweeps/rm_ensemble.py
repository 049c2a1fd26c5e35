"""Issue #32's members: K + 1 = 5 LoRA RMs on one frozen backbone, differing in seed (LoRA A init, run RNG), batch
order (data.shuffle_seed) and data: each trains on its own bootstrap resample of the training split
(data.bootstrap_seed), so its LP-FT probe also sees its own 512 rows. Members 0-3 are the ensemble (K = 4); member 4
is held out of it, a judge no ensemble arm trains against. One held-out split (data.seed 0) for all.

The recipe is the demo's RM (the RM RL measurably moves, experiments/results/rl_signal: 128-token windows, balanced
classes, strong L2 on the probe) with 20 LoRA steps instead of 4: about 2 minutes a member on 2 CPU cores, where the
shipped 120-step tm4_lora recipe takes ~35.

Members are sweep points, not one run with stacked adapters: after the first layer every member's hidden states
differ, so K members cost K forward/backward passes either way, and separate runs resume, run on separate machines
and evaluate / export like any RM.

  python scripts/ablate.py --sweep experiments/sweeps/rm_ensemble.py --workdir runs/rm_ensemble
  python scripts/average_rm.py --how exact --out runs/rm_ensemble/average_exact \\
      --runs runs/rm_ensemble/member0 --runs runs/rm_ensemble/member1 --runs runs/rm_ensemble/member2 \\
      --runs runs/rm_ensemble/member3            # and --how factor --out runs/rm_ensemble/average_factor
  python scripts/compare_rms.py --data experiments/data/taskmaster4/reward.jsonl.gz \\
      --runs runs/rm_ensemble/member0 --runs runs/rm_ensemble/average_exact ... \\
      --members runs/rm_ensemble/member0 ... (members 0-3) --ensemble mean
"""
import ml_collections

RM = "experiments/rm/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"  # Each point is an ordinary train_reward run.
  c.config = f"{RM}:tm4_lora"  # TM-4 thumbs up/down, LoRA rank 4 on q/k/v/o, LP-FT.
  c.axes = [[{"_name": f"member{s}", "seed": s, "data.shuffle_seed": s, "data.bootstrap_seed": s}
             for s in range(5)]]  # Members 0-3, then the held-out member 4.
  c.fixed = [{  # The demo's RM recipe (scripts/demo.sh, step 3), 20 steps.
      "steps": 20, "data.batch_size": 8, "data.max_len": 128, "data.min_prompt_tokens": 32, "probe_examples": 512,
      "balance_classes": True, "probe_cs": (0.0001, 0.0003, 0.001, 0.003), "optim.warmup_steps": 2,
      "eval_every": 20, "checkpoint_every": 20}]
  c.metrics = ("roc_auc",)  # Report column.
  return c
