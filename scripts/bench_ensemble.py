"""Compiled peak memory of scoring with K reward models: one backbone + K LoRA members vs K full RMs (issue #32).

  python scripts/bench_ensemble.py --model 1b --ks 1,4,8 [--batch 8 --seq 512 --dtype bfloat16 --out rows.jsonl]
From shapes alone (nothing is allocated; 7B works on a CPU): perl_jax/bench/ensemble_scoring.py. Prints a table.
"""
import json

from absl import flags

from perl_jax import cli

_MODEL = flags.DEFINE_string("model", "1b", "A benchmark preset (tiny, smollm2-135m, 1b, 2b, 7b).")
_KS = flags.DEFINE_string("ks", "1,4,8", "Comma-separated ensemble sizes K.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences scored per call.")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype policy (benchmark.py's).")
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per row to this file.")


def _run() -> list[dict]:
  from perl_jax.bench import ensemble_scoring, rm_step
  rows = ensemble_scoring.measure(rm_step.preset(_MODEL.value), name=_MODEL.value,
                                  ks=[int(k) for k in _KS.value.split(",")], batch=_BATCH.value, seq=_SEQ.value,
                                  dtype=_DTYPE.value)
  if _OUT.value:
    with open(_OUT.value, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def main(_):
  from perl_jax.bench import ensemble_scoring
  print(ensemble_scoring.markdown(cli.run_or_exit(_run)))


if __name__ == "__main__":
  cli.app_run(main)
