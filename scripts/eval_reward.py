"""Evaluate a trained reward model (a train_reward workdir) on a data file; prints one JSON object.

  python scripts/eval_reward.py --workdir runs/tm4 --data FILE [--format FORMAT (data.READERS)]
      [--split all|train|eval] [--batch_size 32] [--step N] [--model_path BASE]
pairwise data gives accuracy, mean_margin, loss; binary data accuracy, balanced_accuracy, roc_auc,
positive_rate, loss; both add num_examples, num_truncated and the checkpoint step.
"""
import json
import math

from absl import flags

from perl_jax import cli, data, reward, runs, trained

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder written by train_reward (run.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Data file (.jsonl / .jsonl.gz, Parquet, Arrow or a folder of them).")
_FORMAT = flags.DEFINE_enum("format", None, sorted(data.READERS), "Data format (a reader). Default: the run's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Eval batch size. Default: the run's data.eval_batch_size.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step. Default: the latest.")
_MODEL_PATH = flags.DEFINE_string("model_path", None, "Base model, if it moved since training.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "Skip (and log) invalid records instead of failing "
                                   "(default: as in training when --data is the training file).")
_SPLIT = flags.DEFINE_enum("split", "all", ["all", "train", "eval"],
                           "all = every example of --data; train/eval = the run's seeded split of it "
                           "(data.eval_fraction, data.seed), e.g. to score the held-out part of the training file.")
flags.mark_flags_as_required(["workdir", "data"])


def main(_):
  metrics, rm, fmt = cli.run_or_exit(_evaluate)  # Progress on stderr; stdout holds the JSON alone.
  metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
  print(json.dumps({**metrics, "step": rm.step, "format": fmt}))


def _evaluate():
  run = runs.read_config(_WORKDIR.value)
  fmt = _FORMAT.value or run.data.format
  skip = _SKIP_INVALID.value or (_DATA.value == run.data.path and run.data.skip_invalid)
  examples = data.read_examples(fmt, _DATA.value, skip_invalid=skip)
  if _SPLIT.value != "all":
    dc = run.data
    train_ex, eval_ex = data.split_train_eval(examples, dc.eval_fraction, seed=dc.seed)
    examples = eval_ex if _SPLIT.value == "eval" else train_ex
  rm = trained.restore_reward(_WORKDIR.value, step=_STEP.value, model_path=_MODEL_PATH.value)
  return reward.evaluate_examples(rm, fmt, examples, _BATCH_SIZE.value, where=_DATA.value), rm, fmt


if __name__ == "__main__":
  cli.app_run(main)
