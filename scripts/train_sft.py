"""Supervised fine-tuning (PERL LoRA or full) on assistant turns from an ml_collections config; re-running resumes.

  python scripts/train_sft.py --config experiments/sft/smollm2.py:tm4_lora --workdir runs/sft_tm4 [--config.steps=50]
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from perl_jax import data, models, sft, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics.jsonl, tb/, checkpoints/, eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(_):
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("perl_jax").setLevel(logging.INFO)
  try:
    sft.train(_CONFIG.value, _WORKDIR.value)
  except (data.DataError, models.ConfigError, trainer.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
