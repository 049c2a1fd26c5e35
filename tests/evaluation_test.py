"""Host-side eval metrics against brute force and hand computations."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import evaluation, losses


def _brute_auc(score, label):
  pos = [s for s, y in zip(score, label) if y]
  neg = [s for s, y in zip(score, label) if not y]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


def test_roc_auc_vs_brute_force_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(5):
    score = rng.integers(0, 6, size=40).astype(np.float64)
    label = rng.integers(0, 2, size=40).astype(bool)
    m = evaluation.binary_metrics(score, label)
    assert m["roc_auc"] == pytest.approx(_brute_auc(score, label), abs=1e-12), trial
  assert evaluation.roc_auc([1.0, 2.0, 3.0], [0, 1, 1]) == 1.0
  assert evaluation.roc_auc([1.0, 1.0], [0, 1]) == 0.5


def test_roc_auc_nan_when_one_class():
  assert math.isnan(evaluation.binary_metrics([0.1, 0.2], [1, 1])["roc_auc"])
  assert math.isnan(evaluation.binary_metrics([0.1, 0.2], [0, 0])["roc_auc"])


def test_binary_metrics_hand():
  score = np.array([2.0, -1.0, 0.5, -0.3, 3.0, 0.0])
  label = np.array([1, 1, 0, 0, 0, 0])
  m = evaluation.binary_metrics(score, label)
  # pred = [1, 0, 1, 0, 1, 0]; TPR = 1/2, TNR = 2/4.
  assert m["accuracy"] == pytest.approx(3 / 6)
  assert m["balanced_accuracy"] == pytest.approx(0.5 * (1 / 2 + 2 / 4))
  assert m["positive_rate"] == pytest.approx(3 / 6)
  assert m["roc_auc"] == pytest.approx(_brute_auc(score, label))
  p = 1 / (1 + np.exp(-score))
  assert m["loss"] == pytest.approx(-np.mean(label * np.log(p) + (1 - label) * np.log(1 - p)))
  m1 = evaluation.binary_metrics(score, label, threshold=0.6)
  assert m1["positive_rate"] == pytest.approx(2 / 6)
  assert m1["balanced_accuracy"] == pytest.approx(0.5 * (1 / 2 + 3 / 4))


def test_pairwise_metrics_hand():
  rc, rr = [1.0, 0.0, -2.0, 40.0], [0.0, 0.0, 1.0, -40.0]
  m = evaluation.pairwise_metrics(np.array(rc), np.array(rr))
  assert m["accuracy"] == pytest.approx(2 / 4)
  assert m["mean_margin"] == pytest.approx((1 + 0 - 3 + 80) / 4)
  expect = np.mean([math.log1p(math.exp(-(c - r))) for c, r in zip(rc, rr)])
  assert m["loss"] == pytest.approx(expect, rel=1e-12)
  jax_loss = losses.bradley_terry_loss(jnp.array(rc), jnp.array(rr))
  assert m["loss"] == pytest.approx(float(jax_loss), rel=1e-6)
