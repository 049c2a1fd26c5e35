"""Static RL settings: one frozen, hashable dataclass (safe to close over in jit), checked when built."""
import dataclasses

from perl_jax import ensemble, lora
from perl_jax.errors import ConfigError

ALGORITHMS = ("reinforce", "ppo", "rloo", "grpo")
GROUP_ALGORITHMS = ("rloo", "grpo")   # Baseline from the other samples of the same prompt: no value role.
OBJECTIVES = ("perl", "standard")
MODES = ("lora", "full")
VALUE_INITS = ("zero", "reward", "fresh")
REWARD_ENSEMBLES = ("none",) + ensemble.COMBINE  # "none": one RM.


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What the RL stage does; names follow the paper (kl_coef = β, objective "perl" = (1−β)·r − β·KL).

  mode "lora": policy/value are LoRA sets on the one frozen backbone; "full": trainable backbone copies.
  algorithm: "reinforce" (the paper: Monte-Carlo return − learned value baseline), "ppo" (clipped ratio +
  GAE), "rloo" / "grpo" (baseline from the prompt's other samples_per_prompt − 1 samples; no value role).
  kl_target None keeps β fixed; otherwise Ziegler et al.'s adaptive controller, kl_horizon in RL steps.
  """
  mode: str = "lora"
  algorithm: str = "reinforce"
  objective: str = "perl"
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  kl_target: float | None = None
  kl_horizon: int = 20
  # Sampling.
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = -1
  pad_id: int = 0
  stop_ids: tuple = ()  # Stop strings as token-id tuples: a row ends on device once its last tokens spell one.
  cache_dtype: str = "float32"  # The sampler's KV cache ("bfloat16" halves it on an accelerator).
  samples_per_prompt: int = 1
  unfinished_reward: float | None = None  # Reward of a response that hit max_new_tokens (None: the RM's score).
  # Advantages.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  # Losses and updates.
  clip_eps: float = 0.2
  value_clip_eps: float | None = None
  vf_coef: float = 0.1
  value_warmup_steps: int = 0  # First RL steps train only the value role (the policy loss is off).
  ppo_epochs: int = 1
  num_minibatches: int = 1
  num_microbatches: int = 1  # Gradient accumulation inside each (mini)batch update.
  # Adapters (LoRA mode): the policy and value sets trained here, the frozen SFT and RM sets' scales.
  policy_lora: lora.LoraConfig = lora.LoraConfig(rank=4, alpha=8.0)
  value_lora: lora.LoraConfig = lora.LoraConfig(rank=4, alpha=8.0)
  value_init: str = "zero"  # "zero": fresh value LoRA + zero head; "reward": copies of the RM's; "fresh": random head.
  sft_scale: float = 2.0
  reward_scale: float = 2.0
  # The reward: one RM ("none"), or K LoRA RMs on the one backbone combined per row (perl_jax.ensemble.combine).
  reward_ensemble: str = "none"
  reward_ensemble_lam: float = 1.0  # λ of "mean_minus_std".
  reward_ensemble_in_turn: bool = False  # Score the members one after another (one member's activations at a time).

  def __post_init__(self):
    for name, allowed in (("mode", MODES), ("algorithm", ALGORITHMS), ("objective", OBJECTIVES),
                          ("value_init", VALUE_INITS), ("kl_estimator", ("k1", "k2", "k3")),
                          ("reward_ensemble", REWARD_ENSEMBLES)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"config: field 'rl.{name}': must be one of {allowed}, got {getattr(self, name)!r}")
    problems = [
        ("temperature", self.temperature <= 0, "must be > 0 (RL samples; greedy decoding has no policy gradient)"),
        ("top_k", self.top_k != 0, "must be 0: the learner's log-probs and the KL do not apply the sampler's "
                                   "top-k filter, so training would be silently off-policy"),
        ("top_p", self.top_p != 1.0, "must be 1.0: the learner's log-probs and the KL do not apply the sampler's "
                                     "top-p filter, so training would be silently off-policy"),
        ("samples_per_prompt", self.samples_per_prompt < 1, "must be >= 1"),
        ("samples_per_prompt", self.algorithm in GROUP_ALGORITHMS and self.samples_per_prompt < 2,
         f"algorithm '{self.algorithm}' needs >= 2 samples per prompt (its baseline is the other samples)"),
        ("num_minibatches", self.algorithm != "ppo" and self.num_updates > 1,
         f"algorithm '{self.algorithm}' has no importance ratio, so updates after the first (ppo_epochs x "
         "num_minibatches > 1) would be off-policy; use rl.num_microbatches to fit memory, or algorithm 'ppo'"),
        ("num_microbatches", self.num_microbatches < 1, "must be >= 1"),
        ("kl_horizon", self.kl_horizon < 1, "must be >= 1 RL step"),
        ("value_warmup_steps", self.value_warmup_steps and not self.uses_value,
         f"algorithm '{self.algorithm}' has no value role to warm up"),
        ("reward_ensemble", self.reward_ensemble != "none" and self.mode != "lora",
         "an ensemble of reward adapters shares LoRA-mode RL's one backbone; full-mode RL takes one RM"),
    ]
    for field, bad, why in problems:
      if bad:
        raise ConfigError(f"config: field 'rl.{field}': {why}, got {getattr(self, field)!r}")

  @property
  def uses_value(self) -> bool:
    """Whether the value role exists: REINFORCE's baseline and PPO's GAE; RLOO / GRPO need none."""
    return self.algorithm not in GROUP_ALGORITHMS

  @property
  def policy_scale(self) -> float:
    return lora.scale(self.policy_lora)

  @property
  def value_scale(self) -> float:
    return lora.scale(self.value_lora)

  @property
  def num_updates(self) -> int:
    """Optimizer updates per rollout batch: epochs × minibatches (each may accumulate microbatches)."""
    return self.ppo_epochs * self.num_minibatches
