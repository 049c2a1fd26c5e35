"""scripts/report_rl.py on a synthetic sweep folder: seeds pooled per prompt and LoRA − full equal perl_jax.stats on
arrays computed by hand; prompts that differ between seeds are a one-line error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from perl_jax import stats
from tests.conftest import ROOT

N = 24


def _point(folder, rng, shift, prompts, judge=True):
  folder.mkdir(parents=True)
  before = rng.normal(size=N)  # made-up per-prompt anchor rewards (k = 2 samples each)
  rows = [{"prompt": p, "before": ["b", "b"], "after": ["a", "a"], "reward_before": [b, b + 0.5],
           "reward_after": [b + shift + e, b + shift], "kl": [1.0 + e, 2.0]}
          for p, b, e in zip(prompts, before, rng.normal(size=N))]
  (folder / "eval_texts_10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / "summary.json").write_text(json.dumps({"eval": {"finished_fraction_after": 0.5}, "median_step_time_s": 3.0,
                                                   "compiled_memory_bytes": 2**30, "trainable_params": 7}))
  (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/reward_mean": 0.1 * s,
                                                            "train/kl_ref": 0.2 * s}) + "\n" for s in (1, 2)))
  if judge:
    j = rng.normal(size=(N, 2))
    (folder / "judge.json").write_text(json.dumps({"eval": {"10": {"per_prompt": {
        "judge_after": (j + shift).tolist(), "judge_before": j.tolist()}}},
        "samples": [{"step": 1, "reward_mean": 0.1, "judge_mean": 0.3}]}))
  mean = lambda key: np.array([np.mean(r[key]) for r in rows])
  return mean("reward_after"), mean("reward_before"), mean("kl")


def _sweep(tmp_path, prompts_of=lambda seed: [f"p{i}" for i in range(N)]):
  rng = np.random.default_rng(0)
  points, arrays = [], {}
  for seed in (0, 1):
    for mode, shift in (("lora", 0.3), ("full", 0.1)):
      name = f"seed={seed},tm4_{mode}_rloo"
      points.append({"index": len(points), "name": name, "config": "x.py:tm4_lora",
                     "overrides": {"seed": seed, "config": f"x.py:tm4_{mode}_rloo", "optim.lr": 0.1}})
      arrays[(mode, seed)] = _point(tmp_path / "sweep" / name, rng, shift, prompts_of(seed))
  (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"points": points}))
  return arrays


def _cli(tmp_path):
  return subprocess.run([sys.executable, "scripts/report_rl.py", "--workdir", str(tmp_path / "sweep"), "--out",
                         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))


def test_report_rl_pools_seeds_per_prompt(tmp_path):
  pytest.importorskip("matplotlib")
  arrays = _sweep(tmp_path)
  r = _cli(tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "out" / "rl_quality.json").read_text())
  lora = next(a for a in out["arms"] if a["mode"] == "lora")
  after_NxS = np.stack([arrays[("lora", s)][0] for s in (0, 1)], 1)
  before_NxS = np.stack([arrays[("lora", s)][1] for s in (0, 1)], 1)
  diff, lo, hi = stats.paired_bootstrap_ci((after_NxS - before_NxS).mean(1))  # a prompt's figure: its seeds' mean
  assert (lora["reward_diff"], lora["reward_diff_lo"], lora["reward_diff_hi"]) == pytest.approx((diff, lo, hi))
  assert lora["reward_diff_per_seed"] == pytest.approx([np.mean(after_NxS[:, s] - before_NxS[:, s]) for s in (0, 1)])
  assert lora["kl"] == pytest.approx(np.mean([arrays[("lora", s)][2] for s in (0, 1)]))
  assert lora["seeds"] == [0, 1] and lora["num_prompts"] == N and "judge_reward_diff" in lora
  pair = out["lora_vs_full"][0]
  full_NxS = np.stack([arrays[("full", s)][0] for s in (0, 1)], 1)
  assert pair["reward_diff"] == pytest.approx(np.mean(after_NxS - full_NxS))
  assert pair["win_rate"] == pytest.approx(stats.win_rate_stats(after_NxS, full_NxS)["win_rate"])
  md = (tmp_path / "out" / "rl_quality.md").read_text()
  assert f"{lora['reward_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in md and "LoRA, RLOO" in md
  assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_report_rl_refuses_seeds_on_other_prompts(tmp_path):
  _sweep(tmp_path, prompts_of=lambda seed: [f"p{i + seed}" for i in range(N)])
  r = _cli(tmp_path)
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "evaluated on different prompts" in r.stderr
