"""Static RL settings: one frozen, hashable dataclass (safe to close over in jit)."""
import dataclasses

from perl_jax import lora

ALGORITHMS = ("reinforce", "ppo")
OBJECTIVES = ("perl", "standard")
MODES = ("lora", "full")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What the RL stage does; names follow the paper (kl_coef = β, objective "perl" = (1−β)·r − β·KL).

  mode "lora": policy/value are LoRA sets on the one frozen backbone; "full": trainable backbone copies.
  kl_target None keeps β fixed; otherwise Ziegler et al.'s adaptive controller with kl_horizon.
  """
  mode: str = "lora"
  algorithm: str = "reinforce"
  objective: str = "perl"
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  kl_target: float | None = None
  kl_horizon: int = 10000
  # Sampling.
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = -1
  pad_id: int = 0
  # Advantages.
  gamma: float = 1.0
  lam: float = 0.95
  whiten_advantages: bool = True
  # Losses and updates.
  clip_eps: float = 0.2
  value_clip_eps: float | None = None
  vf_coef: float = 0.1
  ppo_epochs: int = 1
  num_minibatches: int = 1
  # Adapters (LoRA mode): the policy and value sets trained here, the frozen SFT and RM sets' scales.
  policy_lora: lora.LoraConfig = lora.LoraConfig(rank=4, alpha=8.0)
  value_lora: lora.LoraConfig = lora.LoraConfig(rank=4, alpha=8.0)
  value_init: str = "reward"   # "reward": value LoRA + head start as copies of the RM's; "fresh": new ones.
  sft_scale: float = 2.0
  reward_scale: float = 2.0

  def __post_init__(self):
    for name, allowed in (("mode", MODES), ("algorithm", ALGORITHMS), ("objective", OBJECTIVES),
                          ("value_init", ("reward", "fresh")), ("kl_estimator", ("k1", "k2", "k3"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"RLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

  @property
  def policy_scale(self) -> float:
    return lora.scale(self.policy_lora)

  @property
  def value_scale(self) -> float:
    return lora.scale(self.value_lora)

  @property
  def num_updates(self) -> int:
    """Optimizer updates per rollout batch: epochs × minibatches."""
    return self.ppo_epochs * self.num_minibatches
