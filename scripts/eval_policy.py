"""Evaluate an RL policy (a train_rl workdir) on held-out prompts; prints one JSON object.

  python scripts/eval_policy.py --workdir runs/rl_tm4_lora --data experiments/data/taskmaster4/dialogs.jsonl.gz \
      [--format FORMAT (data.PROMPT_FORMATS)] [--split eval|train|dev|all] [--max_prompts 128]
      [--samples_per_prompt 1] [--judge_workdir OTHER_RM] [--texts_out responses.jsonl]
JSON (docs/rl.md lists every key): reward_before (the SFT anchor) / reward_after (the policy) under the
run's RM, reward_diff with its 95% paired-bootstrap interval [reward_diff_lo, reward_diff_hi], win_rate (policy
over anchor on the same prompt, ties ½) with its 95% Wilson interval, kl (Σ_t log π − log π_ref per response,
policy samples) with its interval, finished fractions and response lengths; with --judge_workdir the same under a
second RM the policy never trained against (judge_*).
"""
import json

from absl import flags

from perl_jax import cli, data, runs, trained
from perl_jax.rl import evaluate, setup

_WORKDIR = flags.DEFINE_string("workdir", None, "RL run folder (run.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Prompt source: a prompt, messages or preference file (jsonl, Parquet, "
                            "Arrow) or one of the paper's data sets.")
_FORMAT = flags.DEFINE_enum("format", None, data.PROMPT_FORMATS, "Prompt format. Default: the run's data.format.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train", "dev", "all"],
                           "eval/train = the run's conversation split of --data; dev = training-split prompts the "
                           "run did not train on (after its first data.max_train_prompts); all = every prompt.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 128, "Evaluate the first N prompts (0 = all).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 1, "Samples of the policy and of the anchor per prompt.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Prompts per generation batch.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step. Default: the latest.")
_JUDGE = flags.DEFINE_string("judge_workdir", None, "A second RM run folder (same backbone) to judge with.")
_TEXTS_OUT = flags.DEFINE_string("texts_out", None, "Also write the responses, one JSON line per prompt (prompt, "
                                 "before, after, reward_before, reward_after, kl), e.g. for scripts/judge_texts.py.")
flags.mark_flags_as_required(["workdir", "data"])


def main(_):
  result, fmt = cli.run_or_exit(_evaluate)  # Progress on stderr; stdout holds the JSON alone.
  texts = result.pop("texts", None)
  if _TEXTS_OUT.value:
    with open(_TEXTS_OUT.value, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in texts)
  print(json.dumps({**result, "format": fmt, "split": _SPLIT.value}))


def _evaluate():
  if _SAMPLES.value < 1:
    raise data.DataError(_DATA.value, problem=f"--samples_per_prompt must be >= 1, got {_SAMPLES.value}")
  config = runs.read_config(_WORKDIR.value)  # The prompts are read before any model is loaded.
  fmt = _FORMAT.value or config.data.format
  prompts = evaluate.held_out_prompts(config, fmt, _DATA.value, _SPLIT.value)
  if _MAX_PROMPTS.value:
    prompts = prompts[:_MAX_PROMPTS.value]
  if not prompts:
    raise data.DataError(_DATA.value, problem=f"no prompts in split '{_SPLIT.value}'")
  policy = setup.restore(_WORKDIR.value, step=_STEP.value)
  judge = None
  if _JUDGE.value:
    judge = trained.restore_reward(_JUDGE.value, mesh=policy.mesh)
    evaluate.check_judge(policy.model_cfg, policy.tokenizer, judge, _JUDGE.value)
  return evaluate.evaluate(policy, prompts, batch_size=_BATCH_SIZE.value, judge=judge,
                           samples_per_prompt=_SAMPLES.value, with_texts=bool(_TEXTS_OUT.value)), fmt


if __name__ == "__main__":
  cli.app_run(main)
