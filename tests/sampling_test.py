"""KV-cache sampling equals decoding by repeated full forwards."""
import functools

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
  last_logits = jax.jit(lambda p, i, m, a: models.forward(cfg, p, i, m, adapters=a).logits[:, -1])  # one per length
  for i in range(n):
    logits = last_logits(params, ids, mask, adapters)
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


def test_stop_sequences_end_rows_on_device_where_numpy_finds_them():
  """A row ends right after the first place its free-running tokens spell a stop sequence (searched in numpy);
  rows that never spell one run as before, and done_B marks the rows that ended (EOS or stop), not the cut ones."""
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(3, 4, 5, cfg.vocab_size)
  n, rng = 8, jax.random.key(3)
  free = np.asarray(sampling.generate(cfg, params, ids, mask, max_new_tokens=n, eos_id=-1, temperature=1.0,
                                      rng=rng).tokens_BxN)
  seqs = ((int(free[0, 2]), int(free[0, 3])), (int(free[1, 0]),))  # two tokens in row 0; the first token of row 1
  out = sampling.generate(cfg, params, ids, mask, max_new_tokens=n, eos_id=-1, temperature=1.0, rng=rng,
                          stop_sequences=seqs)
  toks, m, done = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN), np.asarray(out.done_B)

  def first_end(row):  # index of the token completing the first stop sequence, or None
    for i in range(n):
      if any(i + 1 >= len(s) and tuple(row[i + 1 - len(s): i + 1]) == s for s in seqs):
        return i
    return None

  assert first_end(free[0]) is not None and first_end(free[1]) == 0
  for r in range(4):
    end = first_end(free[r])
    stop = n - 1 if end is None else end
    assert m[r, : stop + 1].all() and not m[r, stop + 1:].any(), r
    np.testing.assert_array_equal(toks[r, : stop + 1], free[r, : stop + 1])
    assert done[r] == (end is not None)


def _scan_generate(cfg, params, adapters, ids, mask, rng, n, temperature, eos_id, pad_id=0):
  """The sampler before the early-exit while loop (git a646b0b): all n − 1 decode steps in a lax.scan."""
  b, t = ids.shape
  draw = functools.partial(sampling.sample_token, temperature=temperature)
  out = models.forward(cfg, params, ids, mask, adapters=adapters, cache=models.init_cache(cfg, b, t + n, jnp.float32))
  rngs = jax.random.split(rng, n)
  tok, logp = draw(rngs[0], out.logits[:, -1])

  def step(carry, rng):
    cache, tok, done = carry
    out = models.forward(cfg, params, tok[:, None], None, adapters=adapters, cache=cache)
    nxt, logp = draw(rng, out.logits[:, -1])
    nxt = jnp.where(~done, nxt, pad_id)
    return (out.cache, nxt, done | (nxt == eos_id)), (nxt, logp, ~done)

  _, (toks, logps, valids) = jax.lax.scan(step, (out.cache, tok, tok == eos_id), rngs[1:])
  tokens = jnp.concatenate([tok[:, None], toks.T], axis=1)
  m = jnp.concatenate([jnp.ones((b, 1), bool), valids.T], axis=1)
  return tokens, m.astype(jnp.int32), jnp.where(m, jnp.concatenate([logp[:, None], logps.T], axis=1), 0.0)


def _lora_model(family):
  """A tiny model and a LoRA small enough that greedy rows differ (prompt-dependent, no one-token collapse)."""
  cfg = tiny_config(family)
  params = models.init_params(cfg, jax.random.key(0))
  lp = jax.tree.map(lambda x: x + 0.02, lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2)))
  return cfg, params, [(lp, 2.0)]


def _earliest_common_eos(tokens_BxN):
  """The token that, as eos_id, ends every row soonest (least max over rows of its first index; N if absent)."""
  tokens_BxN = np.asarray(tokens_BxN)
  first = lambda v: max(np.argmax(r == v) if (r == v).any() else len(r) for r in tokens_BxN)
  return int(min(np.unique(tokens_BxN), key=first))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_early_exit_loop_equals_old_scan_sampler_bit_for_bit(temperature):
  cfg, params, adapters = _lora_model("llama")
  ids, mask = random_batch(6, 3, 6, cfg.vocab_size, left_pad=(0, 3, 1))
  rng, n = jax.random.key(11), 7
  kw = dict(max_new_tokens=n, rng=rng, temperature=temperature, adapters=adapters, pad_id=0)
  free = sampling.generate(cfg, params, ids, mask, eos_id=-1, **kw)
  assert int(free.steps) == n - 1
  scan = jax.jit(_scan_generate, static_argnums=(0, 6, 7, 8))
  # No eos; one that row 0 emits second (the rest run on); the one that ends every row soonest.
  for eos_id in (-1, int(free.tokens_BxN[0, 1]), _earliest_common_eos(free.tokens_BxN)):
    out = sampling.generate(cfg, params, ids, mask, eos_id=eos_id, **kw)
    want = scan(cfg, params, adapters, ids, mask, rng, n, temperature, eos_id)
    for got, ref in zip(out[:3], want):
      assert got.dtype == ref.dtype
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    lengths = np.asarray(out.mask_BxN).sum(1)
    assert int(out.steps) == lengths.max() - 1
  if temperature == 0.0:   # greedy rows end at different tokens, all before the last: the loop exited early
    assert len(set(lengths)) == 3 and int(out.steps) < n - 1


def test_loop_stops_once_every_row_has_hit_eos():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(5, 1, 5, cfg.vocab_size)
  ids, mask = jnp.repeat(ids, 3, axis=0), jnp.repeat(mask, 3, axis=0)   # three rows, one greedy continuation
  free = sampling.generate(cfg, params, ids, mask, max_new_tokens=8, eos_id=-1)
  first = np.asarray(free.tokens_BxN[0])
  assert int(free.steps) == 7
  calls = []
  real_forward = models.forward

  def counting_forward(cfg, params, ids_BxT, *args, **kw):
    out = real_forward(cfg, params, ids_BxT, *args, **kw)
    if ids_BxT.shape[1] == 1:   # a decode step: count the ones that execute, not the traces
      jax.debug.callback(lambda: calls.append(1))
    return out

  # Greedy rows all emit `first`; an eos_id of first[j] (its first occurrence) ends every row at token j.
  j = next(j for j in range(1, 7) if first[j] not in first[:j])
  for steps in (0, j):
    calls.clear()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(models, "forward", counting_forward)
      out = sampling.generate_fn(cfg, params, [], ids, mask, jax.random.key(0), scales=(), max_new_tokens=8,
                                 temperature=0.0, eos_id=int(first[steps]), pad_id=0, cache_dtype="float32")
      jax.effects_barrier()
    assert int(out.steps) == steps and len(calls) == steps
    np.testing.assert_array_equal(np.asarray(out.mask_BxN), np.tile(np.arange(8) <= steps, (3, 1)))
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.tile(np.where(np.arange(8) <= steps, first, 0),
                                                                      (3, 1)))


@pytest.mark.parametrize("family,temperature", [("llama", 0.0), ("llama", 0.8), ("gemma2", 0.8)])
def test_num_samples_equals_repeated_prompts(family, temperature):
  cfg, params, adapters = _lora_model(family)
  ids, mask = random_batch(6, 3, 6, cfg.vocab_size, left_pad=(0, 3, 1))
  ids3, mask3 = jnp.repeat(ids, 3, axis=0), jnp.repeat(mask, 3, axis=0)
  kw = dict(max_new_tokens=7, rng=jax.random.key(4), temperature=temperature, adapters=adapters, pad_id=0)
  free = sampling.generate(cfg, params, ids3, mask3, eos_id=-1, **kw)
  for eos_id in (-1, int(free.tokens_BxN[3, 2])):   # prompt 1's first sample ends at its third token
    group = sampling.generate(cfg, params, ids, mask, eos_id=eos_id, num_samples=3, **kw)
    rep = sampling.generate(cfg, params, ids3, mask3, eos_id=eos_id, **kw)
    assert group.tokens_BxN.shape == group.mask_BxN.shape == group.logp_BxN.shape == (9, 7)
    np.testing.assert_array_equal(np.asarray(group.tokens_BxN), np.asarray(rep.tokens_BxN))
    np.testing.assert_array_equal(np.asarray(group.mask_BxN), np.asarray(rep.mask_BxN))
    np.testing.assert_allclose(np.asarray(group.logp_BxN), np.asarray(rep.logp_BxN), atol=1e-5)
    assert int(group.steps) == int(rep.steps)
    if eos_id == -1:
      toks = np.asarray(group.tokens_BxN).reshape(3, 3, 7)
  distinct = [len({tuple(row) for row in toks[b]}) for b in range(3)]
  assert distinct == ([1, 1, 1] if temperature == 0.0 else [3, 3, 3])   # greedy copies; sampled draws differ


def test_num_samples_prefills_the_prompts_once():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(7, 2, 5, cfg.vocab_size, left_pad=(0, 2))
  shapes = []
  real_forward = models.forward

  def recording_forward(cfg, params, ids_BxT, *args, **kw):
    shapes.append(ids_BxT.shape)   # at trace time: one prefill, one traced decode body
    return real_forward(cfg, params, ids_BxT, *args, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(models, "forward", recording_forward)
    out = jax.jit(sampling.generate_fn, static_argnames=("scales", "max_new_tokens", "temperature", "eos_id",
                                                         "pad_id", "cache_dtype", "num_samples"), static_argnums=0)(
        cfg, params, [], ids, mask, jax.random.key(0), scales=(), max_new_tokens=4, temperature=0.7, eos_id=-1,
        pad_id=0, cache_dtype="float32", num_samples=4)
  assert shapes == [(2, 5), (8, 1)]
  assert out.tokens_BxN.shape == out.mask_BxN.shape == out.logp_BxN.shape == (8, 4)


def test_repeat_cache_repeats_every_batched_array_in_place():
  cfg = tiny_config()
  cache = models.init_cache(cfg, 2, 3, jnp.float32)
  cache = {name: (jnp.arange(x.size).reshape(x.shape).astype(x.dtype) if name != "valid" else
                  jnp.arange(x.size).reshape(x.shape) % 3 == 0) for name, x in cache.items()}
  rep = sampling.repeat_cache(cache, 3)
  assert set(rep) == set(cache) and int(rep["index"]) == int(cache["index"])
  for row in range(6):
    np.testing.assert_array_equal(rep["k"][:, row], cache["k"][:, row // 3])
    np.testing.assert_array_equal(rep["v"][:, row], cache["v"][:, row // 3])
    np.testing.assert_array_equal(rep["pos"][row], cache["pos"][row // 3])
    np.testing.assert_array_equal(rep["valid"][row], cache["valid"][row // 3])


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
  # A stop string ending on a row's last token leaves its mask as it was, but the row did finish.
  _, m, stopped = sampling.cut_at_stop_strings(tokens, mask, decode, ["ok!"], pad_id=0, return_stopped=True)
  np.testing.assert_array_equal(m, mask)
  np.testing.assert_array_equal(stopped, [True, False, False])
  assert sampling.stop_length([1, 2], decode, ["User:"]) is None


def test_generate_on_2x2x2_mesh_equals_one_device():
  from perl_jax import sharding
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  lcfg = lora.LoraConfig(rank=2)
  lp = jax.tree.map(lambda x: x + 0.1, lora.init(jax.random.key(1), params, lcfg))
  ids, mask = random_batch(4, 8, 5, cfg.vocab_size, left_pad=(0, 2, 1, 0, 3, 0, 0, 1))
  kw = dict(max_new_tokens=5, rng=jax.random.key(3), temperature=0.8, top_k=20, top_p=0.9, eos_id=-1)
  free = np.asarray(sampling.generate(cfg, params, ids, mask, adapters=[(lp, 2.0)], **kw).tokens_BxN)
  kw["stop_sequences"] = ((int(free[0, 1]), int(free[0, 2])), (int(free[5, 3]),))  # rows stop on device, sharded
  one = sampling.generate(cfg, params, ids, mask, adapters=[(lp, 2.0)], **kw)
  assert np.asarray(one.done_B)[[0, 5]].all() and np.asarray(one.mask_BxN)[0, 3:].sum() == 0
  mesh = sharding.make_mesh(2, 2, 2)
  b_sh = sharding.batch_sharding(mesh)
  out = sampling.generate(cfg, sharding.shard(params, mesh), jax.device_put(ids, b_sh), jax.device_put(mask, b_sh),
                          adapters=[(sharding.shard(lp, mesh), 2.0)], **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(one.tokens_BxN))
  np.testing.assert_array_equal(np.asarray(out.done_B), np.asarray(one.done_B))
  np.testing.assert_allclose(np.asarray(out.logp_BxN), np.asarray(one.logp_BxN), atol=1e-5)


def test_num_samples_on_2x2x2_mesh_equals_one_device():
  from perl_jax import sharding
  cfg, params, adapters = _lora_model("llama")
  ids, mask = random_batch(8, 4, 5, cfg.vocab_size, left_pad=(0, 2, 1, 3))
  kw = dict(max_new_tokens=5, rng=jax.random.key(3), temperature=0.8, eos_id=-1, num_samples=2)
  one = sampling.generate(cfg, params, ids, mask, adapters=adapters, **kw)
  mesh = sharding.make_mesh(2, 2, 2)
  b_sh = sharding.batch_sharding(mesh)
  out = sampling.generate(cfg, sharding.shard(params, mesh), jax.device_put(ids, b_sh), jax.device_put(mask, b_sh),
                          adapters=[(sharding.shard(adapters[0][0], mesh), 2.0)], **kw)
  assert out.tokens_BxN.shape == (8, 5)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(one.tokens_BxN))
  np.testing.assert_allclose(np.asarray(out.logp_BxN), np.asarray(one.logp_BxN), atol=1e-5)


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _collectives_in_loops(hlo: str) -> dict:
  """Collective ops inside any while-loop body of compiled HLO text (the decode loop, the layer scans) and every
  computation those bodies call."""
  import re
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name = m.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  text = {n: "\n".join(body) for n, body in comps.items()}
  called = {n: set(re.findall(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)", t)) for n, t in text.items()}
  todo = [b for t in text.values() for b in re.findall(r"body=%?([\w.\-]+)", t)]
  assert todo, "no while loop in the HLO"
  seen = set()
  while todo:
    c = todo.pop()
    if c in text and c not in seen:
      seen.add(c)
      todo += called[c]
  return {k: sum(text[c].count(f" {k}(") + text[c].count(f" {k}-start(") for c in seen) for k in _COLLECTIVES}


def test_fsdp_weights_are_gathered_once_outside_the_decode_loop():
  """On a data × fsdp mesh the rollout's sampler gathers its FSDP-sharded weights once, before the prefill: the
  compiled loops (decode steps, layer scans) hold no collective at all, where the plain sampler all-gathers and
  all-reduces in them at every token. Same samples either way."""
  from perl_jax import sharding
  from perl_jax.rl import RLConfig, rollout
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  mesh = sharding.make_mesh(2, 4, 1)
  rlcfg = RLConfig(max_new_tokens=4, temperature=0.7, eos_id=-1)
  ids, mask = random_batch(1, 8, 5, cfg.vocab_size)
  p_sh, b_sh = sharding.shardings(params, mesh), sharding.batch_sharding(mesh)
  out, loops = {}, {}
  for name, m in (("plain", None), ("gathered", mesh)):
    f = jax.jit(lambda p, i, mk, r, m=m: rollout.sample_with(cfg, rlcfg, p, [], i, mk, r, m),
                in_shardings=(p_sh, b_sh, b_sh, None))
    args = (jax.device_put(params, p_sh), jax.device_put(ids, b_sh), jax.device_put(mask, b_sh), jax.random.key(0))
    loops[name] = _collectives_in_loops(f.lower(*args).compile().as_text())
    out[name] = f(*args)
  assert loops["plain"]["all-gather"] + loops["plain"]["all-reduce"] > 0, loops
  assert sum(loops["gathered"].values()) == 0, loops
  np.testing.assert_array_equal(np.asarray(out["gathered"]["tokens_BxN"]), np.asarray(out["plain"]["tokens_BxN"]))
