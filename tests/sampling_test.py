"""KV-cache sampling equals decoding by repeated full forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora, models, sampling
from perl_jax.models import attention
from tests.helpers import random_batch, tiny_config


def _reference_decode(cfg, params, ids, mask, n, adapters, temperature, rngs):
  """Re-runs the whole sequence for every new token; no cache."""
  toks, logps = [], []
  for i in range(n):
    logits = models.forward(cfg, params, ids, mask, adapters=adapters).logits[:, -1]
    tok, logp = sampling.sample_token(rngs[i], logits, temperature)
    toks.append(tok)
    logps.append(logp)
    ids = jnp.concatenate([ids, tok[:, None]], 1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1)
  return np.stack(toks, 1), np.stack(logps, 1)


@pytest.mark.parametrize("family,temperature", [("llama", 0.0), ("gemma2", 0.7)])
def test_cached_generation_matches_full_recompute(family, temperature, monkeypatch):
  # Causal query blocks of 4: the full recomputation of lengths 6 to 12 runs the blocked kernel (a shorter last
  # block unless 4 divides the length), and the cached decode (keys in the cache, not the queries' own sequence)
  # must not.
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
  cfg = tiny_config(family)
  params = models.init_params(cfg, jax.random.key(0))
  lcfg = lora.LoraConfig(rank=2)
  lp = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(1), params, lcfg))
  adapters = [(lp, lora.scale(lcfg))]
  ids, mask = random_batch(0, 3, 6, cfg.vocab_size, left_pad=(0, 2, 4))
  n = 7
  rng = jax.random.key(5)
  out = sampling.generate(cfg, params, ids, mask, max_new_tokens=n, rng=rng, temperature=temperature,
                          adapters=adapters, eos_id=-1)
  ref_toks, ref_logp = _reference_decode(cfg, params, ids, mask, n, adapters, temperature, jax.random.split(rng, n))
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), ref_toks)
  np.testing.assert_allclose(np.asarray(out.logp_BxN), ref_logp, atol=1e-4)
  assert np.all(np.asarray(out.mask_BxN) == 1)


def test_eos_stops_rows_and_masks_the_rest():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(1, 2, 5, cfg.vocab_size)
  free = sampling.generate(cfg, params, ids, mask, max_new_tokens=6, eos_id=-1)
  eos = int(free.tokens_BxN[0, 2])
  out = sampling.generate(cfg, params, ids, mask, max_new_tokens=6, eos_id=eos, pad_id=0)
  toks, m = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
  for row in range(2):
    hits = np.flatnonzero(np.asarray(free.tokens_BxN[row]) == eos)
    stop = hits[0] if len(hits) else 5
    assert m[row, : stop + 1].all() and not m[row, stop + 1:].any()
    np.testing.assert_array_equal(toks[row, : stop + 1], np.asarray(free.tokens_BxN[row, : stop + 1]))
    assert (toks[row, stop + 1:] == 0).all()


# ------------------------------------------------------------------ temperature, top-k, top-p, stop strings


def _numpy_top_p_keep(logits_V, p):
  """Hand nucleus: sort descending, keep a token while the mass before it is below p."""
  probs = np.exp(logits_V - logits_V.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros(len(probs), bool)
  mass = 0.0
  for i in order:
    if mass < p:
      keep[i] = True
    mass += probs[i]
  return keep


def test_top_p_mask_equals_numpy_hand_computation():
  logits = np.random.default_rng(0).normal(size=(5, 17)).astype(np.float32) * 2
  for p in (0.1, 0.5, 0.9, 0.99):
    got = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), p)))
    want = np.stack([_numpy_top_p_keep(row.astype(np.float64), p) for row in logits])
    np.testing.assert_array_equal(got, want)
  assert np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits), 1.0))).all()


def test_filter_order_temperature_then_top_k_then_top_p():
  logits = jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0]])
  # T = 2 flattens to [2, 1.5, 1, .5, 0]; top-k 4 drops the last; top-p .5 on the 4 left keeps ids 0, 1.
  out = np.asarray(sampling.filter_logits(logits, 2.0, top_k=4, top_p=0.5))
  probs4 = np.exp([2.0, 1.5, 1.0, 0.5]) / np.exp([2.0, 1.5, 1.0, 0.5]).sum()
  assert probs4[0] < 0.5 <= probs4[0] + probs4[1]
  np.testing.assert_allclose(out[0, :2], [2.0, 1.5])
  assert np.isneginf(out[0, 2:]).all()


def test_sampled_support_respects_top_k_and_top_p():
  logits_V = np.random.default_rng(1).normal(size=12).astype(np.float32)
  logits = jnp.tile(jnp.asarray(logits_V), (4000, 1))
  for top_k, top_p in ((3, 1.0), (0, 0.6), (5, 0.8)):
    allowed = np.isfinite(np.asarray(sampling.filter_logits(logits[:1], 0.7, top_k, top_p)))[0]
    toks, logp = sampling.sample_token(jax.random.key(top_k), logits, 0.7, top_k, top_p)
    seen = np.unique(np.asarray(toks))
    assert set(seen) == set(np.flatnonzero(allowed))
    # Log-probs are those of the renormalised filtered distribution.
    kept = logits_V[allowed] / 0.7
    norm = np.log(np.exp(kept - kept.max()).sum()) + kept.max()
    np.testing.assert_allclose(np.asarray(logp), logits_V[np.asarray(toks)] / 0.7 - norm, rtol=1e-5, atol=1e-5)


def test_top_k_one_equals_greedy():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(2, 3, 5, cfg.vocab_size, left_pad=(0, 1, 3))
  greedy = sampling.generate(cfg, params, ids, mask, max_new_tokens=6, eos_id=-1)
  top1 = sampling.generate(cfg, params, ids, mask, max_new_tokens=6, eos_id=-1, temperature=1.3, top_k=1,
                           rng=jax.random.key(9))
  np.testing.assert_array_equal(np.asarray(top1.tokens_BxN), np.asarray(greedy.tokens_BxN))
  np.testing.assert_allclose(np.asarray(top1.logp_BxN), 0.0)


def test_stop_string_cut_hand_example():
  vocab = ["<pad>", "Hi", " there", "\n", "Us", "er", ":", " ok", "!"]
  decode = lambda ids: "".join(vocab[i] for i in ids)
  tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8],    # "Hi there\nUser: ok!" -> cut after ":" (index 5)
                     [1, 2, 8, 7, 0, 0, 0, 0],    # no stop string: unchanged
                     [4, 5, 6, 3, 1, 0, 0, 0]])   # "User:\nHi" -> cut after ":" (index 2)
  mask = (np.arange(8)[None] < np.array([[8], [4], [5]])).astype(np.int32)
  toks, m = sampling.cut_at_stop_strings(tokens, mask, decode, ["User:", "\nUs"], pad_id=0)
  np.testing.assert_array_equal(m.sum(1), [4, 4, 3])   # row 0: "\nUs" completes at index 3
  np.testing.assert_array_equal(toks[0], [1, 2, 3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(toks[1], tokens[1])
  toks, m = sampling.cut_at_stop_strings(tokens, mask, decode, ["User:"], pad_id=0)
  np.testing.assert_array_equal(m.sum(1), [6, 4, 3])
  assert sampling.stop_length([1, 2], decode, ["User:"]) is None


def test_generate_on_2x2x2_mesh_equals_one_device():
  from perl_jax import sharding
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  lcfg = lora.LoraConfig(rank=2)
  lp = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(1), params, lcfg))
  ids, mask = random_batch(4, 8, 5, cfg.vocab_size, left_pad=(0, 2, 1, 0, 3, 0, 0, 1))
  kw = dict(max_new_tokens=5, rng=jax.random.key(3), temperature=0.8, top_k=20, top_p=0.9, eos_id=-1)
  one = sampling.generate(cfg, params, ids, mask, adapters=[(lp, 2.0)], **kw)
  mesh = sharding.make_mesh(2, 2, 2)
  b_sh = sharding.batch_sharding(mesh)
  out = sampling.generate(cfg, sharding.shard(params, mesh), jax.device_put(ids, b_sh), jax.device_put(mask, b_sh),
                          adapters=[(sharding.shard(lp, mesh), 2.0)], **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(one.tokens_BxN))
  np.testing.assert_allclose(np.asarray(out.logp_BxN), np.asarray(one.logp_BxN), atol=1e-5)
