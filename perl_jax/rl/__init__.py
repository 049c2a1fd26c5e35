"""RL on one frozen backbone (PERL): roles, rollout -> advantages, learner (REINFORCE / PPO), KL control, step."""
from perl_jax.rl.config import RLConfig
