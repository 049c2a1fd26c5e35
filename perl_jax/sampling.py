"""Autoregressive sampling: one prefill over a left-padded prompt batch, then KV-cache decode steps in a scan."""
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from perl_jax import models
from perl_jax.models import ModelConfig


class Samples(NamedTuple):
  tokens_BxN: jax.Array    # generated ids; positions after EOS hold pad_id
  mask_BxN: jax.Array      # 1 up to and including the first EOS
  logp_BxN: jax.Array      # log π(token) under the sampling distribution (temperature applied)


def sample_token(rng, logits_BxV, temperature: float):
  """Greedy at temperature 0, else a draw from softmax(logits / T); returns ids and their log-probs."""
  if temperature == 0.0:
    tok = jnp.argmax(logits_BxV, axis=-1)
    logp = jax.nn.log_softmax(logits_BxV, axis=-1)
  else:
    logp = jax.nn.log_softmax(logits_BxV / temperature, axis=-1)
    tok = jax.random.categorical(rng, logp, axis=-1)
  return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id", "pad_id",
                                              "scales", "cache_dtype"))
def _generate(cfg, params, lora_trees, prompt_BxT, prompt_mask_BxT, rng, *, scales, max_new_tokens,
              temperature, eos_id, pad_id, cache_dtype):
  b, t = prompt_BxT.shape
  adapters = list(zip(lora_trees, scales))
  cache = models.init_cache(cfg, b, t + max_new_tokens, jnp.dtype(cache_dtype))
  out = models.forward(cfg, params, prompt_BxT, prompt_mask_BxT, adapters=adapters, cache=cache)
  rngs = jax.random.split(rng, max_new_tokens)
  tok, logp = sample_token(rngs[0], out.logits[:, -1], temperature)
  done = tok == eos_id

  def step(carry, rng):
    cache, tok, done = carry
    out = models.forward(cfg, params, tok[:, None], None, adapters=adapters, cache=cache)
    nxt, logp = sample_token(rng, out.logits[:, -1], temperature)
    valid = ~done
    nxt = jnp.where(valid, nxt, pad_id)
    return (out.cache, nxt, done | (nxt == eos_id)), (nxt, logp, valid)

  _, (toks, logps, valids) = jax.lax.scan(step, (out.cache, tok, done), rngs[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)
  mask = jnp.concatenate([jnp.ones((b, 1), bool), valids.T], axis=1)
  logp_all = jnp.concatenate([logp[:, None], logps.T], axis=1)
  return Samples(tokens, mask.astype(jnp.int32), jnp.where(mask, logp_all, 0.0))


def generate(cfg: ModelConfig, params, prompt_BxT, prompt_mask_BxT, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, adapters: Sequence = (), eos_id: int | None = None,
             pad_id: int = 0, cache_dtype: str = "float32") -> Samples:
  """Continues left-padded prompts by `max_new_tokens` with zero or more adapter sets (e.g. the policy LoRA)."""
  rng = jax.random.key(0) if rng is None else rng
  eos = cfg.eos_token_id if eos_id is None else eos_id
  trees = [tree for tree, _ in adapters]
  scales = tuple(float(s) for _, s in adapters)
  return _generate(cfg, params, trees, prompt_BxT, prompt_mask_BxT, rng, scales=scales,
                   max_new_tokens=max_new_tokens, temperature=temperature, eos_id=-1 if eos is None else eos,
                   pad_id=pad_id, cache_dtype=cache_dtype)
