"""Judge RL runs' responses with an independent bag-of-words RM (perl_jax/analysis/text_judge.py); writes judge.json.

  python scripts/judge_texts.py --sweep_dir runs/rl_quality      # every point of a sweep (scripts/ablate.py)
  python scripts/judge_texts.py --runs runs/demo/rl [--runs OTHER] --data experiments/data/taskmaster4/reward.jsonl.gz
Fits TF-IDF + logistic regression on the RM data's training split (settings by grouped CV inside it; the RM
configs' split: eval_fraction 0.1, seed 0), then, for each run folder, scores its eval_texts_STEP.jsonl (written by
train_rl's eval or eval_policy --texts_out) and samples.jsonl (every training sample written) and writes
RUN/judge.json: the judge's settings and held-out metrics, per eval step the paired judge figures (judge_reward_diff
with its 95% bootstrap interval, judge_win_rate with its Wilson interval) with per-prompt scores, and per training
step the mean RM reward and judge score. Prints one line per run. Needs scikit-learn (requirements-test.txt).
"""
import json
import pathlib

from absl import flags

from perl_jax import cli, data
from perl_jax.analysis import bow_baseline, text_judge
from perl_jax.errors import ConfigError
from perl_jax.rl import evaluate

_RUNS = flags.DEFINE_multi_string("runs", [], "An RL run folder (repeat the flag for several; folders without eval "
                                  "texts are skipped).")
_SWEEP = flags.DEFINE_string("sweep_dir", None, "A sweep folder (scripts/ablate.py): every point folder in it.")
_DATA = flags.DEFINE_string("data", "experiments/data/taskmaster4/reward.jsonl.gz", "The judge's training data.")
_FORMAT = flags.DEFINE_enum("format", "taskmaster4", sorted(data.READERS), "Its format (a reader).")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "Skip invalid records (the HH configs do).")


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(_):
  cli.run_or_exit(_run, info=False)


def _run():
  bow_baseline._sklearn()
  folders = [pathlib.Path(r) for r in _RUNS.value]
  if _SWEEP.value:
    folders += sorted(f for f in pathlib.Path(_SWEEP.value).iterdir() if f.is_dir())
  if not folders:
    raise ConfigError("give --runs RUN (repeatable) or --sweep_dir SWEEP")
  texts = {f: evaluate.read_texts(f) for f in folders}
  todo = [f for f in folders if texts[f]]
  if not todo:
    raise ConfigError(f"no eval_texts_STEP.jsonl in any of {', '.join(map(str, folders))} (train_rl writes "
                      "them at its eval; eval_policy --texts_out)")
  model, info = text_judge.fit(_FORMAT.value, _DATA.value, skip_invalid=_SKIP_INVALID.value)
  print(json.dumps({"judge": info}), flush=True)
  for f in todo:
    out = {"judge": info, "eval": {}, "samples": []}
    for step, rows in texts[f].items():
      out["eval"][str(step)] = text_judge.judge_eval(model, rows)
    if (f / "samples.jsonl").exists():
      out["samples"] = text_judge.judge_samples(model, _read_jsonl(f / "samples.jsonl"))
    (f / "judge.json").write_text(json.dumps(out))
    last = out["eval"][max(out["eval"], key=int)]
    print(f"{f}: judge reward {last['judge_reward_before']:+.3f} -> {last['judge_reward_after']:+.3f} (difference "
          f"{last['judge_reward_diff']:+.3f} [{last['judge_reward_diff_lo']:+.3f}, {last['judge_reward_diff_hi']:+.3f}]"
          f") | win rate {last['judge_win_rate']:.2f} [{last['judge_win_rate_lo']:.2f}, "
          f"{last['judge_win_rate_hi']:.2f}] | {last['num_prompts']} prompts", flush=True)


if __name__ == "__main__":
  cli.app_run(main)
