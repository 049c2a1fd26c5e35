"""Autoregressive sampling: one prefill over a left-padded prompt batch, then KV-cache decode steps in a scan.

Each token is drawn from logits / T, then top-k, then top-p (nucleus) filtering; rows stop at EOS, and
`cut_at_stop_strings` (host side) ends responses at the token that completes a stop string. Adapters stay
unmerged, so a policy LoRA samples on the one frozen backbone; `generate_fn` is the un-jitted core for callers
that jit it with explicit shardings (the RL rollout).
"""
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import models
from perl_jax.models import ModelConfig


class Samples(NamedTuple):
  tokens_BxN: jax.Array    # generated ids; positions after EOS hold pad_id
  mask_BxN: jax.Array      # 1 up to and including the first EOS
  logp_BxN: jax.Array      # log-prob under the sampling distribution (T, top-k, top-p applied); diagnostics only


def top_k_filter(logits_BxV, k: int):
  """Keeps logits ≥ the k-th largest of each row (ties at the boundary stay), −inf elsewhere; k = 0 keeps all."""
  if not k or k >= logits_BxV.shape[-1]:
    return logits_BxV
  kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
  return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


def top_p_filter(logits_BxV, p: float):
  """Nucleus: keeps the most probable tokens until their mass reaches p (token i, in descending order, stays
  iff the mass strictly before it is < p, so the top token always stays); p = 1 keeps all."""
  if p >= 1.0:
    return logits_BxV
  order_BxV = jnp.argsort(-logits_BxV, axis=-1)
  probs_BxV = jnp.take_along_axis(jax.nn.softmax(logits_BxV, axis=-1), order_BxV, axis=-1)
  keep_sorted_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < p
  keep_BxV = jnp.zeros_like(keep_sorted_BxV).at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV].set(
      keep_sorted_BxV)
  return jnp.where(keep_BxV, logits_BxV, -jnp.inf)


def filter_logits(logits_BxV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """The sampling logits: logits / T, then top-k, then top-p (T = 0 leaves them unscaled, for greedy)."""
  x = logits_BxV.astype(jnp.float32)
  x = x if temperature == 0.0 else x / temperature
  return top_p_filter(top_k_filter(x, top_k), top_p)


def sample_token(rng, logits_BxV, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Greedy at temperature 0, else a draw from softmax(filter_logits(...)); returns ids and their log-probs."""
  logp = jax.nn.log_softmax(filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
  if temperature == 0.0:
    tok = jnp.argmax(logits_BxV, axis=-1)
  else:
    tok = jax.random.categorical(rng, logp, axis=-1)
  return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def generate_fn(cfg, params, lora_trees, prompt_BxT, prompt_mask_BxT, rng, *, scales, max_new_tokens,
                temperature, eos_id, pad_id, cache_dtype, top_k=0, top_p=1.0) -> Samples:
  """The un-jitted sampler: prefill the prompts, then `max_new_tokens − 1` cached decode steps."""
  b, t = prompt_BxT.shape
  adapters = list(zip(lora_trees, scales))
  draw = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = models.init_cache(cfg, b, t + max_new_tokens, jnp.dtype(cache_dtype))
  out = models.forward(cfg, params, prompt_BxT, prompt_mask_BxT, adapters=adapters, cache=cache)
  rngs = jax.random.split(rng, max_new_tokens)
  tok, logp = draw(rngs[0], out.logits[:, -1])
  done = tok == eos_id

  def step(carry, rng):
    cache, tok, done = carry
    out = models.forward(cfg, params, tok[:, None], None, adapters=adapters, cache=cache)
    nxt, logp = draw(rng, out.logits[:, -1])
    valid = ~done
    nxt = jnp.where(valid, nxt, pad_id)
    return (out.cache, nxt, done | (nxt == eos_id)), (nxt, logp, valid)

  _, (toks, logps, valids) = jax.lax.scan(step, (out.cache, tok, done), rngs[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)
  mask = jnp.concatenate([jnp.ones((b, 1), bool), valids.T], axis=1)
  logp_all = jnp.concatenate([logp[:, None], logps.T], axis=1)
  return Samples(tokens, mask.astype(jnp.int32), jnp.where(mask, logp_all, 0.0))


_generate = jax.jit(generate_fn, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id", "pad_id",
                                                  "scales", "cache_dtype", "top_k", "top_p"))


def generate(cfg: ModelConfig, params, prompt_BxT, prompt_mask_BxT, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, adapters: Sequence = (),
             eos_id: int | None = None, pad_id: int = 0, cache_dtype: str = "float32") -> Samples:
  """Continues left-padded prompts by `max_new_tokens` with zero or more adapter sets (e.g. the policy LoRA).

  Inputs may be sharded (params by the partition rules, prompts over the batch axes): jit follows them."""
  rng = jax.random.key(0) if rng is None else rng
  eos = cfg.eos_token_id if eos_id is None else eos_id
  trees = [tree for tree, _ in adapters]
  scales = tuple(float(s) for _, s in adapters)
  return _generate(cfg, params, trees, prompt_BxT, prompt_mask_BxT, rng, scales=scales,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), eos_id=-1 if eos is None else eos,
                   pad_id=pad_id, cache_dtype=cache_dtype, top_k=int(top_k), top_p=float(top_p))


def stop_length(tokens_N, decode: Callable[[list], str], stop_strings: Sequence[str]) -> int | None:
  """The fewest leading tokens whose decoded text contains a stop string (binary search over prefixes, since
  a prefix that contains one stays containing it); None when the whole response contains none."""
  tokens_N = [int(t) for t in tokens_N]
  hit = lambda n: any(s in decode(tokens_N[:n]) for s in stop_strings)
  if not stop_strings or not hit(len(tokens_N)):
    return None
  lo, hi = 1, len(tokens_N)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
  return lo


def cut_at_stop_strings(tokens_BxN, mask_BxN, decode: Callable[[list], str], stop_strings: Sequence[str],
                        pad_id: int = 0):
  """Host side: ends each response after the token that completes its first stop string (mask 0 and pad_id
  after it); rows without a stop string are unchanged. Returns numpy (tokens_BxN, mask_BxN)."""
  tokens_BxN, mask_BxN = np.array(tokens_BxN), np.array(mask_BxN)
  for row in range(tokens_BxN.shape[0]):
    valid = int(mask_BxN[row].sum())
    n = stop_length(tokens_BxN[row, :valid], decode, stop_strings)
    if n is not None:
      mask_BxN[row, n:] = 0
      tokens_BxN[row, n:] = pad_id
  return tokens_BxN, mask_BxN
