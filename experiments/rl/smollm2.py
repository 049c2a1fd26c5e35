"""RL (PERL) of SmolLM2-135M-Instruct against a trained reward model, from an SFT run: LoRA vs full tuning.

  python scripts/train_rl.py --config experiments/rl/smollm2.py:tm4_lora --workdir runs/rl_tm4_lora \
      --config.reward_workdir=runs/tm4_lora --config.sft_workdir=runs/sft_tm4_lora
Arguments: {tm4,hh}_{lora,full}[_ppo] (REINFORCE by default, as the paper's main runs; "_ppo" for PPO).
The RM and SFT runs must share the backbone and tokenizer; LoRA-mode RL needs LoRA RM and SFT runs.
"""
import ml_collections

DATA = {
    "tm4": dict(format="taskmaster4", path="experiments/data/taskmaster4/reward.jsonl.gz", skip_invalid=False),
    "hh": dict(format="hh_rlhf", path="experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", skip_invalid=True),
}


def get_config(arg: str = "tm4_lora") -> ml_collections.ConfigDict:
  parts = arg.split("_")
  dataset, mode, algorithm = parts[0], parts[1], parts[2] if len(parts) > 2 else "reinforce"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = mode  # "lora": policy / value LoRA on the one frozen backbone; "full": trainable backbone copies.
  c.reward_workdir = ""  # An RM run folder (required).
  c.sft_workdir = ""  # An SFT run folder; empty = the base model is the policy's anchor.
  # remat "auto": "dots" on CPU (update 0.92x the time, step 0.76x the compiled peak of "none" at 8 x (192 + 48)).
  c.model = dict(path="", param_dtype="float32", dtype="float32", remat="auto", attention="auto")
  c.data = dict(eval_fraction=0.1, seed=0, batch_size=8, max_prompt_len=192, max_train_prompts=0,
                truncate_prompts=True,  # A longer prompt keeps its last max_prompt_len tokens; False: an error.
                **DATA[dataset])
  c.lora = dict(rank=4, alpha=8.0, targets="attention")  # The policy LoRA (paper: attention, small ranks).
  c.rl = dict(
      algorithm=algorithm, objective="perl",  # "perl": (1−β)·r − β·KL; "standard": r − β·KL.
      kl_coef=0.05, kl_estimator="k1", kl_target=0.0, kl_horizon=10000,  # kl_target 0 = fixed β.
      max_new_tokens=48, temperature=0.7, top_k=0, top_p=1.0, stop_strings=["<|im_end|>"],
      gamma=1.0, lam=0.95, whiten_advantages=True,
      clip_eps=0.2, value_clip_eps=0.0, vf_coef=0.1,  # value_clip_eps 0 = off.
      ppo_epochs=2 if algorithm == "ppo" else 1, num_minibatches=2 if algorithm == "ppo" else 1,
      value_init="reward")  # "reward": value LoRA + head start from the RM's; "fresh".
  c.optim = dict(lr=1e-4 if mode == "lora" else 5e-6, warmup_steps=5, weight_decay=0.0, clip_norm=1.0)
  c.steps = 100
  c.log_every = 5
  c.eval_every = 0  # Held-out eval cadence (0 = only at the last step).
  c.eval_prompts = 32  # Held-out prompts the eval samples (policy vs SFT anchor under the RM); 0 = no eval.
  c.checkpoint_every = 25
  c.keep_checkpoints = 2
  c.num_sample_texts = 3
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.multihost = False
  return c
