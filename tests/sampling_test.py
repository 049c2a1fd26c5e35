"""KV-cache sampling equals decoding by repeated full forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora, models, sampling
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
def test_cached_generation_matches_full_recompute(family, temperature):
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
