"""Host-side evaluation metrics over gathered numpy arrays: ROC-AUC, balanced accuracy, pairwise accuracy."""
import numpy as np


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


def pairwise_metrics(r_chosen_N, r_rejected_N):
  """Preference accuracy (strict r_c > r_r), mean margin and Bradley–Terry loss."""
  margin_N = (np.asarray(r_chosen_N, np.float64).reshape(-1)
              - np.asarray(r_rejected_N, np.float64).reshape(-1))
  return dict(
      accuracy=float(np.mean(margin_N > 0)),
      mean_margin=float(np.mean(margin_N)),
      loss=float(np.mean(np.logaddexp(0.0, -margin_N))),
  )
