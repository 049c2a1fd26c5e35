"""An independent judge of RL responses: the bag-of-words reward model (bow_baseline: TF-IDF + logistic regression)
fitted on the RM data's training split, scoring the texts an RL run wrote.

A policy trained against a LoRA RM can raise that RM's score without getting better (over-optimisation). This
judge shares nothing with the RM but the training examples: no weights, no tokenizer, no gradient ever reached
it, and it reads the whole response rather than one token's hidden state. On Taskmaster-4's held-out split it is
also the strongest scorer this project has (ROC-AUC 0.743, experiments/results/rm_quality). Its weakness is the
other side of that: it sees words, not order, so a reply can please it with the right vocabulary.

Inputs are what RL writes: eval_texts_STEP.jsonl (rl.evaluate's `with_texts` rows: prompt, before [k], after [k],
reward_before, reward_after, kl) and samples.jsonl (step, prompt, response, reward per training sample).
"""
import re

import numpy as np

from perl_jax import data, stats
from perl_jax.analysis import bow_baseline
from perl_jax.rl import evaluate

# Chat markup the decoded prompts and responses carry and the judge's training texts do not.
_MARKUP = re.compile(r"<\|im_start\|>(?:system|user|assistant)?\n?|<\|im_end\|>\n?|<\|endoftext\|>")


def clean(text: str) -> str:
  """The text without chat markup (SmolLM2's ChatML tokens and role headers), whitespace runs as one space."""
  return " ".join(_MARKUP.sub(" ", text).split())


def fit(fmt: str, path, eval_fraction: float = 0.1, seed: int = 0, skip_invalid: bool = False):
  """(model, info): settings chosen by grouped CV inside the RM configs' training split (bow_baseline.select),
  refitted on all of it; info holds those settings and the judge's own held-out metrics with ROC-AUC's
  bootstrap interval (binary data)."""
  kind = data.KINDS[fmt]
  train, held_out = bow_baseline.split(data.read_examples(fmt, path, skip_invalid=skip_invalid), eval_fraction, seed)
  settings, _ = bow_baseline.select(kind, train, seed)
  model = bow_baseline.fit(kind, train, settings, seed)
  scores = model.scores(held_out)
  info = {"judge": "tfidf_logreg", "format": fmt, "data": str(path), "num_train": len(train),
          "settings": {"text": settings.text, "ngrams": settings.ngrams, "C": settings.C},
          "held_out": bow_baseline.metrics(kind, scores, held_out)}
  if kind == "binary":
    info["held_out"].update(stats.roc_auc_ci(scores, np.array([e["label"] > 0.5 for e in held_out])))
  return model, info


def score(model: bow_baseline.Model, prompts: list[str], responses: list[str]) -> np.ndarray:
  """The judge's score of each (prompt, response): the logit (binary data) or w·f(response) (pairwise data)."""
  texts = [clean(r) if model.settings.text == "response" else clean(p) + "\n" + clean(r)
           for p, r in zip(prompts, responses)]
  x = model.vectorizer.transform(texts)
  if model.kind == "binary":
    return model.classifier.decision_function(x)
  return np.asarray(x @ model.classifier.coef_[0]).ravel()


def judge_eval(model: bow_baseline.Model, rows: list[dict]) -> dict:
  """Paired figures under the judge for one eval_texts file: judge_reward_before / after, judge_reward_diff with
  its 95% paired-bootstrap interval, judge_win_rate with its Wilson interval (n = prompts); and the per-prompt
  scores (judge_before / judge_after, [N][k]) next to the RM's (reward_before / reward_after) and kl."""
  k = len(rows[0]["after"])
  prompts = [r["prompt"] for r in rows for _ in range(k)]
  after_NxK = score(model, prompts, [a for r in rows for a in r["after"]]).reshape(-1, k)
  before_NxK = score(model, prompts, [b for r in rows for b in r["before"]]).reshape(-1, k)
  out = evaluate.paired_stats("judge_", after_NxK, before_NxK)
  out["num_prompts"] = len(rows)
  out["per_prompt"] = {"judge_before": before_NxK.tolist(), "judge_after": after_NxK.tolist(),
                       **{key: [r[key] for r in rows] for key in ("reward_before", "reward_after", "kl")}}
  return out


def judge_samples(model: bow_baseline.Model, rows: list[dict]) -> list[dict]:
  """Per training step: the mean RM reward and the mean judge score of the samples written at that step."""
  steps = sorted({r["step"] for r in rows})
  j = score(model, [r["prompt"] for r in rows], [r["response"] for r in rows])
  by_step = np.array([r["step"] for r in rows])
  rm = np.array([r["reward"] for r in rows])
  return [{"step": s, "num_samples": int(np.sum(by_step == s)), "reward_mean": float(rm[by_step == s].mean()),
           "judge_mean": float(j[by_step == s].mean())} for s in steps]
