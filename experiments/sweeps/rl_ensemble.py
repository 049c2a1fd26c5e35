"""Issue #32's over-optimisation runs: the LoRA RLOO policy tuned against one RM, against the K = 4 ensemble (mean,
and mean − std) and against its weight average (WARM, the exact rank-K·r average), each judged at every eval by the
held-out member 4 that none of them trains against. Members: experiments/sweeps/rm_ensemble.py.

  python scripts/average_rm.py --how exact --out runs/rm_ensemble/average_exact \
      --runs runs/rm_ensemble/member0 --runs runs/rm_ensemble/member1 --runs runs/rm_ensemble/member2 \
      --runs runs/rm_ensemble/member3
  python scripts/ablate.py --sweep experiments/sweeps/rl_ensemble.py --workdir runs/rl_ensemble \
      --set sft_workdir=runs/demo/sft
  python scripts/report_overopt.py --workdir runs/rl_ensemble --out experiments/results/ensembles
Every arm shares rl_quality's LoRA RLOO shape (16 samples a step: 4 prompts × 4, ≤ 64 new tokens after a 96-token
prompt, lr 3e-3) and evaluates 64 held-out prompts every 4 steps, so each arm traces proxy and judge reward against
KL (Gao et al.'s curve). Seed-major, so a sweep cut short still compares every arm on seed 0.
"""
import ml_collections

RL = "experiments/rl/smollm2.py"
MEMBERS = "runs/rm_ensemble/member[0-3]"  # The K = 4 members (a glob over the rm_ensemble sweep's points).
JUDGE = "runs/rm_ensemble/member4"  # Held out of every arm's reward.


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_rl.py"  # Each point is an ordinary train_rl run.
  c.config = f"{RL}:tm4_lora_rloo"  # LoRA RLOO (rl_quality's arm that moved its RM).
  c.fixed = [dict(steps=12, log_every=1, eval_every=4, checkpoint_every=4, judge_workdir=JUDGE,
                  num_sample_texts=16,  # Every rollout row, with its proxy reward.
                  **{"data.batch_size": 4, "data.max_train_prompts": 512, "data.max_prompt_len": 96,
                     "rl.max_new_tokens": 64, "optim.warmup_steps": 2, "optim.lr": 3e-3, "eval_prompts": 64,
                     "eval_batch_size": 64})]
  c.axes = [  # The grid: the product of these axes, the first the slowest.
      [{"seed": 0}, {"seed": 1}],  # The policy's init and the sampling RNG.
      [  # The reward each arm trains against.
          {"_name": "single", "reward_workdir": "runs/rm_ensemble/member0"},
          {"_name": "ensemble_mean", "reward_workdir": MEMBERS, "rl.reward_ensemble": "mean"},
          {"_name": "ensemble_mean_minus_std", "reward_workdir": MEMBERS, "rl.reward_ensemble": "mean_minus_std"},
          {"_name": "warm_exact", "reward_workdir": "runs/rm_ensemble/average_exact"},
      ],
  ]
  c.metrics = ("judge_reward_diff", "reward_diff", "kl")  # Report column: the first an arm has.
  c.curves = ("train/reward_mean", "train/kl_ref")  # Per-arm curves against steps.
  return c
