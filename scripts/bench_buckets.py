"""Real tokens/s of the RM train step on fully padded batches vs length-grouped, bucket-cut batches (interleaved).

  python scripts/bench_buckets.py --config experiments/rm/smollm2.py:tm4_lora --batches 10 [--config.data.batch_size=8]
Both iterators walk the same training split; each step is timed after its shape's warm-up, alternating
plain / bucketed so machine load hits both alike. Prints one line per step and the ratio of real tokens/s.
"""
import functools
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from perl_jax import data, optimizer, reward, runs, sharding, trained, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "RM config (path[:arg]).")
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per arm.")
flags.mark_flags_as_required(["config"])


def main(_):
  config = _CONFIG.value
  rcfg = trained.reward_config(config)
  cfg, base, tok = runs.load_model(config.model)
  arrays, _, _ = reward.load_data(config, tok)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, optim = optimizer.make(config.optim, 100)
  state, state_sh = trainer.place(reward.new_state(config, rcfg, cfg, base, optim), mesh)
  base, base_sh = trainer.place(base, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in arrays.items() if k in reward.MODEL_KEYS}
  step = trainer.jit_step(functools.partial(reward.loss_fn, cfg, rcfg), optim, state_sh, base_sh, batch_sh, mesh)
  b = config.data.batch_size
  arms = {"plain": data.BatchIterator(arrays, b, seed=0),
          "bucketed": data.BatchIterator(arrays, b, seed=0, group_by_length=True,
                                         buckets=data.pipeline.default_buckets(config.data.max_len))}
  compiled, totals = {}, {name: [0, 0.0] for name in arms}
  for _ in range(_BATCHES.value):
    for name, it in arms.items():
      host = next(it)
      batch = sharding.global_batch({k: v for k, v in host.items() if k in reward.MODEL_KEYS}, mesh)
      t = batch["input_ids"].shape[-1]
      if t not in compiled:
        compiled[t] = step.lower(state, base, batch).compile()
        state, m = compiled[t](state, base, batch)
        jax.block_until_ready(m)
      t0 = time.perf_counter()
      state, m = compiled[t](state, base, batch)
      jax.block_until_ready(m)
      dt = time.perf_counter() - t0
      real = int(host["attention_mask"].sum())
      totals[name][0] += real
      totals[name][1] += dt
      print(f"{name:8s} T={t:4d} real tokens {real:6d} {dt:7.2f}s", flush=True)
  rate = {k: n / s for k, (n, s) in totals.items()}
  print(f"real tokens/s: plain {rate['plain']:.0f}, bucketed {rate['bucketed']:.0f}, "
        f"bucketed/plain {rate['bucketed'] / rate['plain']:.2f}")


if __name__ == "__main__":
  app.run(main)
