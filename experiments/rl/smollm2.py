"""RL (PERL) of SmolLM2-135M-Instruct against a trained reward model, from an SFT run: LoRA vs full tuning.

  python scripts/train_rl.py --config experiments/rl/smollm2.py:tm4_lora --workdir runs/rl_tm4_lora \
      --config.reward_workdir=runs/tm4_lora --config.sft_workdir=runs/sft_tm4_lora
Arguments: {tm4,hh,custom}_{lora,full}[_ppo|_rloo|_grpo]: REINFORCE with a learned LoRA value baseline by default (the
paper's main runs; "_paper" says so explicitly), PPO (clipped ratio + GAE), RLOO or GRPO (k samples per prompt,
each one's baseline from the others: no value role).
The RM and SFT runs must share the backbone and tokenizer; LoRA-mode RL needs LoRA RM and SFT runs.
"""
import ml_collections

DATA = {
    "tm4": dict(format="taskmaster4", path="experiments/data/taskmaster4/reward.jsonl.gz", skip_invalid=False),
    "hh": dict(format="hh_rlhf", path="experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", skip_invalid=True),
    # Your own prompts: prompt, messages or a preference format; point data.path at the file.
    "custom": dict(format="prompt", path="experiments/data/examples/prompt.jsonl", skip_invalid=False),
}


def get_config(arg: str = "tm4_lora") -> ml_collections.ConfigDict:
  parts = arg.split("_")
  dataset, mode, algorithm = (parts + ["paper"])[:3] if len(parts) in (2, 3) else ("", "", "")
  if dataset not in DATA or mode not in ("lora", "full") or algorithm not in ("paper", "reinforce", "rloo", "grpo",
                                                                                "ppo"):
    raise ValueError(f"config argument {arg!r}: expected DATASET_MODE[_ALGORITHM], DATASET one of {sorted(DATA)}, "
                     "MODE lora or full, ALGORITHM paper (default), rloo, grpo or ppo (e.g. tm4_lora_rloo)")
  algorithm = "reinforce" if algorithm == "paper" else algorithm
  group = algorithm in ("rloo", "grpo")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds the trainable init and the run's RNG (sampling).
  c.mode = mode  # "lora": policy / value LoRA on the one frozen backbone; "full": trainable backbone copies.
  # An RM run folder (required). An ensemble: K LoRA RM folders joined by ':', each may be a glob ('runs/ens/seed=*').
  c.reward_workdir = ""
  c.sft_workdir = ""  # An SFT run folder; empty = the base model is the policy's anchor.
  c.judge_workdir = ""  # An RM run the policy does not train against: each eval also reports its judge_* figures.
  # remat "auto": "dots" on CPU (update 0.92x the time, step 0.76x the compiled peak of "none" at 8 x (192 + 48)).
  # path: "" = the embedded SmolLM2-135M-Instruct GGUF, else a .gguf file, an HF folder or a Hub id ("org/name",
  # resolved online or from the HF cache; revision: a Hub branch, tag or commit, "" = main).
  # dtype "auto": bf16 compute on GPU / TPU, float32 on CPU (the tests' oracles). The roles are loaded with these
  # run-time fields, not the RM run's. param_dtype=bfloat16 also halves the frozen base's memory on an accelerator.
  # quant: the frozen base's layer kernels stored "int8" (per output channel) or "nf4" (4-bit NormalFloat, blocks of
  # quant_block input rows), dequantized one projection at a time in the forward; LoRA mode only. "none": as loaded.
  # quant_double: nf4's block scales stored as int8 around their layer's mean (QLoRA's double quantization).
  # attention: the kernel (docs/models.md); "chunked_map" holds the least activation memory on inputs > 256 tokens.
  c.model = dict(path="", revision="", param_dtype="float32", dtype="auto", remat="auto", attention="auto",
                 quant="none", quant_block=64, quant_double=False)
  # Prompts: eval_fraction of conversations held out (split seed `seed`); batch_size prompts per RL step; prompts
  # left-padded to max_prompt_len; max_train_prompts > 0 keeps the first N training prompts.
  c.data = dict(eval_fraction=0.1, seed=0, batch_size=8, max_prompt_len=192, max_train_prompts=0,
                truncate_prompts=True,  # A longer prompt keeps its last max_prompt_len tokens; False: an error.
                **DATA[dataset])
  c.lora = dict(rank=4, alpha=8.0, targets="attention")  # The policy LoRA (paper: attention, small ranks).
  c.rl = dict(  # The RL algorithm (rl.RLConfig), field by field:
      algorithm=algorithm, objective="perl",  # "perl": (1−β)·r − β·KL; "standard": r − β·KL.
      kl_coef=0.05, kl_estimator="k1",
      kl_target=0.0, kl_horizon=20,  # kl_target 0 = fixed β; else β moves ≤ 0.2/kl_horizon per RL step toward it.
      # 64 new tokens fit 89% of Taskmaster-4's agent turns (API calls included; 48: 82%, 32: 54%).
      max_new_tokens=64, temperature=0.7,  # T > 0; RL refuses top_k / top_p (the learner would be off-policy).
      # Stop strings end rows on device (their token ids, on any number of processes); a single process also cuts
      # at their text. "<|im_end|>" is SmolLM2's EOS. cache_dtype: the sampler's KV cache, "auto" = the compute dtype.
      top_k=0, top_p=1.0, stop_strings=["<|im_end|>"], cache_dtype="auto",
      samples_per_prompt=4 if group else 1,  # k samples per prompt (one shared prefill); RLOO / GRPO need k >= 2.
      unfinished_reward=ml_collections.config_dict.placeholder(float),  # Reward of a response cut at max_new_tokens; None: the RM's.
      gamma=1.0, lam=0.95,
      whiten_advantages=not group,  # Whiten over the batch's tokens (RLOO / GRPO baselines are already centred).
      clip_eps=0.2, value_clip_eps=0.0, vf_coef=0.1,  # value_clip_eps 0 = off.
      value_init="zero",  # "zero": fresh value LoRA + zero head; "reward": value LoRA + head copied from the RM; "fresh".
      # K reward_workdir runs combined per row: "mean", "min" or "mean_minus_std" (mean − λ·std over members, λ =
      # reward_ensemble_lam); "none": one RM.
      # reward_ensemble_in_turn: score the members one after another (one member's activations at a time; slower).
      reward_ensemble="none", reward_ensemble_lam=1.0, reward_ensemble_in_turn=False,
      value_warmup_steps=0 if group else 2,  # First RL steps train only the value role (none under RLOO / GRPO).
      ppo_epochs=2 if algorithm == "ppo" else 1, num_minibatches=2 if algorithm == "ppo" else 1,
      num_microbatches=1)  # Gradient accumulation per update: rows / num_microbatches at a time (memory).
  # AdamW; lr warms up linearly over warmup_steps RL steps, then cosine; global-norm clipping.
  c.optim = dict(lr=1e-4 if mode == "lora" else 5e-6, warmup_steps=5, weight_decay=0.0, clip_norm=1.0)
  c.steps = 100  # RL steps (one rollout batch each).
  c.log_every = 5  # Metrics, progress line and sample texts every N steps.
  c.eval_every = 0  # Held-out eval cadence (0 = only at the last step).
  c.eval_prompts = 32  # Held-out prompts the eval samples (policy vs SFT anchor under the RM); 0 = no eval.
  c.eval_batch_size = 0  # Prompts per eval sampling batch; 0 = data.batch_size.
  c.checkpoint_every = 25  # Checkpoint cadence (and always at the last step).
  c.keep_checkpoints = 2  # Newest checkpoints kept.
  c.num_sample_texts = 3  # Prompt / response / reward lines written to samples.jsonl at each log step.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # Device mesh axes; -1 = all remaining devices.
  c.multihost = False  # True: jax.distributed.initialize() first (one process per host).
  return c
