"""scripts/report_overopt.py on a synthetic sweep folder: seeds pooled per prompt, each arm's judge reward minus the
reference arm's and the eval curves equal numpy / perl_jax.stats on arrays computed by hand; an eval without judge
rewards is a one-line error."""
import json
import subprocess
import sys

import numpy as np
import pytest

from perl_jax import stats
from tests.conftest import ROOT

N = 20


def _point(folder, rng, shift, judge=True):
  """Made-up per-prompt rewards (k = 2 samples) and a two-eval curve; returns the per-prompt means."""
  folder.mkdir(parents=True)
  before, noise = rng.normal(size=(N, 2)), rng.normal(size=(N, 2))
  rows = [{"prompt": f"p{i}", "reward_before": before[i].tolist(), "reward_after": (before[i] + 2 * shift).tolist(),
           "kl": [1.0, 3.0 + shift], **({"judge_before": (before[i] + 1).tolist(),
                                        "judge_after": (before[i] + 1 + shift + noise[i]).tolist()} if judge else {})}
          for i in range(N)]
  (folder / "eval_texts_8.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / "summary.json").write_text("{}")
  (folder / "metrics.jsonl").write_text("".join(json.dumps(
      {"step": s, "eval/kl": s * shift, "eval/reward_diff": 2 * shift, "eval/judge_reward_diff": shift - s}) + "\n"
      for s in (4, 8)) + json.dumps({"step": 5, "train/loss": 1.0}) + "\n")
  return (before + 1 + shift + noise).mean(1)


def _sweep(tmp_path, judge=True):
  rng, points, judged = np.random.default_rng(0), [], {}
  for seed in (0, 1):
    for arm, shift in (("single", 0.2), ("ensemble_mean", 0.5)):
      name = f"seed={seed},{arm}"
      points.append({"index": len(points), "name": name, "config": "x.py:tm4_lora_rloo", "overrides": {"seed": seed}})
      judged[(arm, seed)] = _point(tmp_path / "sweep" / name, rng, shift, judge)
  (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"points": points}))
  return judged


def _cli(tmp_path):
  return subprocess.run([sys.executable, "scripts/report_overopt.py", "--workdir", str(tmp_path / "sweep"), "--out",
                         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)


def test_report_overopt_pools_seeds_and_compares_arms_under_the_judge(tmp_path):
  pytest.importorskip("matplotlib")
  judged = _sweep(tmp_path)
  r = _cli(tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "out" / "overopt.json").read_text())
  rows = {row["arm"]: row for row in out["arms"]}
  assert set(rows) == {"single", "ensemble_mean"} and rows["single"]["seeds"] == [0, 1]
  ens = np.stack([judged[("ensemble_mean", s)] for s in (0, 1)], 1)
  one = np.stack([judged[("single", s)] for s in (0, 1)], 1)
  d, lo, hi = stats.paired_bootstrap_ci(ens - one)
  assert (rows["ensemble_mean"]["vs_reference_reward_diff"], rows["ensemble_mean"]["vs_reference_reward_diff_lo"],
          rows["ensemble_mean"]["vs_reference_reward_diff_hi"]) == pytest.approx((d, lo, hi))
  assert rows["ensemble_mean"]["vs_reference_win_rate"] == pytest.approx(stats.win_rate_stats(ens, one)["win_rate"])
  assert "vs_reference_reward_diff" not in rows["single"]
  assert rows["ensemble_mean"]["reward_diff"] == pytest.approx(1.0) and rows["single"]["kl"] == pytest.approx(2.1)
  np.testing.assert_allclose(out["curves"]["single"], [[4, 0.8, 0.4, -3.8], [8, 1.6, 0.4, -7.8]])
  assert (tmp_path / "out" / "overopt.png").stat().st_size > 0
  assert "| ensemble_mean | 0,1 |" in (tmp_path / "out" / "overopt.md").read_text()


def test_a_bag_of_words_judge_json_adds_its_columns_pooled_the_same_way(tmp_path):
  """judge_texts.py's judge.json in every point: bow_* figures from its per-prompt scores at the last eval step;
  one point without it and the report leaves the second judge out."""
  pytest.importorskip("matplotlib")
  _sweep(tmp_path)
  rng, bow = np.random.default_rng(1), {}
  for seed in (0, 1):
    for arm in ("single", "ensemble_mean"):
      after, before = rng.normal(size=(N, 2)), rng.normal(size=(N, 2))
      bow[(arm, seed)] = after.mean(1), before.mean(1)
      per_prompt = {"judge_after": after.tolist(), "judge_before": before.tolist()}
      (tmp_path / "sweep" / f"seed={seed},{arm}" / "judge.json").write_text(json.dumps(
          {"eval": {"4": {"per_prompt": {"judge_after": [[9.0]] * N, "judge_before": [[0.0]] * N}},
                    "8": {"per_prompt": per_prompt}}}))
  assert _cli(tmp_path).returncode == 0
  rows = {r["arm"]: r for r in json.loads((tmp_path / "out" / "overopt.json").read_text())["arms"]}
  stack = lambda arm, i: np.stack([bow[(arm, s)][i] for s in (0, 1)], 1)
  d, lo, hi = stats.paired_bootstrap_ci(stack("single", 0) - stack("single", 1))
  assert (rows["single"]["bow_reward_diff"], rows["single"]["bow_reward_diff_lo"],
          rows["single"]["bow_reward_diff_hi"]) == pytest.approx((d, lo, hi))
  d, lo, hi = stats.paired_bootstrap_ci(stack("ensemble_mean", 0) - stack("single", 0))
  ens = rows["ensemble_mean"]
  assert (ens["bow_vs_reference_reward_diff"], ens["bow_vs_reference_reward_diff_lo"],
          ens["bow_vs_reference_reward_diff_hi"]) == pytest.approx((d, lo, hi))
  assert "bag-of-words judge" in (tmp_path / "out" / "overopt.md").read_text()
  (tmp_path / "sweep" / "seed=1,single" / "judge.json").unlink()
  assert _cli(tmp_path).returncode == 0
  rows = json.loads((tmp_path / "out" / "overopt.json").read_text())["arms"]
  assert not any(k.startswith("bow_") for r in rows for k in r)
  assert "bag-of-words" not in (tmp_path / "out" / "overopt.md").read_text()


def test_an_eval_without_judge_rewards_is_one_line(tmp_path):
  _sweep(tmp_path, judge=False)
  r = _cli(tmp_path)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "judge_workdir" in r.stderr
