"""Linear probing of frozen features: an L2 logistic regression fit by Newton's method (host-side, float64), its
regularisation picked by k-fold cross-validation, and the RM head it gives (LP-FT: Kumar et al. 2022, "Fine-Tuning
can Distort Pretrained Features": fit the head on the frozen backbone first, then fine-tune adapters and head).

Binary data: x = the last-token hidden state, y = the thumbs label, with an intercept. Pairs (Bradley-Terry):
x = h_chosen − h_rejected, y = 1, no intercept, so the fitted objective is the BT loss itself.
"""
import hashlib
import logging
import os
import pathlib
import tempfile

import jax
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0)  # Inverse L2 strengths tried by cross-validation (sklearn's C).


def weighted_log_loss(z_N, y_N, s_N) -> float:
  """(1/N) Σ_i −s_i [y_i log σ(z_i) + (1 − y_i) log σ(−z_i)]: with s_i = w₊ for positives, losses.bce's loss."""
  return float(np.mean(s_N * (y_N * np.logaddexp(0.0, -z_N) + (1 - y_N) * np.logaddexp(0.0, z_N))))


def logistic_fit(x_NxD, y_N, *, c: float, s_N=None, fit_intercept: bool = True, iters: int = 100,
                 tol: float = 1e-10) -> tuple[np.ndarray, float]:
  """argmin_{w,b}  C Σ_i s_i ℓ(y_i, x_i·w + b) + ½‖w‖²  (sklearn LogisticRegression's objective, with
  per-example weights s_i; ℓ = the log loss; b unpenalised, 0 without intercept) by damped Newton steps."""
  x = np.asarray(x_NxD, np.float64)
  y = np.asarray(y_N, np.float64)
  s = np.ones_like(y) if s_N is None else np.asarray(s_N, np.float64)
  n, d = x.shape
  xa = np.concatenate([x, np.ones((n, 1))], 1) if fit_intercept else x
  penalty = np.r_[np.ones(d), np.zeros(xa.shape[1] - d)]
  theta = np.zeros(xa.shape[1])

  def objective(t):
    z = xa @ t
    return c * np.sum(s * (y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z))) + 0.5 * np.sum(penalty * t * t)

  f = objective(theta)
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(xa @ theta)))
    grad = c * xa.T @ (s * (p - y)) + penalty * theta
    hess = c * (xa.T * (s * p * (1 - p))) @ xa + np.diag(penalty + 1e-12)
    step = np.linalg.solve(hess, grad)
    t = 1.0
    while t > 1e-8:  # Backtracking: Newton's full step can overshoot on nearly separable data.
      f_new = objective(theta - t * step)
      if f_new <= f - 1e-4 * t * grad @ step:
        break
      t *= 0.5
    theta, f_old, f = theta - t * step, f, f_new
    if f_old - f <= tol * max(1.0, abs(f)):
      break
  return (theta[:d], float(theta[d])) if fit_intercept else (theta, 0.0)


def cross_validate(x_NxD, y_N, *, s_N=None, fit_intercept: bool = True, cs=DEFAULT_CS, folds: int = 5,
                   seed: int = 0) -> tuple[float, dict]:
  """The C of `cs` with the lowest mean held-out weighted log loss over `folds` seeded folds; (C, {C: loss})."""
  n = len(y_N)
  s = np.ones(n) if s_N is None else np.asarray(s_N, np.float64)
  fold_N = np.random.default_rng(seed).permutation(n) % folds
  cv = {}
  for c in cs:
    losses = []
    for k in range(folds):
      tr, va = fold_N != k, fold_N == k
      if not va.any() or not tr.any():  # Fewer examples than folds: that fold is empty.
        continue
      w, b = logistic_fit(x_NxD[tr], y_N[tr], c=c, s_N=s[tr], fit_intercept=fit_intercept)
      losses.append(weighted_log_loss(x_NxD[va] @ w + b, y_N[va], s[va]))
    cv[float(c)] = float(np.mean(losses))
  return min(cv, key=cv.get), cv


def fit_head(features, labels=None, *, pos_weight: float = 1.0, cs=DEFAULT_CS, seed: int = 0) -> tuple[dict, dict]:
  """The RM head {"kernel": [D,1], "bias": [1]} fit on frozen last-token features: [N,D] with 0/1 labels (BCE,
  positives weighted pos_weight), or [N,2,D] (chosen, rejected) pairs (BT). Features are standardised for the
  fit (z = (x − μ)/σ, μ = 0 for pairs) and the scaler is folded back: kernel = w/σ, bias = b − Σ w μ/σ.
  Returns (head, info: the chosen C, the CV losses and the train loss of the fitted head)."""
  x = np.asarray(features, np.float64)
  pairwise = x.ndim == 3
  if pairwise:
    x, y, s = x[:, 0] - x[:, 1], np.ones(len(x)), np.ones(len(x))
  else:
    y = np.asarray(labels, np.float64)
    s = np.where(y > 0.5, pos_weight, 1.0)
  mu = np.zeros(x.shape[1]) if pairwise else x.mean(0)
  sigma = np.sqrt(np.mean((x - mu) ** 2, 0)) + 1e-6
  z = (x - mu) / sigma
  c, cv = cross_validate(z, y, s_N=s, fit_intercept=not pairwise, cs=cs, seed=seed)
  w, b = logistic_fit(z, y, c=c, s_N=s, fit_intercept=not pairwise)
  kernel, bias = w / sigma, b - float(np.sum(w * mu / sigma))
  head = {"kernel": kernel.astype(np.float32)[:, None], "bias": np.array([bias], np.float32)}
  info = {"C": c, "cv_loss": cv, "train_loss": weighted_log_loss(z @ w + b, y, s), "examples": len(y)}
  return head, info


def digest(*trees) -> str:
  """sha256 over the leaves (dtype, shape, bytes) and structure of pytrees of host-readable arrays and scalars."""
  h = hashlib.sha256()
  for tree in trees:
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
      a = np.asarray(leaf)
      h.update(f"{a.dtype}{a.shape}".encode())
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def cached_features(cache_dir: str, key: str, compute):
  """compute() -> (features, labels or None), memoised as `cache_dir/key.npz` (written atomically); no cache when
  cache_dir is empty; cached features are float32 whatever the compute dtype. The key must name everything the
  features depend on (probe_key in reward.py)."""
  if not cache_dir:
    return compute()
  path = pathlib.Path(cache_dir) / f"{key}.npz"
  if path.is_file():
    with np.load(path) as f:
      log.info("LP-FT probe features read from the cache %s", path)
      return f["features"], (f["labels"] if "labels" in f else None)
  feats, labels = compute()
  feats = np.asarray(feats, np.float32)  # npz has no bfloat16: bf16 features would come back as raw bytes.
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, features=feats, **({} if labels is None else {"labels": labels}))
  os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared sweep folder wants it readable.
  os.replace(tmp, path)
  return feats, labels
