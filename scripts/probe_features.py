"""Linear probe of the frozen backbone: does the RM's input representation already hold the label?

  python scripts/probe_features.py --config experiments/rm/smollm2.py:tm4_lora --config.data.dev_fraction=0.15 \
      --config.data.max_len=192
One forward of the frozen base (no adapters) over the config's train and eval examples (its dev split with
data.dev_fraction > 0); features = the final hidden state at the last token (what the RM head reads) and the
mean over response tokens; a logistic regression (scikit-learn, an extra; C picked by 5-fold CV on the train
part) is fit on train and scored on eval. Prints one JSON object: eval ROC-AUC (binary) or pair accuracy (pairs)
per feature. A probe near chance says the signal is not linearly readable from the frozen model, so the adapters
must create it; a probe well above chance says the head and optimisation are the bottleneck.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

from perl_jax import data, evaluation, models, reward

_CONFIG = config_flags.DEFINE_config_file("config", None, "An RM config (experiments/rm/*.py:ARG).")


def features(model_cfg, base, arrays, batch_size: int = 16):
  """[N(,2), 2, D] float32: last-token and response-mean final hidden states, computed longest-first in the
  eval's length buckets (data.BatchIterator) and put back in row order."""
  @jax.jit
  def feats(ids, mask, resp):
    hidden = models.forward(model_cfg, base, ids, mask, return_logits=False).hidden.astype(jnp.float32)
    last = reward.last_token(hidden, mask)
    r = resp.astype(jnp.float32)[..., None]
    return jnp.stack([last, jnp.sum(hidden * r, 1) / jnp.maximum(jnp.sum(r, 1), 1.0)], axis=1)

  pairwise = arrays["input_ids"].ndim == 3
  flat = {k: v.reshape(-1, v.shape[-1]) for k, v in arrays.items() if k in ("input_ids", "attention_mask",
                                                                           "response_mask")}
  n = len(flat["input_ids"])
  it = data.BatchIterator({**flat, "row": np.arange(n)}, batch_size, shuffle=False, num_epochs=1,
                          drop_remainder=False, buckets=data.pipeline.default_buckets(flat["input_ids"].shape[-1]),
                          group_by_length=True, process_index=0, process_count=1)
  out = np.zeros((n, 2, model_cfg.hidden_size), np.float32)
  t0, done = time.time(), 0
  for batch in it:
    valid = batch["valid"].astype(bool)
    out[batch["row"][valid]] = np.asarray(feats(batch["input_ids"], batch["attention_mask"],
                                                batch["response_mask"]))[valid]
    done += int(valid.sum())
    print(f"features {done}/{n} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
  return out.reshape(-1, 2, 2, model_cfg.hidden_size) if pairwise else out


def main(_):
  from sklearn import linear_model, preprocessing
  config = _CONFIG.value
  model_cfg, base, tokenizer = reward.load_backbone(config, None)  # The base, or the SFT model of init_from.
  train, held, info = reward.load_data(config, tokenizer)
  f_tr, f_ev = features(model_cfg, base, train), features(model_cfg, base, held)
  result = {"eval_split": info["eval_split"], "train_examples": info["train_examples"],
            "eval_examples": info["eval_examples"], "max_len": config.data.max_len}
  for i, name in enumerate(("last_token", "response_mean")):
    if train["input_ids"].ndim == 3:  # Pairs: features of chosen − rejected, both signs, no intercept.
      d_tr, d_ev = f_tr[:, 0, i] - f_tr[:, 1, i], f_ev[:, 0, i] - f_ev[:, 1, i]
      x, y, fit_intercept = np.concatenate([d_tr, -d_tr]), np.r_[np.ones(len(d_tr)), np.zeros(len(d_tr))], False
    else:
      x, y, fit_intercept = f_tr[:, i], train["label"], True
    scaler = preprocessing.StandardScaler(with_mean=fit_intercept).fit(x)
    probe = linear_model.LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1.0], cv=5, max_iter=2000,
                                              fit_intercept=fit_intercept, scoring="roc_auc")
    probe.fit(scaler.transform(x), y)
    if train["input_ids"].ndim == 3:
      score = lambda f: probe.decision_function(scaler.transform(f))
      m = evaluation.pairwise_metrics(score(f_ev[:, 0, i]), score(f_ev[:, 1, i]))
    else:
      m = evaluation.binary_metrics(probe.decision_function(scaler.transform(f_ev[:, i])), held["label"])
    result[name] = {"C": float(probe.C_[0]), **{k: v for k, v in m.items() if isinstance(v, float)}}
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
