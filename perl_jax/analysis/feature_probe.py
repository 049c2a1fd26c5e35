"""Linear probe of the frozen backbone: does the RM's input representation already hold the label? Features are
the final hidden state at the last token (what the RM head reads) and the mean over response tokens; a logistic
regression (scikit-learn, an extra) is fit on a train part and scored on held-out examples. `across_splits` puts it
beside the bag-of-words baseline on the held-out splits of several seeds. CLI: scripts/probe_features.py.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import data, heads, models, probe, reward, stats
from perl_jax.analysis import bow_baseline


def features(model_cfg, base, arrays, batch_size: int = 16):
  """[N(,2), 2, D] float32: last-token and response-mean final hidden states, computed longest-first in the
  eval's length buckets (data.BatchIterator) and put back in row order."""
  @jax.jit
  def feats(ids, mask, resp):
    hidden = models.forward(model_cfg, base, ids, mask, return_logits=False).hidden.astype(jnp.float32)
    last = heads.last_token(hidden, mask)
    r = resp.astype(jnp.float32)[..., None]
    return jnp.stack([last, jnp.sum(hidden * r, 1) / jnp.maximum(jnp.sum(r, 1), 1.0)], axis=1)

  pairwise = arrays["input_ids"].ndim == 3
  flat = {k: v.reshape(-1, v.shape[-1]) for k, v in arrays.items() if k in ("input_ids", "attention_mask",
                                                                           "response_mask")}
  n = len(flat["input_ids"])
  it = data.pipeline.eval_iterator({**flat, "row": np.arange(n)}, batch_size, process_index=0, process_count=1)
  out = np.zeros((n, 2, model_cfg.hidden_size), np.float32)
  t0, done = time.time(), 0
  for batch in it:
    valid = batch["valid"].astype(bool)
    out[batch["row"][valid]] = np.asarray(feats(batch["input_ids"], batch["attention_mask"],
                                                batch["response_mask"]))[valid]
    done += int(valid.sum())
    print(f"features {done}/{n} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
  return out.reshape(-1, 2, 2, model_cfg.hidden_size) if pairwise else out


def probe_metrics(f_tr, y_tr, f_ev, y_ev, pairwise: bool) -> dict:
  """Logistic probe (C by 5-fold CV on train, standardised features) fit on train features, eval's metrics.
  Binary: f [N, D] with labels y; pairs: f [N, 2, D] (chosen, rejected), fit on the differences, both signs."""
  from sklearn import linear_model, preprocessing
  if pairwise:
    d = f_tr[:, 0] - f_tr[:, 1]
    x, y, fit_intercept = np.concatenate([d, -d]), np.r_[np.ones(len(d)), np.zeros(len(d))], False
  else:
    x, y, fit_intercept = f_tr, y_tr, True
  scaler = preprocessing.StandardScaler(with_mean=fit_intercept).fit(x)
  clf = linear_model.LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=5, max_iter=2000,
                                          fit_intercept=fit_intercept, scoring="roc_auc")
  clf.fit(scaler.transform(x), y)
  score = lambda f: clf.decision_function(scaler.transform(f))
  m = (stats.pairwise_metrics(score(f_ev[:, 0]), score(f_ev[:, 1])) if pairwise
       else stats.binary_metrics(score(f_ev), y_ev))
  return {"C": float(clf.C_[0]), **{k: v for k, v in m.items() if isinstance(v, float)}}


def across_splits(config, model_cfg, base, tokenizer, n_seeds: int):
  """Paired probe-vs-bag-of-words figures on the held-out splits of seeds 0..n_seeds-1."""
  dc = config.data
  examples = data.read_examples(dc.format, dc.path, skip_invalid=dc.skip_invalid)
  arrays, _ = reward.encode(dc.format, examples, tokenizer, dc)
  key = probe.digest({"v": "splits-1", "model": repr(config.model.to_dict()), "init_from": config.get("init_from", "")},
                     base, arrays)  # config.probe_cache memoises the forward (keyed by model, weights, examples).
  feats, _ = probe.cached_features(config.get("probe_cache", ""), key,
                                   lambda: (features(model_cfg, base, arrays), None))
  feats = feats[..., 0, :]  # The last token: what the RM head reads.
  pairwise, rows = arrays["input_ids"].ndim == 3, []
  metric = "accuracy" if pairwise else "roc_auc"
  row_of = {id(e): i for i, e in enumerate(examples)}  # split_train_eval returns the same objects.
  label = arrays.get("label")
  for seed in range(n_seeds):
    parts = bow_baseline.split(examples, dc.eval_fraction, seed)
    train, held = (np.array([row_of[id(e)] for e in part]) for part in parts)
    fit = probe_metrics(feats[train], None if pairwise else label[train], feats[held],
                        None if pairwise else label[held], pairwise)
    bow = bow_baseline.run(dc.format, [examples[i] for i in train], [examples[i] for i in held])
    rows.append({"split_seed": seed, "eval_examples": len(held), "max_len": dc.max_len,
                 f"probe_{metric}": fit[metric], "probe_C": fit["C"], f"bow_{metric}": bow[metric],
                 "bow_settings": bow["settings"]})
    print(json.dumps(rows[-1]), flush=True)
  p, b = (np.array([r[f"{k}_{metric}"] for r in rows]) for k in ("probe", "bow"))
  print(json.dumps({"split_seeds": list(range(n_seeds)), "max_len": dc.max_len, "format": dc.format,
                    f"probe_{metric}_mean": float(p.mean()), f"probe_{metric}_std": float(p.std()),
                    f"bow_{metric}_mean": float(b.mean()), f"bow_{metric}_std": float(b.std()),
                    "probe_minus_bow_mean": float((p - b).mean()), "probe_minus_bow_std": float((p - b).std()),
                    "probe_wins": int((p > b).sum())}))
