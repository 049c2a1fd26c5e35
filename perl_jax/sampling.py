"""Autoregressive sampling: one prefill over a left-padded prompt batch, then KV-cache decode steps in a while
loop that ends once every row has hit EOS; `num_samples` draws k responses per prompt from that one prefill.

Each token is drawn from logits / T, then top-k, then top-p (nucleus) filtering; rows stop at EOS or, on device,
once their last tokens equal one of `stop_sequences` (stop strings as token ids); `cut_at_stop_strings` (host side)
ends responses at the token that completes a stop string as text. Adapters stay
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
  steps: jax.Array | int = 0  # decode steps run: N − 1, or fewer once every row has hit EOS (max row length − 1)
  done_B: jax.Array | None = None  # int32 1 where the row ended at EOS or a stop sequence (not at max_new_tokens)


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


_CACHE_BATCH_AXIS = dict(k=1, v=1, pos=0, valid=0)  # the batch axis of each array of `models.init_cache`


def repeat_cache(cache: dict, k: int) -> dict:
  """Each row of a `models.init_cache` cache repeated k times in place (rows b*k .. b*k+k−1 copy row b): keys and
  values [L,B,S,K,H] on axis 1, positions and validity [B,S] on axis 0; the scalar write index is shared."""
  if k == 1:
    return cache
  return {name: x if x.ndim == 0 else jnp.repeat(x, k, axis=_CACHE_BATCH_AXIS[name]) for name, x in cache.items()}


def stop_hit(tokens_RxN, mask_RxN, i, stop_sequences) -> jax.Array:
  """Rows whose tokens 0..i end with one of `stop_sequences` (tuples of ids), every token of it sampled (mask 1)."""
  hit_R = jnp.zeros(tokens_RxN.shape[0], bool)
  for seq in stop_sequences:
    n = len(seq)
    if not n or n > tokens_RxN.shape[1]:
      continue
    start = jnp.maximum(i - n + 1, 0)
    window_RxL = jax.lax.dynamic_slice_in_dim(tokens_RxN, start, n, axis=1)
    valid_RxL = jax.lax.dynamic_slice_in_dim(mask_RxN, start, n, axis=1) > 0
    hit_R |= (i + 1 >= n) & jnp.all((window_RxL == jnp.asarray(seq, jnp.int32)) & valid_RxL, axis=1)
  return hit_R


def generate_fn(cfg, params, lora_trees, prompt_BxT, prompt_mask_BxT, rng, *, scales, max_new_tokens,
                temperature, eos_id, pad_id, cache_dtype, top_k=0, top_p=1.0, num_samples=1,
                stop_sequences=(), gather: Callable | None = None) -> Samples:
  """The un-jitted sampler: one prefill of the B prompts, then up to `max_new_tokens − 1` cached decode steps
  on R = B·k rows (k = num_samples; rows b*k .. b*k+k−1 are prompt b's samples), stopping once every row is done.

  Token i is drawn with `jax.random.split(rng, max_new_tokens)[i]`, so the result equals running all
  `max_new_tokens − 1` steps on the prompts repeated k times; `steps` counts the decode steps actually run.
  gather((params, lora_trees)) runs once before the prefill (e.g. a sharding constraint that all-gathers the FSDP
  shards, sharding.gathered_shardings), so the decode loop reuses the gathered weights at every token."""
  b, t = prompt_BxT.shape
  if gather is not None:
    params, lora_trees = gather((params, list(lora_trees)))
  adapters = list(zip(lora_trees, scales))
  draw = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = models.init_cache(cfg, b, t + max_new_tokens, jnp.dtype(cache_dtype))
  out = models.forward(cfg, params, prompt_BxT, prompt_mask_BxT, adapters=adapters, cache=cache)
  cache, logits_RxV = repeat_cache(out.cache, num_samples), jnp.repeat(out.logits[:, -1], num_samples, axis=0)
  rngs = jax.random.split(rng, max_new_tokens)
  tok_R, logp_R = draw(rngs[0], logits_RxV)
  r = b * num_samples
  put = lambda buf_RxN, col_R, i: jax.lax.dynamic_update_slice_in_dim(buf_RxN, col_R[:, None], i, axis=1)
  tokens_RxN = put(jnp.full((r, max_new_tokens), pad_id, jnp.int32), tok_R, 0)
  mask_RxN = put(jnp.zeros((r, max_new_tokens), jnp.int32), jnp.ones((r,), jnp.int32), 0)
  logp_RxN = put(jnp.zeros((r, max_new_tokens), jnp.float32), logp_R, 0)

  def running(carry):
    i, _, _, done_R, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(done_R)

  def step(carry):
    i, cache, tok_R, done_R, tokens_RxN, mask_RxN, logp_RxN = carry
    out = models.forward(cfg, params, tok_R[:, None], None, adapters=adapters, cache=cache)
    nxt_R, logp_R = draw(rngs[i], out.logits[:, -1])
    valid_R = ~done_R
    nxt_R = jnp.where(valid_R, nxt_R, pad_id)
    tokens_RxN, mask_RxN = put(tokens_RxN, nxt_R, i), put(mask_RxN, valid_R.astype(jnp.int32), i)
    done_R = done_R | (nxt_R == eos_id) | stop_hit(tokens_RxN, mask_RxN, i, stop_sequences)
    return (i + 1, out.cache, nxt_R, done_R, tokens_RxN, mask_RxN,
            put(logp_RxN, jnp.where(valid_R, logp_R, 0.0), i))

  done_R = (tok_R == eos_id) | stop_hit(tokens_RxN, mask_RxN, 0, stop_sequences)
  carry = (jnp.ones((), jnp.int32), cache, tok_R, done_R, tokens_RxN, mask_RxN, logp_RxN)
  i, _, _, done_R, tokens_RxN, mask_RxN, logp_RxN = jax.lax.while_loop(running, step, carry)
  return Samples(tokens_RxN, mask_RxN, logp_RxN, i - 1, done_R.astype(jnp.int32))


_generate = jax.jit(generate_fn, static_argnames=("cfg", "max_new_tokens", "temperature", "eos_id", "pad_id",
                                                  "scales", "cache_dtype", "top_k", "top_p", "num_samples",
                                                  "stop_sequences"))


def generate(cfg: ModelConfig, params, prompt_BxT, prompt_mask_BxT, *, max_new_tokens: int,
             rng=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, adapters: Sequence = (),
             eos_id: int | None = None, pad_id: int = 0, cache_dtype: str = "float32",
             num_samples: int = 1, stop_sequences: Sequence[Sequence[int]] = ()) -> Samples:
  """Continues left-padded prompts by `max_new_tokens` with zero or more adapter sets (e.g. the policy LoRA);
  `num_samples` = k samples per prompt from one prefill, as [B·k, N] rows (prompt b's in rows b*k .. b*k+k−1).

  Inputs may be sharded (params by the partition rules, prompts over the batch axes): jit follows them."""
  rng = jax.random.key(0) if rng is None else rng
  eos = cfg.eos_token_id if eos_id is None else eos_id
  trees = [tree for tree, _ in adapters]
  scales = tuple(float(s) for _, s in adapters)
  return _generate(cfg, params, trees, prompt_BxT, prompt_mask_BxT, rng, scales=scales,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), eos_id=-1 if eos is None else eos,
                   pad_id=pad_id, cache_dtype=cache_dtype, top_k=int(top_k), top_p=float(top_p),
                   num_samples=int(num_samples), stop_sequences=tuple(tuple(map(int, s)) for s in stop_sequences))


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
                        pad_id: int = 0, return_stopped: bool = False):
  """Host side: ends each response after the token that completes its first stop string (mask 0 and pad_id
  after it); rows without a stop string are unchanged. Returns numpy (tokens_BxN, mask_BxN), and with
  return_stopped a bool [B] of the rows that contain a stop string (finished, even when it ends on the last token)."""
  tokens_BxN, mask_BxN = np.array(tokens_BxN), np.array(mask_BxN)
  stopped_B = np.zeros(tokens_BxN.shape[0], bool)
  for row in range(tokens_BxN.shape[0]):
    valid = int(mask_BxN[row].sum())
    n = stop_length(tokens_BxN[row, :valid], decode, stop_strings)
    if n is not None:
      mask_BxN[row, n:] = 0
      tokens_BxN[row, n:] = pad_id
      stopped_B[row] = True
  return (tokens_BxN, mask_BxN, stopped_B) if return_stopped else (tokens_BxN, mask_BxN)
