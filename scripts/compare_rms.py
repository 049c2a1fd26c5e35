"""Reward models compared paired on the same examples; prints one JSON object.

  python scripts/compare_rms.py --runs runs/rm_quant/A --runs runs/rm_quant/B [--runs ...] \
      --data experiments/data/taskmaster4/reward.jsonl.gz [--split eval|train|all] [--out FILE]
Every run scores the same examples (--split eval: the held-out split of the first run's config, which every run
must share: data.eval_fraction and data.seed). Per run: its metrics (ROC-AUC with its bootstrap interval for binary
data, pair accuracy for pairs). Each run after the first is compared with the first, example by example: binary data
by the ROC-AUC difference with its paired bootstrap interval (stats.paired_roc_auc_diff), pairs by the accuracy
difference with its paired bootstrap interval over pairs. Runs may differ in anything else (LoRA vs full, seed,
model.quant).
"""
import json
import pathlib

import numpy as np
from absl import flags

from perl_jax import cli, data, reward, runs, sharding, stats, trained
from perl_jax.errors import ConfigError

_RUNS = flags.DEFINE_multi_string("runs", [], "RM run folders (the first is the reference; repeat the flag).")
_DATA = flags.DEFINE_string("data", None, "Data file the runs are scored on.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train", "all"], "Which part of --data (the runs' seeded split).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here, with every example's scores.")
flags.mark_flags_as_required(["data"])


def run_scores(rm, fmt: str, examples: list):
  """(scores [N] or [N, 2], labels [N] or None) of one RM, in the examples' order (reward.score_all)."""
  arrays, _ = reward.encode(fmt, examples, rm.tokenizer, rm.config.data)
  batch_sh = {k: sharding.batch_sharding(rm.mesh, v.ndim) for k, v in arrays.items() if k in reward.MODEL_KEYS}
  score_fn = reward.jit_scores(rm.model_cfg, rm.stage, sharding.shardings(rm.trainable, rm.mesh),
                               sharding.shardings(rm.frozen, rm.mesh), batch_sh, sharding.replicated(rm.mesh))
  return reward.score_all(score_fn, rm.trainable, rm.frozen, arrays, rm.config.data.eval_batch_size, rm.mesh)


def compare(scores: list, labels, kind: str) -> list[dict]:
  """Per run: its metrics, and (after the first) its paired difference from the first run."""
  rows = []
  for i, s in enumerate(scores):
    if kind == "pairwise":
      correct = (s[:, 0] > s[:, 1]).astype(np.float64)
      row = {"accuracy": float(correct.mean())}
      if i:
        d, lo, hi = stats.paired_bootstrap_ci(correct - (scores[0][:, 0] > scores[0][:, 1]))
        row.update(accuracy_diff=d, accuracy_diff_lo=lo, accuracy_diff_hi=hi)
    else:
      row = {"roc_auc": stats.roc_auc(s, labels), **stats.roc_auc_ci(s, labels)}
      if i:
        row.update(stats.paired_roc_auc_diff(s, scores[0], labels))
    rows.append(row)
  return rows


def _run() -> dict:
  if len(_RUNS.value) < 2:
    raise ConfigError("--runs: name at least two RM run folders (the first is the reference)")
  configs = [runs.read_config(r) for r in _RUNS.value]
  first = configs[0].data
  for r, c in zip(_RUNS.value[1:], configs[1:]):
    if (c.data.eval_fraction, c.data.seed, c.data.format) != (first.eval_fraction, first.seed, first.format):
      raise ConfigError(f"{r}: config fields 'data.eval_fraction', 'data.seed', 'data.format' differ from "
                        f"{_RUNS.value[0]}'s: the runs would not score the same examples")
  fmt = first.format
  examples = data.read_examples(fmt, _DATA.value, skip_invalid=first.skip_invalid)
  if _SPLIT.value != "all":
    train_ex, eval_ex = data.split_train_eval(examples, first.eval_fraction, seed=first.seed)
    examples = eval_ex if _SPLIT.value == "eval" else train_ex
  scores, labels = [], None
  for r in _RUNS.value:
    s, labels = run_scores(trained.restore_reward(r), fmt, examples)
    scores.append(np.asarray(s, np.float64))
  rows = compare(scores, labels, data.KINDS[fmt])
  out = {"data": _DATA.value, "split": _SPLIT.value, "num_examples": len(examples),
         "runs": [{"run": r, **row} for r, row in zip(_RUNS.value, rows)]}
  if _OUT.value:
    full = {**out, "scores": [s.tolist() for s in scores], "labels": None if labels is None else labels.tolist()}
    pathlib.Path(_OUT.value).write_text(json.dumps(full))
  return out


def main(_):
  print(json.dumps(cli.run_or_exit(_run), indent=1))


if __name__ == "__main__":
  cli.app_run(main)
