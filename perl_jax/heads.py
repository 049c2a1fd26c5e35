"""The scalar head: a [D,1] projection of a hidden state. The reward model reads it at each row's last real token;
the RL value function reads it at every response position."""
import jax
import jax.numpy as jnp

from perl_jax import losses


def init_head(rng, hidden_size: int) -> dict:
  """A [D,1] projection, N(0, 1/D) so initial outputs are O(1), plus a bias."""
  return {"kernel": jax.random.normal(rng, (hidden_size, 1), jnp.float32) / jnp.sqrt(hidden_size),
          "bias": jnp.zeros((1,), jnp.float32)}


def head_apply(head: dict, hidden_xD):
  """The scalar head h · w + b at every position ([..., D] -> [...], float32)."""
  return (hidden_xD.astype(jnp.float32) @ head["kernel"] + head["bias"])[..., 0]


def last_token(hidden_BxTxD, mask_BxT):
  """h_last [B,D]: each row's hidden state at its last non-pad token."""
  idx_B = losses.last_token_index(mask_BxT)
  return jnp.take_along_axis(hidden_BxTxD, idx_B[:, None, None], axis=1)[:, 0]


def head_scores(head: dict, hidden_BxTxD, mask_BxT):
  """r_B = h_last · w + b, read at each row's last non-pad token (float32)."""
  return head_apply(head, last_token(hidden_BxTxD, mask_BxT))
