"""Reward models compared paired on the same examples; prints one JSON object.

  python scripts/compare_rms.py --runs runs/rm_quant/A --runs runs/rm_quant/B [--runs ...] \
      --data experiments/data/taskmaster4/reward.jsonl.gz [--split eval|train|all] [--out FILE] \
      [--members runs/ens/A --members runs/ens/B ... --ensemble mean|min|mean_minus_std --lam 1.0]
Every run scores the same examples (--split eval: the held-out split of the first run's config, which every run
must share: data.eval_fraction and data.seed). Per run: its metrics (ROC-AUC with its bootstrap interval for binary
data, pair accuracy with its Wilson interval for pairs). Each run after the first is compared with the first,
example by example: binary data by the ROC-AUC difference with its paired bootstrap interval
(stats.paired_roc_auc_diff), pairs by the accuracy difference with its paired bootstrap interval over pairs; binary
data also by the expected calibration error of sigmoid(score) (10 bins, bootstrap interval). Runs may differ in
anything else (LoRA vs full, seed, model.quant).
--members adds one more row: those runs as an ensemble, their scores combined per example by --ensemble
(perl_jax.ensemble.combine; the same reward RL's rl.reward_ensemble uses), compared with the first run like the rest,
and (binary data) with its average member: vs_members_roc_auc_diff = ROC-AUC(ensemble) − the members' mean ROC-AUC,
with its paired bootstrap interval (stats.paired_roc_auc_diff with the members' M×N scores).
"""
import json
import pathlib

import numpy as np
from absl import flags

from perl_jax import cli, data, ensemble, reward, runs, sharding, stats, trained
from perl_jax.errors import ConfigError

_RUNS = flags.DEFINE_multi_string("runs", [], "RM run folders (the first is the reference; repeat the flag).")
_DATA = flags.DEFINE_string("data", None, "Data file the runs are scored on.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train", "all"], "Which part of --data (the runs' seeded split).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here, with every example's scores.")
_MEMBERS = flags.DEFINE_multi_string("members", [], "RM run folders scored as one ensemble (an extra row).")
_ENSEMBLE = flags.DEFINE_enum("ensemble", "mean", list(ensemble.COMBINE), "How --members' scores combine.")
_LAM = flags.DEFINE_float("lam", 1.0, "λ of --ensemble mean_minus_std.")
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
      wilson_lo, wilson_hi = stats.wilson_interval(correct.sum(), len(correct))
      row = {"accuracy": float(correct.mean()), "accuracy_lo": wilson_lo, "accuracy_hi": wilson_hi}
      if i:
        d, lo, hi = stats.paired_bootstrap_ci(correct - (scores[0][:, 0] > scores[0][:, 1]))
        row.update(accuracy_diff=d, accuracy_diff_lo=lo, accuracy_diff_hi=hi)
    else:
      prob = 1 / (1 + np.exp(-s))
      row = {"roc_auc": stats.roc_auc(s, labels), **stats.roc_auc_ci(s, labels),
             "ece": stats.expected_calibration_error(prob, labels), **stats.expected_calibration_error_ci(prob, labels)}
      if i:
        row.update(stats.paired_roc_auc_diff(s, scores[0], labels))
    rows.append(row)
  return rows


def _run() -> dict:
  names = list(_RUNS.value)
  if len(names) + bool(_MEMBERS.value) < 2:
    raise ConfigError("--runs: name at least two RM run folders (the first is the reference), or one and --members")
  if len(_MEMBERS.value) == 1:
    raise ConfigError("--members: an ensemble needs at least two RM run folders")
  folders = names + [m for m in _MEMBERS.value if m not in names]
  configs = [runs.require_stage(r, "reward", "--runs / --members") for r in folders]
  first = configs[0].data
  for r, c in zip(folders[1:], configs[1:]):
    if (c.data.eval_fraction, c.data.seed, c.data.format) != (first.eval_fraction, first.seed, first.format):
      raise ConfigError(f"{r}: config fields 'data.eval_fraction', 'data.seed', 'data.format' differ from "
                        f"{folders[0]}'s: the runs would not score the same examples")
  fmt = first.format
  examples = data.read_examples(fmt, _DATA.value, skip_invalid=first.skip_invalid)
  if _SPLIT.value != "all":
    train_ex, eval_ex = data.split_train_eval(examples, first.eval_fraction, seed=first.seed)
    examples = eval_ex if _SPLIT.value == "eval" else train_ex
  by_folder, labels = {}, None
  for r in folders:
    s, labels = run_scores(trained.restore_reward(r), fmt, examples)
    by_folder[r] = np.asarray(s, np.float64)
  scores = [by_folder[r] for r in names]
  if _MEMBERS.value:
    members = np.stack([by_folder[m] for m in _MEMBERS.value])
    scores.append(np.asarray(ensemble.combine(members, _ENSEMBLE.value, _LAM.value), np.float64))
    names.append(f"ensemble {_ENSEMBLE.value} of {len(_MEMBERS.value)}: " + ", ".join(_MEMBERS.value))
  rows = compare(scores, labels, data.KINDS[fmt])
  if _MEMBERS.value and data.KINDS[fmt] != "pairwise":  # The ensemble against its average member, paired.
    d = stats.paired_roc_auc_diff(scores[-1], members, labels)
    rows[-1].update(members_roc_auc_mean=float(np.mean([stats.roc_auc(m, labels) for m in members])),
                    **{k.replace("roc_auc_diff", "vs_members_roc_auc_diff"): v for k, v in d.items()})
  out = {"data": _DATA.value, "split": _SPLIT.value, "num_examples": len(examples),
         "runs": [{"run": r, **row} for r, row in zip(names, rows)]}
  if _OUT.value:
    full = {**out, "scores": [s.tolist() for s in scores], "labels": None if labels is None else labels.tolist()}
    pathlib.Path(_OUT.value).write_text(json.dumps(full))
  return out


def main(_):
  print(json.dumps(cli.run_or_exit(_run), indent=1))


if __name__ == "__main__":
  cli.app_run(main)
