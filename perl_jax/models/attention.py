"""Attention masks and kernels: XLA's fused attention, the written-out einsum, query-chunked, an exact
kernel whose backward recomputes the probabilities from saved row statistics (flash attention's backward), and
that kernel over causal query blocks that skip the keys after them.

Shapes: q [B,T,N,H], k/v [B,S,K,H] (N = K·G query heads share K key/value heads), mask bool [B,1,T,S]; inside,
the kernels work on q [B,K,G,T,H] and k/v [B,K,S,H], transposed once per call.
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


def _heads_first(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH):
  """q [B,K,G,T,H], k and v [B,K,S,H]: the kernels' layout, where every score and output matmul is batched over
  (B, K) with no transpose inside; formed once per layer (per-block transposes cost more than the blocks saved)."""
  b, t, n, h = q_BxTxNxH.shape
  kv = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  return q, k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3)


def _heads_last(o_BxKxGxTxH):
  b, kv, g, t, h = o_BxKxGxTxH.shape
  return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def _logits(q_BxKxGxTxH, k_BxKxSxH, mask_Bx1xTxS, scale, softcap):
  """(masked logits, pre-cap logits) [B,K,G,T,S] in float32 or wider: s = q·k·scale, capped c·tanh(s/c)."""
  f = jnp.promote_types(q_BxKxGxTxH.dtype, jnp.float32)
  raw = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH, preferred_element_type=f) * scale
  capped = raw if softcap is None else jnp.tanh(raw / softcap) * softcap
  return jnp.where(mask_Bx1xTxS[:, :, None], capped, jnp.finfo(f).min), raw


def attend_einsum(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float, softcap: float | None):
  """Grouped-query attention written out: soft-capping, any dtype (float64 for gradient checks)."""
  q, k, v = _heads_first(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
  logits, _ = _logits(q, k, mask_Bx1xTxS, scale, softcap)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return _heads_last(jnp.einsum("bkgts,bksh->bkgth", probs, v))


def _query_blocks(t: int, s: int, block: int | None):
  """(first row, end row, keys read) per query block: one block reading all S keys when block is None; else rows
  [i, j) of the T queries (the last T of the S ≥ T keys) read keys [0, S − T + j)."""
  if block is None:
    return [(0, t, s)]
  return [(i, min(i + block, t), s - t + min(i + block, t)) for i in range(0, t, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend_stats(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xTxS, scale, softcap, block):
  return _attend_stats_fwd(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xTxS, scale, softcap, block)[0]


def _block_fwd(q, k, v, mask, scale, softcap):
  """o = softmax(s) v and the row max m and row sum l of exp(s − m) ([B,K,G,T,1]), all the backward keeps."""
  logits, _ = _logits(q, k, mask, scale, softcap)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  return jnp.einsum("bkgts,bksh->bkgth", (e / l).astype(v.dtype), v), m, l


def _attend_stats_fwd(q, k, v, mask, scale, softcap, block):
  outs = [_block_fwd(q[:, :, :, i:j], k[:, :, :e], v[:, :, :e], mask[:, :, i:j, :e], scale, softcap)
          for i, j, e in _query_blocks(q.shape[3], k.shape[2], block)]
  o, m, l = (jnp.concatenate(x, axis=3) for x in zip(*outs))
  return o, (q, k, v, mask, o, m, l)


def _block_bwd(q, k, v, mask, o, m, l, do, scale, softcap):
  """P = exp(s − m) / l recomputed; dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), then through the cap and
  the scale: dQ = dS K, dK = dSᵀ Q. Masked logits are constants, so their dS is 0."""
  logits, raw = _logits(q, k, mask, scale, softcap)
  f = logits.dtype
  p = jnp.exp(logits - m) / l
  dv = jnp.einsum("bkgts,bkgth->bksh", p.astype(v.dtype), do)
  dp = jnp.einsum("bkgth,bksh->bkgts", do, v, preferred_element_type=f)
  delta = jnp.sum(do.astype(f) * o.astype(f), axis=-1, keepdims=True)
  ds = jnp.where(mask[:, :, None], p * (dp - delta), 0.0)
  if softcap is not None:
    ds = ds * (1.0 - jnp.square(jnp.tanh(raw / softcap)))
  ds = (ds * scale).astype(q.dtype)
  return jnp.einsum("bkgts,bksh->bkgth", ds, k), jnp.einsum("bkgts,bkgth->bksh", ds, q), dv


def _attend_stats_bwd(scale, softcap, block, res, do):
  """Each query block's gradients; dK and dV sum the blocks' (in float32 or wider), zero past a block's keys."""
  q, k, v, mask, o, m, l = res
  s = k.shape[2]
  dqs, dk, dv = [], 0.0, 0.0
  for i, j, e in _query_blocks(q.shape[3], s, block):
    rows = lambda x: x[:, :, :, i:j]
    dq_b, dk_b, dv_b = _block_bwd(rows(q), k[:, :, :e], v[:, :, :e], mask[:, :, i:j, :e], rows(o), rows(m),
                                  rows(l), rows(do), scale, softcap)
    pad = ((0, 0), (0, 0), (0, s - e), (0, 0))
    f = jnp.promote_types(k.dtype, jnp.float32)
    dk, dv = dk + jnp.pad(dk_b.astype(f), pad), dv + jnp.pad(dv_b.astype(f), pad)
    dqs.append(dq_b)
  return jnp.concatenate(dqs, axis=3), dk.astype(k.dtype), dv.astype(v.dtype), None


_attend_stats.defvjp(_attend_stats_fwd, _attend_stats_bwd)


def attend_recompute(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float, softcap: float | None):
  """attend_einsum's values and gradients, but reverse mode saves O(T) row statistics instead of the [T,S]
  probabilities per head (and per layer, under the layer scan); the backward recomputes them."""
  q, k, v = _heads_first(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
  return _heads_last(_attend_stats(q, k, v, mask_Bx1xTxS, scale, softcap, None))


def attend_chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int):
  """Exact attention over query blocks, each rematerialised: scores live for one [block, S] tile at a time."""
  b, t, n, h = q_BxTxNxH.shape
  nb = t // block
  q_blocks = q_BxTxNxH.reshape(b, nb, block, n, h).swapaxes(0, 1)
  m_blocks = mask_Bx1xTxS.reshape(b, 1, nb, block, -1).transpose(2, 0, 1, 3, 4)
  one = jax.checkpoint(lambda qm: attend_einsum(qm[0], k_BxSxKxH, v_BxSxKxH, qm[1], scale, softcap))
  return jax.lax.map(one, (q_blocks, m_blocks)).swapaxes(0, 1).reshape(b, t, n, h)


CAUSAL_BLOCK = 64  # Query block of "causal". Whole RM step (SmolLM2, 8 x 256 tokens, LoRA r8, XLA:CPU 2 cores):
                  # blocks of 32 / 64 / 128 took 7.81 / 7.7 / 7.72 s, within noise; 64 kept.


def attend_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int = CAUSAL_BLOCK):
  """Self-attention whose positions increase along the sequence, the T queries being the last T of the S ≥ T
  keys: query block [i, i + block) reads keys [0, S − T + i + block) only, since every key after it is masked for
  every query row that is not padding. With n blocks and S = T that is (n + 1) / 2n of the scores. One recomputing
  kernel runs the blocks (q, k, v, o and row statistics saved once, not per block). The last block is shorter when
  block does not divide T. Pad rows of left-padded inputs may attend differently (they read no key); nothing
  reads them."""
  q, k, v = _heads_first(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
  return _heads_last(_attend_stats(q, k, v, mask_Bx1xTxS, scale, softcap, block))


def attend_chunked_causal(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block: int):
  """attend_chunked for causal self-attention: query chunk [c, c + block), rematerialised, reads keys [0, c +
  block) through attend_causal's blocks, so scores stay within one [block, c + block] tile and skip the keys
  after it."""
  q, k, v = _heads_first(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
  one = jax.checkpoint(lambda q, k, v, m: _attend_stats(q, k, v, m, scale, softcap, CAUSAL_BLOCK))
  outs = [one(q[:, :, :, c:c + block], k[:, :, :c + block], v[:, :, :c + block],
              mask_Bx1xTxS[:, :, c:c + block, :c + block]) for c in range(0, q.shape[3], block)]
  return _heads_last(jnp.concatenate(outs, axis=3))


def attend(cfg: ModelConfig, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal: bool = False):
  """Picks the attention kernel; "xla"/"cudnn" fall back to the einsum when soft-capped. "auto": query chunks for
  inputs longer than `attention_block`; else, for causal self-attention (`causal`: no KV cache, positions
  derived from the mask) of more than one CAUSAL_BLOCK, "causal"; else the recomputing kernel. "causal" falls
  back to "recompute" where it does not apply; "chunked" skips the keys after each chunk when `causal`;
  "chunked_map" runs attend_chunked's lax.map (every chunk reads every key) even for causal self-attention: the
  causal kernels' blocks are separate buffers that XLA:CPU's schedule keeps alive together (7B LoRA RM step on nf4,
  16 x 1024 tokens: 15.54 GiB of temporaries under "auto", 9.60 under "chunked_map"), at the price of the masked
  scores."""
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
  if kind == "chunked_map":
    kind = "chunked" if t > block and t % block == 0 else "recompute"
    causal = False  # attend_chunked: every chunk reads every key, the mask does the rest
  if kind == "chunked" and t % block == 0:
    chunked = attend_chunked_causal if causal and t == s else attend_chunked
    return chunked(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap, block)
  if kind == "recompute":
    return attend_recompute(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap)
  return attend_einsum(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap)
