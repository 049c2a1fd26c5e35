"""Ensembles and weight averages of the rm_ensemble members against their average member, from compare_rms's scores.

  python experiments/results/ensembles/quality_loo.py runs/rm_ensemble/compare.json > quality.json
compare.json is scripts/compare_rms.py --out with the five members among its runs (README.md's command). For each
member left out, the other four's mean score (ensemble.combine "mean", RL's rl.reward_ensemble=mean) is compared with
those four, paired on the same held-out examples: ROC-AUC(ensemble) − their mean ROC-AUC with its 95% paired
bootstrap interval (stats.paired_roc_auc_diff), and the ensemble's ECE beside the members' mean ECE. Then every run
that is not a member (the exact and per-factor weight averages of members 0-3, compare_rms's ensemble row) against
members 0-3 (every member but the last, the held-out judge) the same way.
"""
import json
import re
import sys

import numpy as np

from perl_jax import ensemble, stats


def _row(scores, members, labels, ece) -> dict:
  return {"roc_auc": stats.roc_auc(scores, labels),
          "members_roc_auc_mean": float(np.mean([stats.roc_auc(m, labels) for m in members])),
          **stats.paired_roc_auc_diff(scores, members, labels),
          "ece": ece(scores), "members_ece_mean": float(np.mean([ece(m) for m in members]))}


def main(path: str) -> dict:
  d = json.load(open(path))
  labels = np.asarray(d["labels"])
  by_name = {r["run"]: np.asarray(s) for r, s in zip(d["runs"], d["scores"])}
  names = sorted(n for n in by_name if re.fullmatch(r"[^ ,]*/member\d+", n))  # Run folders, not compare's row.
  ece = lambda s: stats.expected_calibration_error(1 / (1 + np.exp(-s)), labels)
  loo = []
  for out in names:
    members = np.stack([by_name[n] for n in names if n != out])
    loo.append({"left_out": out, **_row(np.asarray(ensemble.combine(members, "mean"), np.float64), members, labels,
                                        ece)})
  ensemble_members = np.stack([by_name[n] for n in names[:-1]])
  others = [{"run": n, **_row(s, ensemble_members, labels, ece)} for n, s in by_name.items() if n not in names]
  return {"num_examples": len(labels), "members": names, "leave_one_out": loo, "vs_members_0_to_3": others}


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1]), indent=1))
