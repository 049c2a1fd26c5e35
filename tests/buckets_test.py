"""Length buckets: every row once per epoch, batches of similar length, cut exactly at a bucket, resumable, and
the reward model scores and loss of a cut batch equal those of the fully padded one."""
import functools
import json

import jax
import numpy as np
import pytest

from perl_jax import data, lora, models, reward, trained
from perl_jax.data import pipeline
from tests.helpers import tiny_config


def _arrays(n, max_len=64, seed=0):
  """Right-padded rows of random lengths; input_ids[:, 0] holds the row index."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, max_len + 1, size=n)
  ids = np.zeros((n, max_len), np.int32)
  mask = (np.arange(max_len) < lengths[:, None]).astype(np.int32)
  ids[mask.astype(bool)] = rng.integers(3, 100, size=int(mask.sum()))
  ids[:, 0] = np.arange(n)
  return {"input_ids": ids, "attention_mask": mask, "label": (np.arange(n) % 2).astype(np.float32)}, lengths


def _it(arrays, **kw):
  return data.BatchIterator(arrays, 8, seed=3, process_index=0, process_count=1, buckets=(16, 32, 48, 64),
                            group_by_length=True, **kw)


def test_grouped_epochs_cover_every_row_once_with_similar_lengths_and_exact_cuts():
  arrays, lengths = _arrays(96)
  it = _it(arrays, group_batches=4)
  spreads, random_spreads = [], []
  for epoch in range(2):
    seen = []
    for _ in range(it.steps_per_epoch):
      b = next(it)
      idx = b["input_ids"][:, 0]
      seen += idx.tolist()
      longest = lengths[idx].max()
      assert b["input_ids"].shape[1] == min(t for t in (16, 32, 48, 64) if t >= longest)
      np.testing.assert_array_equal(b["attention_mask"], arrays["attention_mask"][idx, :b["input_ids"].shape[1]])
      assert b["attention_mask"].sum() == lengths[idx].sum()  # Nothing real was cut.
      spreads.append(np.ptp(lengths[idx]))
    assert sorted(seen) == list(range(96)), epoch
  rng = np.random.default_rng(0)
  random_spreads = [np.ptp(lengths[rng.choice(96, 8, replace=False)]) for _ in range(200)]
  assert np.mean(spreads) < 0.5 * np.mean(random_spreads)


def test_grouped_iterator_resumes_exactly():
  arrays, _ = _arrays(50)
  ref = _it(arrays)
  expected = [next(ref)["input_ids"][:, 0].tolist() for _ in range(15)]
  first = _it(arrays)
  seen = [next(first)["input_ids"][:, 0].tolist() for _ in range(4)]
  restored = _it(arrays)
  restored.set_state(json.loads(json.dumps(first.get_state())))
  assert seen + [next(restored)["input_ids"][:, 0].tolist() for _ in range(11)] == expected


def test_unshuffled_grouping_goes_longest_first_and_pads_the_last_batch():
  arrays, lengths = _arrays(20)
  it = data.BatchIterator(arrays, 8, shuffle=False, num_epochs=1, drop_remainder=False, process_index=0,
                          process_count=1, buckets=(16, 32, 48, 64), group_by_length=True)
  batches = list(it)
  order = np.concatenate([b["input_ids"][:, 0][b["valid"].astype(bool)] for b in batches])
  assert sorted(order.tolist()) == list(range(20))
  assert (np.diff(lengths[order]) <= 0).all()


def test_default_buckets():
  assert pipeline.default_buckets(192) == (64, 128, 192)
  assert pipeline.default_buckets(200) == (64, 128, 192, 200)


@pytest.mark.parametrize("loss", ["bce", "bt"])
def test_cut_batch_scores_and_loss_equal_full_padding(loss):
  cfg = tiny_config()
  base = models.init_params(cfg, jax.random.key(0))
  rcfg = trained.RewardConfig(mode="lora", loss=loss, lora_cfg=lora.LoraConfig(rank=2))
  tr = trained.init_reward(jax.random.key(1), rcfg, cfg, base)
  tr["lora"] = jax.tree.map(lambda x: x + 0.05, tr["lora"])
  arrays, lengths = _arrays(8, max_len=64, seed=1)
  arrays["attention_mask"][:, 30:] = 0  # Every row ends by token 30: the cut to 32 drops only pads.
  arrays["input_ids"][:, 30:] = 0
  if loss == "bt":
    arrays = {k: v.reshape(4, 2, *v.shape[1:]) if k != "label" else v[:4] for k, v in arrays.items()}
  full = {k: v for k, v in arrays.items()}
  cut = pipeline.cut_to_bucket(full, 30, (16, 32, 64))
  assert cut["input_ids"].shape[-1] == 32
  f = functools.partial(reward.loss_fn, cfg, rcfg, tr, base)
  (l_full, m_full), (l_cut, m_cut) = f(full), f(cut)
  np.testing.assert_allclose(float(l_cut), float(l_full), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(trained.batch_scores(cfg, rcfg, tr, base, cut)),
                             np.asarray(trained.batch_scores(cfg, rcfg, tr, base, full)), atol=1e-5)
