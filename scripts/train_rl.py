"""RL of a policy (PERL LoRA or full) against a trained reward model, from an SFT run; re-running resumes.

  python scripts/train_rl.py --config experiments/rl/smollm2.py:tm4_lora --workdir runs/rl \
      --config.reward_workdir=runs/tm4_lora --config.sft_workdir=runs/sft_tm4_lora [--config.steps=20]
"""
from absl import flags
from ml_collections import config_flags

from perl_jax import cli
from perl_jax.rl import train as rl_train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics.jsonl, tb/, checkpoints/, samples.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(_):
  cli.run_or_exit(rl_train.train, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.app_run(main)
