"""The paper's RL table at small scale (issue #30): LoRA vs full RL quality, REINFORCE + value (the paper) and RLOO,
over seeds, against one RM from one SFT anchor; every arm judged on the same held-out prompts.

  python scripts/ablate.py --sweep experiments/sweeps/rl_quality.py --workdir runs/rl_quality \
      --set reward_workdir=runs/demo/rm --set sft_workdir=runs/demo/sft
  python scripts/judge_texts.py --sweep_dir runs/rl_quality   # the independent judge on every arm's texts
  python scripts/report_rl.py --workdir runs/rl_quality --out experiments/results/rl_quality
Points run seed-major (every arm of seed 0, then of seed 1), so a sweep cut short still pairs LoRA and full.
Every arm draws 16 samples a step (REINFORCE: 16 prompts × 1; RLOO: 4 prompts × 4) of at most 64 new tokens after
a 96-token prompt, for 10 RL steps, writes every training sample with its RM reward (samples.jsonl; judge_texts
scores them per step) and ends with eval_policy's held-out eval on 128 prompts, texts kept (eval_texts_10.jsonl).
"""
import ml_collections

RL = "experiments/rl/smollm2.py"
LORA_LR = 3e-3  # The demo's LoRA rate (issue #28: 3e-3 over 1e-3; on dev, RLOO +0.27 [+0.08, +0.47]).
# Chosen on 128 dev prompts (full RLOO, seed 0) by the larger reward difference: 5e-5 gave +0.157 [-0.001, +0.312]
# at KL 5.1, 1.5e-4 +0.213 [+0.045, +0.377] at KL 20.4 (results README). 1.5e-5 was left out: in the rl_arms sweep
# it moved the policy least (train KL <= 0.81).
FULL_LR = 1.5e-4


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_rl.py"  # Each point is an ordinary train_rl run.
  c.config = f"{RL}:tm4_lora"  # Base config; the arm axis swaps it.
  c.fixed = [dict(steps=10, log_every=1, checkpoint_every=10,  # The shape every arm shares.
                  num_sample_texts=16,  # Every rollout row of every step, with its RM reward (the judge reads them).
                  **{"data.max_train_prompts": 512, "data.max_prompt_len": 96, "rl.max_new_tokens": 64,
                     "optim.warmup_steps": 2, "eval_prompts": 128, "eval_batch_size": 64,
                     "rl.num_microbatches": 2})]  # 8 rows per gradient pass: full tuning's update fits in 24 GiB.
  arms = []
  for mode, lr in (("lora", LORA_LR), ("full", FULL_LR)):
    for algo, batch in (("paper", 16), ("rloo", 4)):
      arms.append({"config": f"{RL}:tm4_{mode}_{algo}", "data.batch_size": batch, "optim.lr": lr})
  c.axes = [  # The grid: the product of these axes, the first the slowest.
      [{"seed": 0}, {"seed": 1}],  # Seeds: the policy's init and the sampling RNG (prompt order is data.seed's).
      arms,  # Arm: mode × estimator, with the prompts per step that make 16 samples and the mode's learning rate.
  ]
  c.metrics = ("reward_diff", "win_rate", "reward_after", "kl")  # Report column: the first an arm has.
  c.curves = ("train/reward_mean", "train/kl_ref")  # Per-arm curves against steps (curves.png).
  return c
