"""The bag-of-words judge of RL texts (perl_jax/analysis/text_judge.py, scripts/judge_texts.py): a decoded response
with its chat markup scores what the plain reply scores through bow_baseline's own path; paired figures equal
perl_jax.stats on those scores; per-step means equal a by-hand grouping; the script writes judge.json per run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from perl_jax import data, stats
from perl_jax.analysis import text_judge
from tests.conftest import ROOT
from tests.helpers import head_lines

TM4 = ROOT / "experiments/data/taskmaster4/reward.jsonl.gz"


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
  pytest.importorskip("sklearn")
  path = head_lines(TM4, tmp_path_factory.mktemp("judge") / "tm4.jsonl", 300)
  return path, text_judge.fit("taskmaster4", path)


def _rows(examples, k=2):
  """eval_texts rows as rl.evaluate writes them: ChatML-decoded prompt and responses (before: the example's own
  reply, after: the next example's), made-up RM rewards and KL."""
  rows = []
  for i, e in enumerate(examples):
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in e["prompt"])
    nxt = examples[(i + 1) % len(examples)]["response"]
    rows.append({"prompt": prompt + "<|im_start|>assistant\n", "before": [e["response"] + "<|im_end|>"] * k,
                 "after": [nxt + "<|im_end|>"] * k, "reward_before": [0.1 * i] * k, "reward_after": [0.2] * k,
                 "kl": [1.0] * k})
  return rows


def test_clean_strips_chatml():
  assert text_judge.clean("<|im_start|>user\nA latte?<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>") == \
      "A latte? Sure."
  assert text_judge.clean("plain <|endoftext|>") == "plain"


def test_judge_eval_scores_like_bow_baseline_and_stats(judge):
  path, (model, info) = judge
  assert info["num_train"] > 200 and 0.0 <= info["held_out"]["roc_auc_lo"] <= info["held_out"]["roc_auc_hi"] <= 1.0
  examples = data.read_examples("taskmaster4", path)[:12]
  rows = _rows(examples)
  out = text_judge.judge_eval(model, rows)
  # The independent path: bow_baseline scores the plain records (no markup), as it does for its own metrics.
  before_N = model.scores(examples)
  after_N = model.scores([{**e, "response": examples[(i + 1) % 12]["response"]} for i, e in enumerate(examples)])
  np.testing.assert_allclose(np.asarray(out["per_prompt"]["judge_before"])[:, 0], before_N, atol=1e-9)
  np.testing.assert_allclose(np.asarray(out["per_prompt"]["judge_after"])[:, 1], after_N, atol=1e-9)
  diff, lo, hi = stats.paired_bootstrap_ci(after_N - before_N)
  w = stats.win_rate_stats(after_N, before_N)
  assert out["judge_reward_diff"] == pytest.approx(diff) and out["judge_reward_diff_lo"] == pytest.approx(lo)
  assert out["judge_win_rate"] == pytest.approx(w["win_rate"]) and out["num_prompts"] == 12
  assert out["per_prompt"]["reward_before"][3] == [0.1 * 3] * 2


def test_judge_samples_groups_by_step(judge):
  _, (model, _) = judge
  rows = [{"step": s, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "response": r, "reward": rw}
          for s, r, rw in [(1, "a large latte", 0.5), (1, "sorry, no", -1.0), (2, "your mocha is ready", 2.0)]]
  got = text_judge.judge_samples(model, rows)
  j = text_judge.score(model, [r["prompt"] for r in rows], [r["response"] for r in rows])
  assert [g["step"] for g in got] == [1, 2] and [g["num_samples"] for g in got] == [2, 1]
  assert got[0]["reward_mean"] == pytest.approx(-0.25) and got[1]["reward_mean"] == pytest.approx(2.0)
  assert got[0]["judge_mean"] == pytest.approx((j[0] + j[1]) / 2) and got[1]["judge_mean"] == pytest.approx(j[2])


def test_judge_texts_script_writes_judge_json(judge, tmp_path):
  path, _ = judge
  run, empty = tmp_path / "run", tmp_path / "empty"
  run.mkdir(), empty.mkdir()
  rows = _rows(data.read_examples("taskmaster4", path)[:8], k=1)
  (run / "eval_texts_10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (run / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "p", "response": "a latte", "reward": 1.0}) + "\n")
  cmd = [sys.executable, "scripts/judge_texts.py", "--data", str(path), "--sweep_dir", str(tmp_path)]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((run / "judge.json").read_text())
  assert set(out["eval"]) == {"10"} and out["eval"]["10"]["num_prompts"] == 8 and len(out["samples"]) == 1
  assert f"{run}: judge reward" in r.stdout and not (empty / "judge.json").exists()
  r = subprocess.run(cmd[:-2] + ["--runs", str(empty)], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no eval_texts_STEP.jsonl" in r.stderr
