"""Bag-of-words reward baseline: TF-IDF + logistic regression (scikit-learn, imported lazily: an extra).

Binary data (thumbs up/down): features of the text, label 0/1; the score is the logit w·x + b.
Pairwise data: the model sees the difference of the two responses' features, f(chosen) - f(rejected), labelled 1
(and its negation labelled 0, no intercept), so the score of one response is w·f(response) and the pair's margin
is w·(f(chosen) - f(rejected)). Settings (text, n-grams, C) are picked by grouped K-fold cross-validation inside
the train part (folds by a seeded hash of the first user turn, as data.split_train_eval groups), never on the
held-out split. Metrics are perl_jax.stats's, on the baseline's logit scores, so a row has the
keys of scripts/eval_reward.py.
"""
import dataclasses
import hashlib
import itertools
import json

import numpy as np

from perl_jax import data, stats
from perl_jax.errors import ConfigError

SKLEARN_ERROR = "the bag-of-words baseline needs scikit-learn: pip install -r requirements-test.txt"
FOLDS, FOLD_SEED = 5, 1


class MissingSklearn(ConfigError):
  """scikit-learn is not installed (an extra): a one-line error, as cli.run_or_exit prints it."""


def _sklearn():
  try:
    from sklearn import feature_extraction, linear_model
  except ImportError as e:
    raise MissingSklearn(SKLEARN_ERROR) from e
  return feature_extraction.text, linear_model


@dataclasses.dataclass(frozen=True)
class Settings:
  """Which text is featurised ("response" or "prompt+response"), TF-IDF n-gram range, inverse L2 strength C."""
  text: str = "response"
  ngrams: int = 1
  C: float = 1.0


def grid(kind: str) -> list[Settings]:
  """The settings tried on the dev split; pairwise prompts cancel in the difference, so only responses."""
  texts = ("response",) if kind == "pairwise" else ("response", "prompt+response")
  return [Settings(t, n, c) for t, n, c in itertools.product(texts, (1, 2), (1.0, 4.0, 16.0, 64.0))]


def prompt_text(example: dict) -> str:
  """The prompt's text: the turns joined, or what an RM reads of them (`as_seen`'s "prompt_seen")."""
  if "prompt_seen" in example:
    return example["prompt_seen"]
  return "\n".join(m["content"] for m in example["prompt"])


def texts(kind: str, examples, text: str) -> list[str] | tuple[list[str], list[str]]:
  """Binary: one text per example; pairwise: (chosen texts, rejected texts)."""
  with_prompt = lambda e, r: (prompt_text(e) + "\n" + r) if text == "prompt+response" else r
  if kind == "binary":
    return [with_prompt(e, e["response"]) for e in examples]
  return [with_prompt(e, e["chosen"]) for e in examples], [with_prompt(e, e["rejected"]) for e in examples]


@dataclasses.dataclass
class Model:
  """A fitted vectorizer + logistic regression; `scores` gives logits (binary [N], pairwise [N,2])."""
  kind: str
  settings: Settings
  vectorizer: object
  classifier: object

  def scores(self, examples) -> np.ndarray:
    t = texts(self.kind, examples, self.settings.text)
    if self.kind == "binary":
      return self.classifier.decision_function(self.vectorizer.transform(t))
    w = self.classifier.coef_[0]
    return np.stack([self.vectorizer.transform(side) @ w for side in t], axis=1)


def fit(kind: str, examples, settings: Settings, seed: int = 0) -> Model:
  """TF-IDF (sublinear tf, min_df 2) fitted on the train texts, then L2 logistic regression."""
  text_mod, linear_model = _sklearn()
  vec = text_mod.TfidfVectorizer(ngram_range=(1, settings.ngrams), sublinear_tf=True, min_df=2)
  t = texts(kind, examples, settings.text)
  if kind == "binary":
    x, y = vec.fit_transform(t), np.array([e["label"] > 0.5 for e in examples], int)
    clf = linear_model.LogisticRegression(C=settings.C, max_iter=2000, random_state=seed).fit(x, y)
    return Model(kind, settings, vec, clf)
  vec.fit(t[0] + t[1])
  diff = vec.transform(t[0]) - vec.transform(t[1])
  from scipy import sparse
  x, y = sparse.vstack([diff, -diff]), np.r_[np.ones(len(examples), int), np.zeros(len(examples), int)]
  clf = linear_model.LogisticRegression(C=settings.C, fit_intercept=False, max_iter=2000, random_state=seed).fit(x, y)
  return Model(kind, settings, vec, clf)


def metrics(kind: str, scores: np.ndarray, examples) -> dict:
  """perl_jax.stats's metrics of logit scores (binary [N] with labels, pairwise [N,2])."""
  if kind == "binary":
    return stats.binary_metrics(scores, np.array([e["label"] > 0.5 for e in examples]))
  return stats.pairwise_metrics(scores[:, 0], scores[:, 1])


def folds(examples, k: int = FOLDS, seed: int = FOLD_SEED) -> np.ndarray:
  """Fold index per example from a seeded hash of its first user turn (related examples share a fold)."""
  key = lambda e: hashlib.sha256(f"{seed}\x00{data.pipeline.first_user_turn(e)}".encode()).digest()
  return np.array([int.from_bytes(key(e)[:8], "big") % k for e in examples])


def select(kind: str, train, seed: int = 0) -> tuple[Settings, list[dict]]:
  """Best grid settings by mean K-fold metric inside `train` (ROC-AUC for binary, accuracy for pairs; then
  -loss); returns them and every setting's mean metrics."""
  fold = folds(train)
  primary = "roc_auc" if kind == "binary" else "accuracy"
  tried = []
  for s in grid(kind):
    per_fold = []
    for f in range(FOLDS):
      fit_part = [e for e, i in zip(train, fold) if i != f]
      dev = [e for e, i in zip(train, fold) if i == f]
      per_fold.append(metrics(kind, fit(kind, fit_part, s, seed).scores(dev), dev))
    tried.append({**dataclasses.asdict(s), **{k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}})
  best = max(tried, key=lambda m: (m[primary], -m["loss"]))
  return Settings(best["text"], best["ngrams"], best["C"]), tried


def run(fmt: str, train, eval_examples, seed: int = 0) -> dict:
  """Selects settings on a dev split of train, refits on all of train, scores eval: eval_reward's JSON keys."""
  kind = data.KINDS[fmt]
  settings, tried = select(kind, train, seed)
  model = fit(kind, train, settings, seed)
  m = metrics(kind, model.scores(eval_examples), eval_examples)
  return {**m, "num_examples": len(eval_examples), "num_truncated": 0, "format": fmt,
          "baseline": "tfidf_logreg", "settings": dataclasses.asdict(settings), "num_train": len(train),
          f"cv_{FOLDS}fold": next(t for t in tried if Settings(t["text"], t["ngrams"], t["C"]) == settings)}


def split(examples, eval_fraction: float, seed: int, by: str = "group"):
  """(train, held_out): data.split_train_eval keyed by the first user turn (by="group", the RM configs' split: the
  turns of one dialog stay on one side), or by the whole example (by="example": a plain seeded shuffle, which puts
  turns of one dialog on both sides)."""
  if by not in ("group", "example"):
    raise ValueError(f"split by 'group' or 'example', got '{by}'")
  key_fn = data.pipeline.first_user_turn if by == "group" else lambda e: json.dumps(e, sort_keys=True)
  return data.split_train_eval(examples, eval_fraction, seed=seed, key_fn=key_fn)


def across_splits(fmt: str, examples, eval_fraction: float, seeds, by: str = "group") -> tuple[list[dict], dict]:
  """`run` on the held-out split of each seed: (one row per seed, {metric_mean, metric_std} over seeds)."""
  rows = []
  for seed in seeds:
    train, held_out = split(examples, eval_fraction, seed, by)
    rows.append({**run(fmt, train, held_out), "split_seed": seed, "split_by": by})
  keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "split_seed"]
  summary = {"split_by": by, "split_seeds": list(seeds), "format": fmt, "baseline": "tfidf_logreg"}
  for k in keys:
    summary[f"{k}_mean"], summary[f"{k}_std"] = float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))
  return rows, summary


def as_seen(fmt: str, examples, tokenizer, max_len: int, min_prompt_tokens: int = 64) -> list[dict]:
  """The examples cut to the tokens an RM of this max_len reads (data.pipeline's truncation: prompt cut from the
  left, responses kept whole where they fit), decoded back to text: "prompt_seen" holds the kept prompt (chat
  markup included) and the responses are replaced by their kept part; "prompt" stays, so splits do not move."""
  kind = data.KINDS[fmt]
  encode = data.pipeline.encode_binary if kind == "binary" else data.pipeline.encode_pairwise
  arrays, _ = encode(examples, tokenizer, max_len, min_prompt_tokens=min_prompt_tokens)
  ids, attn, resp = (np.asarray(arrays[k]) for k in ("input_ids", "attention_mask", "response_mask"))
  if kind == "binary":
    ids, attn, resp = ids[:, None], attn[:, None], resp[:, None]
  out = []
  for e, ids_KT, attn_KT, resp_KT in zip(examples, ids, attn, resp):
    prompt = tokenizer.decode(ids_KT[0][(attn_KT[0] == 1) & (resp_KT[0] == 0)])
    replies = [tokenizer.decode(i[r == 1]) for i, r in zip(ids_KT, resp_KT)]
    seen = {"prompt_seen": prompt}
    seen.update({"response": replies[0]} if kind == "binary" else {"chosen": replies[0], "rejected": replies[1]})
    out.append({**e, **seen})
  return out
