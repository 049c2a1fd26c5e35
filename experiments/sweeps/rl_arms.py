"""RL arms on SmolLM2-135M: LoRA vs full tuning × REINFORCE + value (the paper), RLOO and PPO, against one RM from
one SFT anchor.

  python scripts/ablate.py --sweep experiments/sweeps/rl_arms.py --workdir runs/rl_arms \
      --set reward_workdir=runs/demo/rm --set sft_workdir=runs/demo/sft [--set steps=10]
  python scripts/report.py --workdir runs/rl_arms --out experiments/results/rl_arms
Each run ends with the held-out eval (reward before / after under the RM, KL to the anchor, win rate).
"""
import ml_collections

RL = "experiments/rl/smollm2.py"


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_rl.py"  # Each point is an ordinary train_rl run.
  c.config = f"{RL}:tm4_lora"  # Base config; the arm axis swaps it.
  c.axes = [
      [{"config": f"{RL}:{arm}"} for arm in ("tm4_lora", "tm4_lora_rloo", "tm4_lora_ppo",
                                             "tm4_full", "tm4_full_rloo", "tm4_full_ppo")],  # Arm.
      [{"seed": 0}],  # Seeds; add more for error bars.
  ]
  c.metrics = ("reward_diff", "win_rate", "reward_after", "kl")  # Report column: the first an arm has.
  c.curves = ("train/reward_mean", "train/kl_ref")  # Per-arm curves against steps (curves.png).
  return c
