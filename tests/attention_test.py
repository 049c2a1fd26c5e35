"""Attention kernels agree: query-chunked, fused, recomputing and causal-blocked equal the written-out einsum, values
and gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora, models
from perl_jax.models import attention
from tests.helpers import random_batch, tiny_config


def _tiny_lora_batch(family, rows):
  """(einsum config, params, non-zero adapters, ids, mask): rows of 12 tokens, the first three left-padded 0/3/7."""
  cfg = tiny_config(family, attention="einsum")
  params = models.init_params(cfg, jax.random.key(0))
  lp = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2)))
  ids, mask = random_batch(0, rows, 12, cfg.vocab_size, left_pad=(0, 3, 7))
  return cfg, params, lp, ids, mask


def _real_logits_and_grad(cfg, params, lp, ids, mask):
  """Logits at real tokens and the adapters' gradient of their sum: chunks or blocks of causal self-attention
  leave left-pad rows reading no key, and nothing reads those rows."""
  def loss(lp):
    logits = models.forward(cfg, params, ids, mask, adapters=[(lp, 2.0)]).logits * mask[..., None]
    return logits.sum() / 100.0, logits
  (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(lp)
  return np.asarray(logits), grad


def _assert_same(got, ref, name):
  np.testing.assert_allclose(got[0], ref[0], atol=2e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4),
               got[1], ref[1])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chunked_and_fused_match_einsum(family):
  base_cfg, *batch = _tiny_lora_batch(family, rows=3)
  ref = _real_logits_and_grad(base_cfg, *batch)
  kinds = [("chunked", 4), ("auto", 4), ("recompute", 256)] + ([("xla", 256)] if family == "llama" else [])
  for kind, block in kinds:
    _assert_same(_real_logits_and_grad(dataclasses.replace(base_cfg, attention=kind, attention_block=block), *batch),
                 ref, kind)


def test_chunked_map_runs_every_chunk_over_every_key_and_matches_einsum(monkeypatch):
  """"chunked_map": causal self-attention through attend_chunked's lax.map (3 chunks of 4 queries, each reading all
  12 keys, the mask doing the causal part), never the causal blocks; the same logits and gradients as the einsum."""
  base_cfg, *batch = _tiny_lora_batch("llama", rows=3)
  ref = _real_logits_and_grad(base_cfg, *batch)
  calls = []
  spy = lambda *a, f=attention.attend_chunked: calls.append(a[1].shape) or f(*a)  # a[1]: keys [B, S, K, H]
  monkeypatch.setattr(attention, "attend_chunked", spy)
  monkeypatch.setattr(attention, "_attend_stats", lambda *a: pytest.fail("a causal block kernel ran"))
  got = _real_logits_and_grad(dataclasses.replace(base_cfg, attention="chunked_map", attention_block=4), *batch)
  assert calls and all(shape[1] == 12 for shape in calls)  # every chunk over all 12 keys
  _assert_same(got, ref, "chunked_map")
  with pytest.raises(models.ConfigError, match=r"field 'model.attention': must be .*\|chunked_map, got 'chunk_map'"):
    dataclasses.replace(base_cfg, attention="chunk_map")


@pytest.mark.parametrize("family,block", [("llama", 4), ("gemma2", 5)])
def test_causal_blocks_match_einsum_on_every_real_token(family, block, monkeypatch):
  # Query blocks of 4 over 12 tokens (3 blocks, the last reading all keys; blocks of 5: a last block of 2), left
  # padding of 0, 3 and 7 tokens and right padding of 2: logits at every real token and the adapters' gradients
  # equal the einsum's. Pad rows are left out: a left pad reads no key under the blocks (nothing reads a pad row,
  # so no real value depends on it).
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
  base_cfg, params, lp, ids, mask = _tiny_lora_batch(family, rows=4)
  batch = (params, lp, ids, mask.at[3, 10:].set(0))
  calls = []  # The block sizes the recomputing kernel ran with (None: one block over every key).
  monkeypatch.setattr(attention, "_query_blocks", lambda t, s, b, f=attention._query_blocks: calls.append(b) or f(t, s, b))
  ref = _real_logits_and_grad(base_cfg, *batch)
  # "chunked" over chunks of 6 (2 chunks, each through the causal blocks) as well.
  for kind, chunk in (("causal", 256), ("auto", 256), ("chunked", 6)):
    calls.clear()
    got = _real_logits_and_grad(dataclasses.replace(base_cfg, attention=kind, attention_block=chunk), *batch)
    assert block in calls and None not in calls, (kind, chunk, calls)  # the blocked kernel ran, not its fallback
    _assert_same(got, ref, kind)


def test_causal_blocks_skip_the_keys_after_each_block():
  # 256 tokens in 4 blocks of 64 compute 10 of the 16 [64, 64] score tiles: the forward's compiled FLOPs drop by
  # at least 30% of the attention matmuls' (QKᵀ and PV: 2 · 2·B·N·T·S·H) against the recomputing kernel.
  cfg = tiny_config(attention="recompute", num_layers=1)
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 2, 256, cfg.vocab_size)
  flops = lambda c: jax.jit(lambda p: models.forward(c, p, ids, mask).logits).lower(params).compile() \
      .cost_analysis()["flops"]
  attn = 2 * 2 * 2 * cfg.num_heads * 256 * 256 * cfg.head_dim
  saved = flops(cfg) - flops(dataclasses.replace(cfg, attention="causal"))
  assert saved > 0.3 * attn, (saved, attn)


def grad_temp_bytes(cfg, params, ids, mask) -> int:
  """Compiled temporaries of the gradient of the final hidden state's sum (reverse mode through every layer)."""
  f = jax.jit(jax.grad(lambda p: models.forward(cfg, p, ids, mask, return_logits=False).hidden.sum()))
  return f.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_chunked_attention_lowers_compiled_memory():
  cfg = tiny_config(attention="xla", num_layers=2)
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 8, 512, cfg.vocab_size)
  full = grad_temp_bytes(cfg, params, ids, mask)
  chunked = grad_temp_bytes(dataclasses.replace(cfg, attention="chunked", attention_block=64), params, ids, mask)
  assert chunked < 0.5 * full, (chunked, full)


def _random_qkv(rng, b, t, s, n, kv, h):
  """Grouped-head q [B,T,N,H], k and v [B,S,K,H], and output weights w [B,T,N,H] for a loss Σ o ∘ w."""
  q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2.0)
  k, v = jnp.asarray(rng.normal(size=(b, s, kv, h))), jnp.asarray(rng.normal(size=(b, s, kv, h)))
  return q, k, v, jnp.asarray(rng.normal(size=(b, t, n, h)))


def _assert_equals_einsum_f64(fn, q, k, v, w, mask, softcap):
  """Value and q/k/v gradients of Σ fn(...) ∘ w equal attend_einsum's to float64 round-off."""
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask, 0.7, softcap) * w)
  ref_val, ref_grads = jax.value_and_grad(loss(attention.attend_einsum), argnums=(0, 1, 2))(q, k, v)
  val, grads = jax.value_and_grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(val, ref_val, rtol=1e-12)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_recompute_backward_equals_autodiff_of_einsum_in_float64(softcap):
  # Grouped heads (N=4 over K=2), a random mask with one fully masked query row (uniform probabilities there),
  # float64 so that agreement is to round-off, not to a float32 tolerance.
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    b, t, s = 2, 5, 7
    q, k, v, w = _random_qkv(rng, b, t, s, 4, 2, 3)
    mask = rng.random((b, 1, t, s)) < 0.6
    mask[1, 0, 2] = False
    _assert_equals_einsum_f64(attention.attend_recompute, q, k, v, w, jnp.asarray(mask), softcap)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_causal_blocks_equal_einsum_in_float64(softcap):
  # The last T = 7 of S = 9 keys are the queries, blocks of 3 (the last block one row): query row i reads keys up
  # to S − T + i; some keys are invalid (key 0 never, so no row is fully masked). Values and gradients of q, k, v
  # equal the einsum's to round-off.
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    b, t, s = 2, 7, 9
    q, k, v, w = _random_qkv(rng, b, t, s, 4, 2, 3)
    valid = (rng.random((b, s)) < 0.7) | (np.arange(s) == 0)
    mask = (np.arange(s)[None, None, :] <= s - t + np.arange(t)[None, :, None]) & valid[:, None, :]
    _assert_equals_einsum_f64(lambda *a: attention.attend_causal(*a, block=3), q, k, v, w,
                              jnp.asarray(mask[:, None]), softcap)


def test_recompute_attention_saves_no_probabilities():
  # Reverse mode through 2 scanned layers: the einsum kernel keeps [L, B, heads, T, S] probabilities for the
  # backward; the recomputing one keeps [B, heads, T] row statistics, so its compiled temporaries are smaller.
  cfg = tiny_config(attention="einsum", num_layers=2)
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 8, 256, cfg.vocab_size)
  probs_bytes = cfg.num_layers * 8 * cfg.num_heads * 256 * 256 * 4
  einsum = grad_temp_bytes(cfg, params, ids, mask)
  recompute = grad_temp_bytes(dataclasses.replace(cfg, attention="recompute"), params, ids, mask)
  assert einsum - recompute > 0.9 * probs_bytes, (einsum, recompute, probs_bytes)
