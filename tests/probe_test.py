"""LP-FT's linear probe: the Newton fit is sklearn's logistic regression, the folded head scores raw features as
the standardised fit does, and an RM run with head_init="probe" starts from the probe of its own features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import heads, probe, trained

sklearn = pytest.importorskip("sklearn")
from sklearn import linear_model, preprocessing  # noqa: E402


def _data(n=300, d=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 20.0, d) + rng.normal(size=d) * 5
  z = (x - x.mean(0)) / x.std(0)
  y = (z @ rng.normal(size=d) + rng.logistic(size=n) > 1.0).astype(np.float64)
  return x, y


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_logistic_fit_equals_sklearn_with_weights_and_intercept(c):
  x, y = _data()
  z = preprocessing.StandardScaler().fit_transform(x)
  s = np.where(y > 0.5, 0.4, 1.0)
  w, b = probe.logistic_fit(z, y, c=c, s_N=s)
  ref = linear_model.LogisticRegression(C=c, tol=1e-12, max_iter=10000).fit(z, y, sample_weight=s)
  np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-6)
  assert b == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)


def test_pairwise_fit_is_the_bradley_terry_minimum():
  """No intercept, y = 1: the finite-difference gradient of C Σ softplus(−d·w) + ½‖w‖² vanishes at the fit."""
  rng = np.random.default_rng(1)
  d = rng.normal(size=(200, 5)) + 0.3
  w, b = probe.logistic_fit(d, np.ones(200), c=0.5, fit_intercept=False)
  assert b == 0.0
  objective = lambda w_: 0.5 * np.sum(np.logaddexp(0.0, -d @ w_)) + 0.5 * np.sum(w_ ** 2)
  eps = 1e-6
  g = [(objective(w + eps * e) - objective(w - eps * e)) / (2 * eps) for e in np.eye(5)]
  np.testing.assert_allclose(g, 0.0, atol=1e-6)
  assert objective(w) < objective(w * 1.01) and objective(w) < objective(w * 0.99)


def test_fit_head_on_raw_features_scores_like_the_standardised_sklearn_probe():
  x, y = _data(seed=2)
  head, info = probe.fit_head(x, y, pos_weight=2.0)
  scaler = preprocessing.StandardScaler().fit(x)
  ref = linear_model.LogisticRegression(C=info["C"], tol=1e-12, max_iter=10000).fit(
      scaler.transform(x), y, sample_weight=np.where(y > 0.5, 2.0, 1.0))
  got = np.asarray(heads.head_apply(jax.tree.map(jnp.asarray, head), jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, ref.decision_function(scaler.transform(x)), rtol=1e-3, atol=1e-3)
  assert set(info["cv_loss"]) == set(probe.DEFAULT_CS) and info["C"] == min(info["cv_loss"], key=info["cv_loss"].get)


def test_cross_validation_regularises_noise_hardest():
  """Labels independent of 40 noise features: held-out loss is best with the strongest penalty (smallest C)."""
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(120, 40)), (rng.uniform(size=120) > 0.5).astype(np.float64)
  c, cv = probe.cross_validate(x, y)
  assert c == min(probe.DEFAULT_CS) and cv[c] < cv[max(probe.DEFAULT_CS)]


def test_unknown_head_init_is_a_config_error_naming_the_field():
  import sys

  from perl_jax import models
  from tests.conftest import ROOT
  sys.path.insert(0, str(ROOT))
  from experiments.rm import smollm2
  c = smollm2.get_config("tm4_lora")
  assert trained.reward_config(c).loss == "bce"
  c.head_init = "pca"
  with pytest.raises(models.ConfigError, match="field 'head_init'.*'pca'"):
    trained.reward_config(c)


def test_cached_bf16_features_read_back_as_their_float32_values(tmp_path):
  """bf16 compute (the GPU recipe) caches its features; a second run reads the same numbers, not npz raw bytes."""
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.bfloat16)
  calls = []
  compute = lambda: (calls.append(1), (np.asarray(feats), np.arange(5.0)))[1]
  first, _ = probe.cached_features(str(tmp_path), "k", compute)
  again, labels = probe.cached_features(str(tmp_path), "k", compute)
  assert len(calls) == 1 and again.dtype == np.float32
  np.testing.assert_array_equal(again, np.asarray(feats, np.float32))
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(labels, np.arange(5.0))
