"""K LoRA reward-model runs averaged into ONE RM run folder (WARM-style weight averaging, issue #32):

  python scripts/average_rm.py --runs runs/rm_ensemble/A --runs runs/rm_ensemble/B [--runs ...] \
      --how exact|factor --out runs/rm_ensemble/average_exact
--how exact: the average of the members' updates, (1/K)·Σ_k s·A_k·B_k, as one adapter of rank K·r used with scale
1 (its config's lora.rank = lora.alpha = K·r); --how factor: the mean of the A's and of the B's, rank r (not the
updates' average: perl_jax.lora.factor_average, whose relative error per kernel is printed). Heads are averaged.
The folder is an ordinary RM run (run.json + one checkpoint of its trained params): compare_rms, eval_reward,
export and RL's reward_workdir take it like any other. Members must be LoRA RMs on one base model and tokenizer,
with one adapter shape and SFT start; prints one JSON line.
"""
import json
import pathlib

import numpy as np
from absl import flags

from perl_jax import checkpoint, cli, ensemble, lora, runs, trained
from perl_jax.errors import ConfigError

_RUNS = flags.DEFINE_multi_string("runs", [], "LoRA RM run folders to average (repeat the flag; at least two).")
_HOW = flags.DEFINE_enum("how", "exact", list(ensemble.AVERAGES), "exact: rank K·r average of the updates; "
                         "factor: mean of the A's and B's (rank r).")
_OUT = flags.DEFINE_string("out", None, "The new RM run folder (must not exist).")
flags.mark_flags_as_required(["out"])


def _run() -> dict:
  folders, out = _RUNS.value, pathlib.Path(_OUT.value)
  if len(folders) < 2:
    raise ConfigError("--runs: name at least two LoRA RM run folders to average")
  if out.exists():
    raise ConfigError(f"{out}: already exists (--out must name a new folder)")
  configs = []
  for f in folders:
    runs.require_run_folder(f, "--runs")
    configs.append(runs.require_stage(f, "reward", "--runs"))
  first = configs[0]
  for f, c in zip(folders[1:], configs[1:]):
    problem = ensemble.member_mismatch(first, c)
    if problem:
      raise ConfigError(f"{f}: cannot be averaged with {folders[0]}: {problem}")
  rm = trained.restore_reward(folders[0])
  members = [rm.trainable] + [runs.restore_trainable(f, rm.mesh, like=rm.trainable)[1] for f in folders[1:]]
  scale = lora.scale(rm.stage.lora_cfg)
  tree, out_scale = ensemble.average(members, scale, _HOW.value)
  config = first.copy_and_resolve_references()
  if _HOW.value == "exact":  # Rank K·r with α = K·r: scale 1, as lora.average's adapter is used.
    config.lora.rank = config.lora.alpha = len(members) * first.lora.rank
  assert abs(lora.scale(lora.config_from(config.lora)) - out_scale) < 1e-12
  errors = lora.factor_average_error([m["lora"] for m in members], scale)
  runs.write(out, config, {"averaged_from": [str(f) for f in folders], "average": _HOW.value,
                           "steps": [runs.latest_step(f) for f in folders]})
  with checkpoint.Checkpointer(out / runs.CHECKPOINTS, max_to_keep=None) as ckpt:
    ckpt.save(0, {"trainable": tree})
  return {"out": str(out), "how": _HOW.value, "members": len(members), "rank": config.lora.rank,
          "factor_average_relative_error": {"median": float(np.median(list(errors.values()))),
                                            "max": float(max(errors.values()))}}


def main(_):
  print(json.dumps(cli.run_or_exit(_run)))


if __name__ == "__main__":
  cli.app_run(main)
