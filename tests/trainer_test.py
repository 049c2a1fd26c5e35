"""The generic loop on a toy regression: the step against a hand-computed update, cadence, RNG use on resume,
and a non-finite loss stopping the run with the last good checkpoint intact."""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perl_jax import checkpoint, data, trainer


def _loss(trainable, frozen, batch, rng, noise=0.0):
  """Mean squared error of x·w + b against y, with optional rng-drawn input noise (like dropout)."""
  x = batch["x"] + noise * jax.random.normal(rng, batch["x"].shape)
  err = x @ trainable["w"] + frozen["b"] - batch["y"]
  loss = jnp.mean(err ** 2)
  return loss, {"loss": loss}


def test_train_step_equals_hand_sgd_and_leaves_frozen_alone():
  rng = np.random.default_rng(0)
  x, y, w, b = rng.normal(size=(8, 3)), rng.normal(size=8), rng.normal(size=3), 0.5
  opt = optax.sgd(0.1)
  state = trainer.new_state({"w": jnp.asarray(w)}, opt, jax.random.key(0))
  new, m = trainer.train_step(_loss, opt, state, {"b": jnp.asarray(b)}, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
  grad = 2 * x.T @ (x @ w + b - y) / 8
  np.testing.assert_allclose(np.asarray(new["trainable"]["w"]), w - 0.1 * grad, rtol=1e-5)
  assert int(new["step"]) == 1 and float(m["grad_norm"]) == pytest.approx(np.linalg.norm(grad), rel=1e-5)


def test_itstime():
  assert [s for s in range(1, 11) if trainer.itstime(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if trainer.itstime(s, 4, 10, last=False)] == [4, 8]
  assert [s for s in range(1, 11) if trainer.itstime(s, 0, 10, first=True)] == [1, 10]


def _setup(noise=0.0, poison_at=None, seed=0):
  rng = np.random.default_rng(seed)
  n = 32
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
  if poison_at is not None:  # Batch `poison_at` (1-based, unshuffled, 8 rows each) gets an inf target.
    y[(poison_at - 1) * 8] = np.inf
  opt = optax.adam(0.05)
  state = trainer.new_state({"w": jnp.zeros(3)}, opt, jax.random.key(1))
  frozen = {"b": jnp.zeros(())}
  loss = functools.partial(_loss, noise=noise)
  step = jax.jit(functools.partial(trainer.train_step, loss, opt), donate_argnums=(0,))
  config = ml_collections.ConfigDict(dict(steps=8, log_every=2, eval_every=4, checkpoint_every=2, keep_checkpoints=5))
  batches = lambda: data.BatchIterator({"x": x, "y": y}, 8, shuffle=poison_at is None, seed=3)
  kw = dict(frozen=frozen, step_fn=lambda s, f, b: step(s, f, {k: b[k] for k in ("x", "y")}),
            evaluate=lambda s, f: {"w0": float(s["trainable"]["w"][0])}, tokens_fn=lambda b: len(b["x"]))
  return config, state, batches, kw


def test_resume_with_rng_driven_loss_is_bit_identical(tmp_path):
  config, state, batches, kw = _setup(noise=0.3)
  full, full_eval = trainer.run(config, tmp_path / "a", state=state, batches=batches(), **kw)
  config, state, batches, kw = _setup(noise=0.3)
  trainer.run(config, tmp_path / "b", state=state, batches=batches(), stop_after=3, **kw)
  config, state, batches, kw = _setup(noise=0.3)
  resumed, resumed_eval = trainer.run(config, tmp_path / "b", state=state, batches=batches(), **kw)
  np.testing.assert_array_equal(np.asarray(full["trainable"]["w"]), np.asarray(resumed["trainable"]["w"]))
  assert full_eval == resumed_eval
  lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6, 8]
  assert [l["step"] for l in lines if "eval/w0" in l] == [4, 8]
  summary = json.loads((tmp_path / "a" / "summary.json").read_text())
  assert summary["eval"] == full_eval and summary["median_step_time_s"] > 0


def test_wall_time_of_a_resumed_run_counts_every_leg(tmp_path):
  """Each step sleeps 0.2 s: legs of 3 + 5 steps report ≥ 1.6 s, more than the second call took in all, and no
  more than the two calls took."""
  import time
  config, state, batches, kw = _setup()
  step_fn = kw["step_fn"]
  kw["step_fn"] = lambda s, f, b: (time.sleep(0.2), step_fn(s, f, b))[1]
  t0 = time.perf_counter()
  trainer.run(config, tmp_path, state=state, batches=batches(), stop_after=3, **kw)
  t1 = time.perf_counter()
  config, state, batches, _ = _setup()
  trainer.run(config, tmp_path, state=state, batches=batches(), **kw)
  t2 = time.perf_counter()
  wall = json.loads((tmp_path / "summary.json").read_text())["wall_s"]
  assert 8 * 0.2 <= wall <= t2 - t0 and wall > t2 - t1


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config, state, batches, kw = _setup(poison_at=3)
  with pytest.raises(trainer.TrainingError, match=r"^step 3: non-finite loss=inf.*last good checkpoint is step 2"):
    trainer.run(config, tmp_path / "run", state=state, batches=batches(), **kw)
  ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints")
  assert ckpt.all_steps() == [2]
  _, restored, _ = ckpt.restore(checkpoint.abstract_like(state))
  assert np.isfinite(np.asarray(restored["trainable"]["w"])).all()


def test_resume_after_a_kill_past_the_checkpoint_logs_each_step_once(tmp_path):
  """A kill after step 6's records but before its checkpoint (step 6's checkpoint removed): the resumed run redoes
  steps 5-6, and metrics.jsonl then equals an uninterrupted run's, each step once, in order."""
  import shutil
  keys = ("train/loss", "eval/w0")
  records = lambda d: [{k: v for k, v in json.loads(l).items() if k == "step" or k in keys}
                       for l in (d / "metrics.jsonl").read_text().splitlines()]
  config, state, batches, kw = _setup(noise=0.3)
  trainer.run(config, tmp_path / "a", state=state, batches=batches(), **kw)
  config, state, batches, kw = _setup(noise=0.3)
  trainer.run(config, tmp_path / "b", state=state, batches=batches(), stop_after=6, **kw)
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  assert [r["step"] for r in records(tmp_path / "b")] == [2, 4, 4, 6]
  config, state, batches, kw = _setup(noise=0.3)
  trainer.run(config, tmp_path / "b", state=state, batches=batches(), **kw)
  assert records(tmp_path / "b") == records(tmp_path / "a")
  assert [r["step"] for r in records(tmp_path / "a")] == [2, 4, 4, 6, 8, 8]


def test_check_batch_sizes_names_num_microbatches():
  from perl_jax import sharding
  from perl_jax.errors import ConfigError
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  c = ml_collections.ConfigDict({"data": {"batch_size": 16, "eval_batch_size": 8}, "num_microbatches": 4})
  trainer.check_batch_sizes(c, mesh)  # 16 rows = 2 devices x 4 microbatches x 2
  c.num_microbatches = 3
  with pytest.raises(ConfigError, match=r"field 'num_microbatches': 3 must be >= 1 and divide data.batch_size \(16\)"):
    trainer.check_batch_sizes(c, mesh)
