"""Bag-of-words reward baseline (TF-IDF + logistic regression) on the RM configs' held-out split; one JSON object.

  python scripts/baseline_bow.py --data experiments/data/taskmaster4/reward.jsonl.gz --format taskmaster4
  python scripts/baseline_bow.py --data experiments/data/hh-rlhf-harmless/pairs.jsonl.gz --format hh_rlhf \
      --skip_invalid
  python scripts/baseline_bow.py --data TRAIN --eval EVAL --format hh_rlhf
  python scripts/baseline_bow.py --data experiments/data/taskmaster4/reward.jsonl.gz --format taskmaster4 \
      --split_seeds 10 [--split_by example]   # one row per held-out split, then mean and std over them
Without --eval, --data is split as the RM configs split it (data.split_train_eval, eval_fraction 0.1, seed 0).
Settings are picked on a dev split of the train part. Prints scripts/eval_reward.py's keys (binary: accuracy,
balanced_accuracy, roc_auc, positive_rate, loss; pairwise: accuracy, mean_margin, loss; num_examples, ...).
Needs scikit-learn (requirements-test.txt).
"""
import json
import math

from absl import flags

from perl_jax import cli, data
from perl_jax.analysis import bow_baseline
from perl_jax.errors import ConfigError

_DATA = flags.DEFINE_string("data", None, "Data file (.jsonl or .jsonl.gz): the train part, or all of it.")
_FORMAT = flags.DEFINE_enum("format", None, sorted(data.READERS), "Data format (a reader).")
_EVAL = flags.DEFINE_string("eval", None, "Held-out file. Default: the seeded split of --data.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.1, "Held-out fraction of --data (the RM configs' 0.1).")
_SEED = flags.DEFINE_integer("seed", 0, "Split seed (the RM configs' data.seed).")
_DEV_FRACTION = flags.DEFINE_float("dev_fraction", 0.0, "> 0: score on the RM configs' dev split of the train part "
                                   "(data.dev_fraction), for comparing recipes without the held-out split.")
_SPLIT_SEEDS = flags.DEFINE_integer("split_seeds", 0, "> 0: held-out splits of seeds 0..N-1 (not --seed): one JSON "
                                    "row each, then one with each metric's mean and std over them.")
_SPLIT_BY = flags.DEFINE_enum("split_by", "group", ["group", "example"], "--split_seeds: keep the turns of one "
                              "dialog together (group, the RM configs' split) or split examples (example: leaks).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "> 0: featurise only the tokens an RM of this max_len reads (its "
                                "truncation, decoded back to text); 0: the whole text.")
_MODEL = flags.DEFINE_string("model", None, "--max_len: the tokenizer's model (.gguf or HF folder); default: the "
                             "embedded SmolLM2.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "Skip invalid records (the HH config does).")
flags.mark_flags_as_required(["data", "format"])


def main(_):
  cli.run_or_exit(_run, info=False)


def _run():
  if _SPLIT_SEEDS.value > 0 and (_EVAL.value or _DEV_FRACTION.value):
    raise ConfigError("--split_seeds makes its own held-out splits of --data: drop --eval and --dev_fraction")
  bow_baseline._sklearn()
  examples = data.read_examples(_FORMAT.value, _DATA.value, skip_invalid=_SKIP_INVALID.value)
  if _MAX_LEN.value > 0:
    from perl_jax import models
    tok = models.load_tokenizer(_MODEL.value or models.default_model_path())
    examples = bow_baseline.as_seen(_FORMAT.value, examples, tok, _MAX_LEN.value)
  if _SPLIT_SEEDS.value > 0:
    rows, summary = bow_baseline.across_splits(_FORMAT.value, examples, _EVAL_FRACTION.value,
                                               range(_SPLIT_SEEDS.value), _SPLIT_BY.value)
    for row in rows + [summary]:
      print(_json(row), flush=True)
    return
  if _EVAL.value:
    train, held_out = examples, data.read_examples(_FORMAT.value, _EVAL.value, skip_invalid=_SKIP_INVALID.value)
    if _MAX_LEN.value > 0:
      held_out = bow_baseline.as_seen(_FORMAT.value, held_out, tok, _MAX_LEN.value)
  else:
    train, held_out = data.split_train_eval(examples, _EVAL_FRACTION.value, seed=_SEED.value)
  if _DEV_FRACTION.value:  # The same carve as reward.load_data's data.dev_fraction.
    train, held_out = data.split_train_eval(train, _DEV_FRACTION.value, seed=f"dev{_SEED.value}")
  if not train or not held_out:
    raise data.DataError(_DATA.value, problem="empty train or eval split")
  row = bow_baseline.run(_FORMAT.value, train, held_out)
  print(_json(row))


def _json(row: dict) -> str:
  return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})


if __name__ == "__main__":
  cli.app_run(main)
