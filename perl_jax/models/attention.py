"""Attention masks and kernels: XLA's fused attention, the written-out einsum, query-chunked, an exact
kernel whose backward recomputes the probabilities from saved row statistics (flash attention's backward), and
that kernel over causal query blocks that skip the keys after them.

Shapes: q [B,T,N,H], k/v [B,S,K,H] (N = K·G query heads share K key/value heads), mask bool [B,1,T,S].
"""
import functools

import jax
import jax.numpy as jnp

from perl_jax.models.config import ModelConfig


def attention_masks(q_pos_BxT, k_pos_BxS, k_valid_BxS, window: int | None):
  """Causal-by-position masks [B,1,T,S], full and sliding-window; positions make left padding exact."""
  m = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]) & k_valid_BxS[:, None, :]
  if window is None:
    return m[:, None], m[:, None]
  near = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
  return m[:, None], (m & near)[:, None]


def _logits(q_BxTxKxGxH, k_BxSxKxH, mask_Bx1xTxS, scale, softcap):
  """(masked logits, pre-cap logits) [B,K,G,T,S] in float32 or wider: s = q·k·scale, capped c·tanh(s/c)."""
  f = jnp.promote_types(q_BxTxKxGxH.dtype, jnp.float32)
  raw = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=f) * scale
  capped = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
  return jnp.where(mask_Bx1xTxS[:, :, None], capped, jnp.finfo(f).min), raw


def attend_einsum(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float, softcap: float | None):
  """Grouped-query attention written out: soft-capping, any dtype (float64 for gradient checks)."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
  logits, _ = _logits(q, k_BxSxKxH, mask_Bx1xTxS, scale, softcap)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxH.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH).reshape(b, t, n, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend_stats(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap):
  return _attend_stats_fwd(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap)[0]


def _attend_stats_fwd(q, k, v, mask, scale, softcap):
  """o = softmax(s) v, keeping only the row max m and row sum l of exp(s − m) ([B,K,G,T,1]) for the backward."""
  logits, _ = _logits(q, k, mask, scale, softcap)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum("bkgts,bskh->btkgh", (e / l).astype(v.dtype), v)
  return o, (q, k, v, mask, o, m, l)


def _attend_stats_bwd(scale, softcap, res, do):
  """P = exp(s − m) / l recomputed; dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), then through the cap and
  the scale: dQ = dS K, dK = dSᵀ Q. Masked logits are constants, so their dS is 0."""
  q, k, v, mask, o, m, l = res
  logits, raw = _logits(q, k, mask, scale, softcap)
  f = logits.dtype
  p = jnp.exp(logits - m) / l
  dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(v.dtype), do)
  dp = jnp.einsum("btkgh,bskh->bkgts", do, v, preferred_element_type=f)
  delta = jnp.einsum("btkgh,btkgh->bkgt", do, o, preferred_element_type=f)[..., None]
  ds = jnp.where(mask[:, :, None], p * (dp - delta), 0.0)
  if softcap is not None:
    ds = ds * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
  ds = (ds * scale).astype(q.dtype)
  dq = jnp.einsum("bkgts,bskh->btkgh", ds, k)
  dk = jnp.einsum("bkgts,btkgh->bskh", ds, q)
  return dq, dk, dv, None


_attend_stats.defvjp(_attend_stats_fwd, _attend_stats_bwd)


def attend_recompute(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float, softcap: float | None):
  """attend_einsum's values and gradients, but reverse mode saves O(T) row statistics instead of the [T,S]
  probabilities per head (and per layer, under the layer scan); the backward recomputes them."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
  return _attend_stats(q, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap).reshape(b, t, n, h)


def attend_chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int):
  """Exact attention over query blocks, each rematerialised: scores live for one [block, S] tile at a time."""
  b, t, n, h = q_BxTxNxH.shape
  nb = t // block
  q_blocks = q_BxTxNxH.reshape(b, nb, block, n, h).swapaxes(0, 1)
  m_blocks = mask_Bx1xTxS.reshape(b, 1, nb, block, -1).transpose(2, 0, 1, 3, 4)
  one = jax.checkpoint(lambda qm: attend_einsum(qm[0], k_BxSxKxH, v_BxSxKxH, qm[1], scale, softcap))
  return jax.lax.map(one, (q_blocks, m_blocks)).swapaxes(0, 1).reshape(b, t, n, h)


CAUSAL_BLOCK = 64  # Query block of "causal" (fwd+bwd of one SmolLM2 layer's attention, 8 x 256 tokens, XLA:CPU:
                  # blocks of 32 / 64 / 128 took 0.77 / 0.68 / 0.82x the time of "recompute").


def attend_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int = CAUSAL_BLOCK):
  """Self-attention whose positions increase along the sequence, the T queries being the last T of the S ≥ T
  keys: query block [i, i + block) reads keys [0, S − T + i + block) only, since every key after it is masked for
  every query row that is not padding. With n blocks and S = T that is (n + 1) / 2n of the scores; each block
  runs the recomputing kernel (row statistics saved, not probabilities). The last block is shorter when block
  does not divide T. Pad rows of left-padded inputs may attend differently (they read no key); nothing reads them."""
  t, off = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1] - q_BxTxNxH.shape[1]
  outs = [attend_recompute(q_BxTxNxH[:, i:i + block], k_BxSxKxH[:, :off + i + block],
                           v_BxSxKxH[:, :off + i + block], mask_Bx1xTxS[:, :, i:i + block, :off + i + block],
                           scale, softcap)
          for i in range(0, t, block)]
  return jnp.concatenate(outs, axis=1)


def attend_chunked_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int):
  """attend_chunked for causal self-attention: query chunk [c, c + block), rematerialised, reads keys [0, c +
  block) through attend_causal, so scores stay within one [block, c + block] tile and skip the keys after it."""
  outs = []
  for c in range(0, q_BxTxNxH.shape[1], block):
    one = jax.checkpoint(lambda q, k, v, m: attend_causal(q, k, v, m, scale, softcap, CAUSAL_BLOCK))
    outs.append(one(q_BxTxNxH[:, c:c + block], k_BxSxKxH[:, :c + block], v_BxSxKxH[:, :c + block],
                    mask_Bx1xTxS[:, :, c:c + block, :c + block]))
  return jnp.concatenate(outs, axis=1)


def attend(cfg: ModelConfig, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal: bool = False):
  """Picks the attention kernel; "xla"/"cudnn" fall back to the einsum when soft-capped. "auto": query chunks for
  inputs longer than `attention_block`; else, for causal self-attention (`causal`: no KV cache, positions
  derived from the mask) of more than one CAUSAL_BLOCK, "causal"; else the recomputing kernel. "causal" falls
  back to "recompute" where it does not apply; "chunked" skips the keys after each chunk when `causal`."""
  t, s = q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
  scale, softcap, block = cfg.attn_scale, cfg.attn_softcap, cfg.attention_block
  kind = cfg.attention
  blocked = causal and t == s and t > CAUSAL_BLOCK
  if kind == "auto":
    kind = "chunked" if t > block and t % block == 0 else "causal"
  if kind == "causal":
    if blocked:
      return attend_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, CAUSAL_BLOCK)
    kind = "recompute"
  if kind in ("xla", "cudnn") and softcap is None:
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, scale=scale,
                                        implementation=kind)
  if kind == "chunked" and t % block == 0:
    chunked = attend_chunked_causal if causal and t == s else attend_chunked
    return chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block)
  if kind == "recompute":
    return attend_recompute(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap)
  return attend_einsum(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap)
