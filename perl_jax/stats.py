"""Host-side evaluation metrics over gathered numpy arrays: ROC-AUC, balanced accuracy, pairwise accuracy,
and the uncertainty of comparisons: Wilson intervals, paired bootstrap intervals, win rates."""
import statistics

import numpy as np

# Most resampled indices held at once by paired_bootstrap_ci (uniforms, indices, gathered values: ~96 MiB).
_BOOTSTRAP_CHUNK_ELEMS = 1 << 22


def _average_ranks(x_N):
  """1-based ranks of `x_N`, tied values sharing their average rank."""
  order_N = np.argsort(x_N, kind="mergesort")
  sorted_N = x_N[order_N]
  starts = np.flatnonzero(np.r_[True, sorted_N[1:] != sorted_N[:-1]])
  ends = np.r_[starts[1:], len(x_N)]
  ranks_N = np.empty(len(x_N), np.float64)
  ranks_N[order_N] = np.repeat((starts + ends + 1) / 2, ends - starts)
  return ranks_N


def roc_auc(score_N, label_N):
  """ROC-AUC via Mann–Whitney U with average ranks for ties; nan if a class is absent."""
  score_N = np.asarray(score_N, np.float64).reshape(-1)
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  n_pos, n_neg = int(pos_N.sum()), int((~pos_N).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  rank_sum = _average_ranks(score_N)[pos_N].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(score_N, label_N, threshold=0.0):
  """Accuracy, balanced accuracy (½(TPR+TNR)), ROC-AUC and positive rate of score > threshold, and the BCE
  loss of the scores as logits."""
  score_N = np.asarray(score_N, np.float64).reshape(-1)
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  pred_N = score_N > threshold
  rates = [np.mean(pred_N[pos_N]) if pos_N.any() else np.nan,
           np.mean(~pred_N[~pos_N]) if (~pos_N).any() else np.nan]
  balanced = np.nan if np.isnan(rates).all() else np.nanmean(rates)
  return dict(
      accuracy=float(np.mean(pred_N == pos_N)) if len(pos_N) else float("nan"),
      balanced_accuracy=float(balanced),
      roc_auc=roc_auc(score_N, pos_N),
      positive_rate=float(np.mean(pred_N)) if len(pred_N) else float("nan"),
      loss=float(np.mean(np.logaddexp(0.0, score_N) - pos_N * score_N)) if len(pos_N) else float("nan"),
  )


def roc_auc_ci(score_N, label_N, n_boot=2000, confidence=0.95, seed=0) -> dict:
  """{"roc_auc_lo", "roc_auc_hi"}: the percentile bootstrap interval of the ROC-AUC. Each of `n_boot` resamples
  draws N examples with replacement (numpy default_rng(seed).integers) from the examples sorted by (score, label),
  so the interval does not depend on their order, and takes their ROC-AUC; resamples missing a class are skipped.
  nan when no resample has both classes."""
  score_N = np.asarray(score_N, np.float64).reshape(-1)
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  order_N = np.lexsort((pos_N, score_N))
  score_N, pos_N = score_N[order_N], pos_N[order_N]
  rng, n = np.random.default_rng(seed), len(score_N)
  aucs = [roc_auc(score_N[idx], pos_N[idx]) for idx in (rng.integers(0, n, n) for _ in range(n_boot if n else 0))]
  aucs = [a for a in aucs if not np.isnan(a)]
  if not aucs:
    return {"roc_auc_lo": float("nan"), "roc_auc_hi": float("nan")}
  lo, hi = np.quantile(aucs, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {"roc_auc_lo": float(lo), "roc_auc_hi": float(hi)}


def paired_roc_auc_diff(score_a_N, score_b_N, label_N, n_boot=2000, confidence=0.95, seed=0) -> dict:
  """ROC-AUC(a) − ROC-AUC(b) of two scorers of the SAME examples, with its paired percentile bootstrap interval:
  each resample draws N examples with replacement (numpy default_rng(seed).integers) and takes both AUCs on those
  rows; resamples missing a class are skipped. score_b may be M×N, M scorers of the same examples: then
  ROC-AUC(b) = (1/M)·Σ_m ROC-AUC(b_m), the mean AUC of its rows on each resample (an ensemble against its average
  member). {"roc_auc_diff", "roc_auc_diff_lo", "roc_auc_diff_hi"}."""
  a_N = np.asarray(score_a_N, np.float64).reshape(-1)
  b_MxN = np.atleast_2d(np.asarray(score_b_N, np.float64))
  pos_N = np.asarray(label_N).reshape(-1).astype(bool)
  if b_MxN.ndim != 2 or not len(a_N) == b_MxN.shape[1] == len(pos_N):
    raise ValueError(f"paired scores need one row per example: {len(a_N)}, {np.shape(score_b_N)} and {len(pos_N)} "
                     "labels")
  auc_b = lambda i: float(np.mean([roc_auc(b_N[i], pos_N[i]) for b_N in b_MxN]))
  rng, n = np.random.default_rng(seed), len(a_N)
  diffs = [roc_auc(a_N[i], pos_N[i]) - auc_b(i) for i in (rng.integers(0, n, n) for _ in range(n_boot if n else 0))]
  diffs = [d for d in diffs if not np.isnan(d)]
  lo, hi = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2]) if diffs else (np.nan, np.nan)
  return {"roc_auc_diff": float(roc_auc(a_N, pos_N) - auc_b(slice(None))), "roc_auc_diff_lo": float(lo),
          "roc_auc_diff_hi": float(hi)}


def expected_calibration_error(prob_N, label_N, bins: int = 10) -> float:
  """ECE = Σ_b (n_b / N)·|mean(label | b) − mean(prob | b)| over `bins` equal-width bins of the predicted
  probability of label 1 on [0, 1] (bin b holds b/bins ≤ p < (b+1)/bins; p = 1 falls in the last)."""
  prob_N = np.asarray(prob_N, np.float64).reshape(-1)
  label_N = np.asarray(label_N, np.float64).reshape(-1)
  bin_N = np.minimum((prob_N * bins).astype(int), bins - 1)
  total = 0.0
  for b in np.unique(bin_N):
    sel = bin_N == b
    total += sel.sum() / len(prob_N) * abs(label_N[sel].mean() - prob_N[sel].mean())
  return float(total)


def expected_calibration_error_ci(prob_N, label_N, bins: int = 10, n_boot=1000, confidence=0.95, seed=0) -> dict:
  """{"ece_lo", "ece_hi"}: the percentile bootstrap interval of expected_calibration_error (examples resampled with
  replacement, numpy default_rng(seed).integers)."""
  prob_N, label_N = np.asarray(prob_N).reshape(-1), np.asarray(label_N).reshape(-1)
  rng, n = np.random.default_rng(seed), len(prob_N)
  draws = (rng.integers(0, n, n) for _ in range(n_boot))
  eces = [expected_calibration_error(prob_N[i], label_N[i], bins) for i in draws]
  lo, hi = np.quantile(eces, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {"ece_lo": float(lo), "ece_hi": float(hi)}


def pairwise_metrics(r_chosen_N, r_rejected_N):
  """Preference accuracy (strict r_c > r_r), mean margin and Bradley–Terry loss."""
  margin_N = (np.asarray(r_chosen_N, np.float64).reshape(-1)
              - np.asarray(r_rejected_N, np.float64).reshape(-1))
  return dict(
      accuracy=float(np.mean(margin_N > 0)),
      mean_margin=float(np.mean(margin_N)),
      loss=float(np.mean(np.logaddexp(0.0, -margin_N))),
  )


def _two_sided_z(confidence):
  """The normal quantile z with P(|Z| <= z) = confidence (1.95996… for 0.95)."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _per_example(x, name):
  """`x` as a float64 [N, k] array: 1-D [N] is k = 1; 2-D [N, k] holds k samples of each of N examples."""
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N] or [N, k], got shape {x.shape}")
  return x


def wilson_interval(successes: float, n: int, confidence=0.95):
  """Wilson score interval for a binomial rate p̂ = s/n:

    (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),

  z the two-sided normal quantile of `confidence`. `successes` may be fractional (ties counted ½ in a win
  rate). Computed in the equal, cancellation-free form lo = p̂² / (p̂ + z²/2n + h), 1 − hi = q̂² / (q̂ + z²/2n
  + h), q̂ = 1 − p̂, h the ± term, so lo is exactly 0 at s = 0, hi exactly 1 at s = n, and
  lo(s) = 1 − hi(n − s). Returns (lo, hi); (nan, nan) when n = 0."""
  if n <= 0:
    return float("nan"), float("nan")
  z = _two_sided_z(confidence)
  p, z2 = successes / n, z * z
  half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
  lo = p * p / (p + z2 / (2 * n) + half)
  hi = 1 - (1 - p) ** 2 / ((1 - p) + z2 / (2 * n) + half)
  return float(lo), float(hi)


def paired_bootstrap_ci(diff_N, n_boot=10000, confidence=0.95, seed=0):
  """Mean of paired differences d_i = after_i − before_i and its percentile bootstrap interval.

  Each of `n_boot` resamples draws N examples with replacement (numpy default_rng(seed)) and takes
  mean(d*); (lo, hi) are the (1−c)/2 and (1+c)/2 quantiles of those means. A 2-D [N, k] input holds k
  samples per example: rows are resampled whole, the statistic is the overall mean (= mean of row means,
  rows being equal in size). Resamples are drawn in chunks of at most _BOOTSTRAP_CHUNK_ELEMS indices, from
  uniform doubles so the draws, hence the result, do not depend on the chunking. Returns (mean, lo, hi);
  all nan when N = 0."""
  row_N = _per_example(diff_N, "diff_N").mean(axis=1)
  n = len(row_N)
  if n == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  chunk = max(1, _BOOTSTRAP_CHUNK_ELEMS // n)
  means_B = np.empty(n_boot, np.float64)
  for start in range(0, n_boot, chunk):
    m = min(chunk, n_boot - start)
    idx_MN = np.minimum((rng.random((m, n)) * n).astype(np.int64), n - 1)
    means_B[start:start + m] = row_N[idx_MN].mean(axis=1)
  lo, hi = np.quantile(means_B, [(1 - confidence) / 2, (1 + confidence) / 2])
  return float(row_N.mean()), float(lo), float(hi)


def win_rate_stats(a_N, b_N, confidence=0.95):
  """Win rate of a over b on paired examples, P(a > b) + ½ P(a = b), with a Wilson interval.

  1-D [N] inputs: N comparisons, Wilson successes = wins + ½ ties out of n = N. 2-D [N, k] inputs (k samples
  per prompt): sample j of prompt i is compared with sample j of prompt i; the rate is over all N·k
  comparisons, but the Wilson sample size is n = N prompts (successes = rate·N), since comparisons within a
  prompt are correlated. With intra-prompt correlation ρ ≥ 0 the effective sample size lies between N and
  N·k, so n = N is the conservative (honest) choice; n = N·k would overstate the certainty.
  Returns dict(win_rate, win_rate_lo, win_rate_hi, wins, ties, losses, n); wins/ties/losses count
  comparisons (a NaN pair counts in none), n counts prompts."""
  a_Nk, b_Nk = _per_example(a_N, "a_N"), _per_example(b_N, "b_N")
  if a_Nk.shape != b_Nk.shape:
    raise ValueError(f"a_N and b_N must have the same shape, got {a_Nk.shape} and {b_Nk.shape}")
  wins, ties, losses = (int(np.sum(a_Nk > b_Nk)), int(np.sum(a_Nk == b_Nk)), int(np.sum(a_Nk < b_Nk)))
  total, n = wins + ties + losses, a_Nk.shape[0]
  rate = (wins + 0.5 * ties) / total if total else float("nan")
  lo, hi = wilson_interval(rate * n, n, confidence) if total else (float("nan"), float("nan"))
  return dict(win_rate=float(rate), win_rate_lo=lo, win_rate_hi=hi,
              wins=wins, ties=ties, losses=losses, n=n)
