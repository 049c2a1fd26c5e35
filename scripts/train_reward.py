"""Train a reward model (PERL LoRA or full) from an ml_collections config; re-running resumes.

  python scripts/train_reward.py --config experiments/rm/smollm2.py:tm4_lora --workdir runs/tm4 [--config.steps=50]
"""
from absl import flags
from ml_collections import config_flags

from perl_jax import cli, reward

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics.jsonl, tb/, checkpoints/, eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(_):
  cli.run_or_exit(reward.train, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.app_run(main)
