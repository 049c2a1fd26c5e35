"""Host-side eval metrics against brute force and hand computations."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import losses, stats


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
    m = stats.binary_metrics(score, label)
    assert m["roc_auc"] == pytest.approx(_brute_auc(score, label), abs=1e-12), trial
  assert stats.roc_auc([1.0, 2.0, 3.0], [0, 1, 1]) == 1.0
  assert stats.roc_auc([1.0, 1.0], [0, 1]) == 0.5


def test_roc_auc_nan_when_one_class():
  assert math.isnan(stats.binary_metrics([0.1, 0.2], [1, 1])["roc_auc"])
  assert math.isnan(stats.binary_metrics([0.1, 0.2], [0, 0])["roc_auc"])


def test_binary_metrics_hand():
  score = np.array([2.0, -1.0, 0.5, -0.3, 3.0, 0.0])
  label = np.array([1, 1, 0, 0, 0, 0])
  m = stats.binary_metrics(score, label)
  # pred = [1, 0, 1, 0, 1, 0]; TPR = 1/2, TNR = 2/4.
  assert m["accuracy"] == pytest.approx(3 / 6)
  assert m["balanced_accuracy"] == pytest.approx(0.5 * (1 / 2 + 2 / 4))
  assert m["positive_rate"] == pytest.approx(3 / 6)
  assert m["roc_auc"] == pytest.approx(_brute_auc(score, label))
  p = 1 / (1 + np.exp(-score))
  assert m["loss"] == pytest.approx(-np.mean(label * np.log(p) + (1 - label) * np.log(1 - p)))
  m1 = stats.binary_metrics(score, label, threshold=0.6)
  assert m1["positive_rate"] == pytest.approx(2 / 6)
  assert m1["balanced_accuracy"] == pytest.approx(0.5 * (1 / 2 + 3 / 4))


def test_pairwise_metrics_hand():
  rc, rr = [1.0, 0.0, -2.0, 40.0], [0.0, 0.0, 1.0, -40.0]
  m = stats.pairwise_metrics(np.array(rc), np.array(rr))
  assert m["accuracy"] == pytest.approx(2 / 4)
  assert m["mean_margin"] == pytest.approx((1 + 0 - 3 + 80) / 4)
  expect = np.mean([math.log1p(math.exp(-(c - r))) for c, r in zip(rc, rr)])
  assert m["loss"] == pytest.approx(expect, rel=1e-12)
  jax_loss = losses.bradley_terry_loss(jnp.array(rc), jnp.array(rr))
  assert m["loss"] == pytest.approx(float(jax_loss), rel=1e-6)


def _wilson_by_formula(s, n, z):
  p = s / n
  centre = p + z * z / (2 * n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_interval_published_values_and_formula():
  # Published 95% Wilson intervals (e.g. Newcombe 1998; Agresti & Coull 1998).
  assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=5e-5)
  assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
  assert stats.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
  assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
  z95 = 1.959963984540054
  for s, n in [(8, 10), (3, 7), (0.5, 4), (17.5, 40), (50, 100)]:
    assert stats.wilson_interval(s, n) == pytest.approx(_wilson_by_formula(s, n, z95), abs=1e-12), (s, n)
  z90 = 1.6448536269514722  # two-sided 90%: Φ⁻¹(0.95)
  assert stats.wilson_interval(8, 10, 0.90) == pytest.approx(_wilson_by_formula(8, 10, z90), abs=1e-12)
  lo90, hi90 = stats.wilson_interval(8, 10, 0.90)
  lo99, hi99 = stats.wilson_interval(8, 10, 0.99)
  assert lo99 < 0.4902 < lo90 < 0.8 < hi90 < 0.9433 < hi99


def test_wilson_interval_symmetry_and_empty():
  for s, n in [(0, 10), (3, 10), (2.5, 9), (12, 30)]:
    lo, hi = stats.wilson_interval(s, n)
    lo_c, hi_c = stats.wilson_interval(n - s, n)
    assert lo == pytest.approx(1 - hi_c, abs=1e-12) and hi == pytest.approx(1 - lo_c, abs=1e-12), (s, n)
    assert 0.0 < lo < s / n < hi < 1.0 or (s == 0 and lo == 0.0 and hi < 1.0)
  assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))


def test_paired_bootstrap_ci_matches_normal_theory():
  rng = np.random.default_rng(1)
  d = rng.normal(0.3, 2.0, size=3000)
  mean, lo, hi = stats.paired_bootstrap_ci(d, n_boot=10000, seed=0)
  assert mean == pytest.approx(d.mean(), abs=1e-12)
  assert lo < mean < hi
  half = 1.959963984540054 * d.std(ddof=1) / math.sqrt(len(d))
  assert lo == pytest.approx(mean - half, abs=0.05 * half)
  assert hi == pytest.approx(mean + half, abs=0.05 * half)
  # 90% is narrower, same centre.
  _, lo90, hi90 = stats.paired_bootstrap_ci(d, n_boot=10000, confidence=0.90, seed=0)
  assert lo < lo90 < mean < hi90 < hi
  assert hi90 - lo90 == pytest.approx(2 * 1.6448536269514722 * half / 1.959963984540054, rel=0.05)


def test_paired_bootstrap_ci_seed_constant_and_rows():
  rng = np.random.default_rng(2)
  d = rng.normal(size=200)
  assert stats.paired_bootstrap_ci(d, n_boot=2000, seed=7) == stats.paired_bootstrap_ci(d, n_boot=2000, seed=7)
  assert stats.paired_bootstrap_ci(d, n_boot=2000, seed=7) != stats.paired_bootstrap_ci(d, n_boot=2000, seed=8)
  mean, lo, hi = stats.paired_bootstrap_ci(np.full(50, 0.25), n_boot=500)
  assert mean == lo == hi == 0.25
  # k identical samples per example: same statistic and same resampled rows as the 1-D input.
  ci_1d = stats.paired_bootstrap_ci(d, n_boot=2000, seed=3)
  ci_2d = stats.paired_bootstrap_ci(np.repeat(d[:, None], 4, axis=1), n_boot=2000, seed=3)
  assert ci_2d == pytest.approx(ci_1d, abs=1e-12)
  # Rows are resampled whole: within-row noise that cancels in each row adds no width.
  noise = rng.normal(size=(200, 1)) * np.array([1.0, -1.0])
  ci_noisy = stats.paired_bootstrap_ci(d[:, None] + noise, n_boot=2000, seed=3)
  assert ci_noisy == pytest.approx(ci_1d, abs=1e-12)
  assert all(math.isnan(v) for v in stats.paired_bootstrap_ci(np.zeros(0)))


def test_paired_bootstrap_ci_chunking_invariant(monkeypatch):
  d = np.random.default_rng(4).exponential(size=300)
  full = stats.paired_bootstrap_ci(d, n_boot=1000, seed=5)
  monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ELEMS", 300 * 7)  # 143 chunks of ≤7 resamples
  assert stats.paired_bootstrap_ci(d, n_boot=1000, seed=5) == full
  monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ELEMS", 1)  # one resample at a time
  assert stats.paired_bootstrap_ci(d, n_boot=1000, seed=5) == full
  # Brute force: same uniform draws, one resample per row, percentiles by np.quantile.
  u = np.random.default_rng(5).random((1000, 300))
  means = d[(u * 300).astype(int)].mean(axis=1)
  assert full == pytest.approx((d.mean(), *np.quantile(means, [0.025, 0.975])), abs=1e-12)


def test_win_rate_stats_hand():
  a = [3.0, 1.0, 2.0, 5.0, 0.0, 4.0]
  b = [1.0, 1.0, 3.0, 2.0, 0.0, 4.5]
  # wins: (3>1), (5>2) = 2; ties: (1=1), (0=0) = 2; losses: (2<3), (4<4.5) = 2.
  m = stats.win_rate_stats(np.array(a), np.array(b))
  assert (m["wins"], m["ties"], m["losses"], m["n"]) == (2, 2, 2, 6)
  assert m["win_rate"] == pytest.approx((2 + 0.5 * 2) / 6)
  assert (m["win_rate_lo"], m["win_rate_hi"]) == pytest.approx(_wilson_by_formula(3.0, 6, 1.959963984540054))
  # Swapping sides mirrors the rate and the interval.
  r = stats.win_rate_stats(np.array(b), np.array(a))
  assert (r["wins"], r["ties"], r["losses"]) == (2, 2, 2)
  assert r["win_rate"] == pytest.approx(1 - m["win_rate"])
  assert r["win_rate_lo"] == pytest.approx(1 - m["win_rate_hi"])


def test_win_rate_stats_samples_per_prompt():
  # 3 prompts × 2 samples, compared sample j vs sample j: wins 3, ties 1, losses 2 over 6 comparisons.
  a = np.array([[1.0, 2.0], [0.0, 5.0], [3.0, 3.0]])
  b = np.array([[0.0, 2.0], [1.0, 4.0], [4.0, 1.0]])
  m = stats.win_rate_stats(a, b)
  assert (m["wins"], m["ties"], m["losses"], m["n"]) == (3, 1, 2, 3)
  rate = (3 + 0.5) / 6
  assert m["win_rate"] == pytest.approx(rate)
  # Wilson sample size is the 3 prompts, not the 6 correlated comparisons: wider than the 1-D reading.
  assert (m["win_rate_lo"], m["win_rate_hi"]) == pytest.approx(_wilson_by_formula(rate * 3, 3, 1.959963984540054))
  flat = stats.win_rate_stats(a.reshape(-1), b.reshape(-1))
  assert flat["win_rate"] == pytest.approx(rate) and flat["n"] == 6
  assert m["win_rate_hi"] - m["win_rate_lo"] > flat["win_rate_hi"] - flat["win_rate_lo"]
  with pytest.raises(ValueError):
    stats.win_rate_stats(a, b[:2])


def test_roc_auc_ci_is_the_bootstrap_of_roc_auc_by_hand():
  """The interval equals a loop over the same resamples computing the ROC-AUC by pair counting (ties ½)."""
  rng = np.random.default_rng(3)
  label = rng.random(40) < 0.4
  score = label * 0.8 + rng.normal(size=40)
  order = np.lexsort((label, score))
  shuffled = rng.permutation(40)
  assert stats.roc_auc_ci(score[shuffled], label[shuffled], n_boot=300) == stats.roc_auc_ci(score, label, n_boot=300)
  score, label = score[order], label[order]  # The function resamples the examples sorted by (score, label).
  draws = np.random.default_rng(0)
  by_hand = []
  for _ in range(300):
    idx = draws.integers(0, 40, 40)
    s, y = score[idx], label[idx]
    if y.all() or not y.any():
      continue
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    by_hand.append(np.mean(pairs))
  lo, hi = np.quantile(by_hand, [0.025, 0.975])
  ci = stats.roc_auc_ci(score, label, n_boot=300, seed=0)
  assert ci["roc_auc_lo"] == pytest.approx(lo) and ci["roc_auc_hi"] == pytest.approx(hi)
  assert ci["roc_auc_lo"] <= stats.roc_auc(score, label) <= ci["roc_auc_hi"]
  separated = stats.roc_auc_ci([0.0, 0.1, 0.9, 1.0], [0, 0, 1, 1], n_boot=50)
  assert separated == {"roc_auc_lo": 1.0, "roc_auc_hi": 1.0}


def test_paired_roc_auc_diff_by_hand_and_narrower_than_unpaired():
  """The difference equals the two AUCs' difference, its interval a loop over the same resamples with AUCs by pair
  counting; for two scorers that share most of their noise the paired interval is narrower than one scorer's own."""
  rng = np.random.default_rng(4)
  label = rng.random(60) < 0.3
  shared = rng.normal(size=60)
  a, b = label * 0.9 + shared + 0.2 * rng.normal(size=60), label * 0.6 + shared + 0.2 * rng.normal(size=60)
  got = stats.paired_roc_auc_diff(a, b, label, n_boot=300)
  assert got["roc_auc_diff"] == pytest.approx(stats.roc_auc(a, label) - stats.roc_auc(b, label))
  auc = lambda s, y: np.mean([(p > q) + 0.5 * (p == q) for p in s[y] for q in s[~y]])
  draws, by_hand = np.random.default_rng(0), []
  for _ in range(300):
    idx = draws.integers(0, 60, 60)
    if label[idx].all() or not label[idx].any():
      continue
    by_hand.append(auc(a[idx], label[idx]) - auc(b[idx], label[idx]))
  lo, hi = np.quantile(by_hand, [0.025, 0.975])
  assert got["roc_auc_diff_lo"] == pytest.approx(lo) and got["roc_auc_diff_hi"] == pytest.approx(hi)
  own = stats.roc_auc_ci(a, label, n_boot=300)
  assert got["roc_auc_diff_hi"] - got["roc_auc_diff_lo"] < own["roc_auc_hi"] - own["roc_auc_lo"]
  same = stats.paired_roc_auc_diff(a, a, label, n_boot=50)
  assert same == {"roc_auc_diff": 0.0, "roc_auc_diff_lo": 0.0, "roc_auc_diff_hi": 0.0}
  with pytest.raises(ValueError, match="one row per example"):
    stats.paired_roc_auc_diff(a, b[:-1], label)


def test_paired_roc_auc_diff_against_the_mean_of_several_scorers_by_hand():
  """score_b M×N: the difference from the mean AUC of its rows, on the full set and on each resample (a loop over the
  same draws, AUCs by pair counting); one row equals the 1-D call; a row of the wrong length is an error."""
  rng = np.random.default_rng(5)
  label = rng.random(50) < 0.4
  a = label + rng.normal(size=50)
  b_3xN = label * np.array([[0.2], [0.8], [1.5]]) + rng.normal(size=(3, 50))
  got = stats.paired_roc_auc_diff(a, b_3xN, label, n_boot=200)
  auc = lambda s, y: np.mean([(p > q) + 0.5 * (p == q) for p in s[y] for q in s[~y]])
  assert got["roc_auc_diff"] == pytest.approx(auc(a, label) - np.mean([auc(b, label) for b in b_3xN]))
  draws, by_hand = np.random.default_rng(0), []
  for _ in range(200):
    idx = draws.integers(0, 50, 50)
    if label[idx].all() or not label[idx].any():
      continue
    by_hand.append(auc(a[idx], label[idx]) - np.mean([auc(b[idx], label[idx]) for b in b_3xN]))
  lo, hi = np.quantile(by_hand, [0.025, 0.975])
  assert got["roc_auc_diff_lo"] == pytest.approx(lo) and got["roc_auc_diff_hi"] == pytest.approx(hi)
  assert stats.paired_roc_auc_diff(a, b_3xN[1:2], label, n_boot=50) == stats.paired_roc_auc_diff(a, b_3xN[1], label,
                                                                                                   n_boot=50)
  with pytest.raises(ValueError, match="one row per example"):
    stats.paired_roc_auc_diff(a, b_3xN[:, :-1], label)


def test_expected_calibration_error_by_hand():
  """Two bins used of 10: [0.1, 0.2) holds p = 0.1, 0.15 with labels 0, 1 (|0.5 − 0.125| = 0.375, weight 2/5);
  [0.9, 1] holds p = 0.9, 0.95, 1.0 with labels 1, 1, 0 (|2/3 − 0.95| = 0.2833…, weight 3/5)."""
  p = np.array([0.1, 0.15, 0.9, 0.95, 1.0])
  y = np.array([0, 1, 1, 1, 0])
  want = 2 / 5 * abs(0.5 - 0.125) + 3 / 5 * abs(2 / 3 - 0.95)
  assert stats.expected_calibration_error(p, y) == pytest.approx(want, abs=1e-12)
  assert stats.expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0
  ci = stats.expected_calibration_error_ci(p, y, n_boot=200)
  assert 0 <= ci["ece_lo"] <= ci["ece_hi"] <= 1
