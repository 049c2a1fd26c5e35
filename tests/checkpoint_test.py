"""Tests for perl_jax.checkpoint: bitwise round trips, pruning, resume, atomicity, resharding."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orbax.checkpoint import path as ocp_path

from perl_jax import checkpoint as ckpt

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _bits(x):
  return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def assert_trees_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(_bits(x), _bits(y))


def make_state(seed=0):
  """LoRA-like params (f32 + bf16, one NaN), adamw state after one step, raw key data."""
  k = jax.random.key(seed)
  k1, k2, k3 = jax.random.split(k, 3)
  params = {
    "lora_a": jax.random.normal(k1, (8, 4), jnp.float32),
    "lora_b": jax.random.normal(k2, (4, 8), jnp.bfloat16),
    "head": jnp.array([1.0, jnp.nan, -jnp.inf, 3.0], jnp.float32),
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "rng": ckpt.key_to_data(k3)}


def step_dirs(workdir):
  return sorted(p.name for p in pathlib.Path(workdir).iterdir() if not p.name.startswith("_"))


def test_key_helpers_round_trip_typed_keys():
  key = jax.random.key(42)
  data = ckpt.key_to_data(key)
  assert data.dtype == jnp.uint32
  back = ckpt.data_to_key(data)
  assert jax.dtypes.issubdtype(back.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.uniform(key, (3,)), jax.random.uniform(back, (3,)))
  legacy = jax.random.PRNGKey(1)
  assert ckpt.key_to_data(legacy) is legacy


def test_typed_keys_in_state_round_trip(tmp_path):
  state = {"key": jax.random.key(3), "w": jnp.ones((2, 2))}
  with ckpt.Checkpointer(tmp_path) as c:
    c.save(1, state)
    _, restored, _ = c.restore(ckpt.abstract_like(state))
  assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))


def test_round_trip_bitwise_with_optax_state_and_extra(tmp_path):
  state = make_state()
  extra = {"data": {"epoch": 1, "index": 37}, "config": {"lr": 1e-3, "rank": 4}, "metrics": {"reward": 0.25}}
  with ckpt.Checkpointer(tmp_path) as c:
    assert c.latest_step() is None
    assert c.save(5, state, extra)
    step, restored, restored_extra = c.restore(ckpt.abstract_like(state))
    assert step == 5
    assert_trees_bitwise_equal(restored, state)
    assert restored_extra == extra
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert np.isnan(np.asarray(restored["params"]["head"][1]))
    key = ckpt.data_to_key(restored["rng"])
    np.testing.assert_array_equal(
      jax.random.uniform(key, (2,)), jax.random.uniform(ckpt.data_to_key(state["rng"]), (2,))
    )
    # Concrete arrays as restore target.
    zeros = jax.tree.map(jnp.zeros_like, state)
    _, restored2, _ = c.restore(zeros, step=5)
    assert_trees_bitwise_equal(restored2, state)


def test_max_to_keep_prunes_and_resume_picks_latest(tmp_path):
  with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
    for s in range(1, 5):
      assert c.save(s, make_state(seed=s), {"step": s})
    assert c.all_steps() == [3, 4]
  assert step_dirs(tmp_path) == ["3", "4"]

  target = ckpt.abstract_like(make_state())
  with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
    assert c.latest_step() == 4
    step, state, extra = c.restore(target)
    assert (step, extra) == (4, {"step": 4})
    assert_trees_bitwise_equal(state, make_state(seed=4))
    _, state3, extra3 = c.restore(target, step=3)
    assert extra3 == {"step": 3}
    assert_trees_bitwise_equal(state3, make_state(seed=3))
    with pytest.raises(FileNotFoundError):
      c.restore(target, step=1)


def test_empty_workdir_every_new_step_saves_and_no_overwrite(tmp_path):
  with ckpt.Checkpointer(tmp_path, max_to_keep=None) as c:
    with pytest.raises(FileNotFoundError):
      c.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    x = {"x": jnp.arange(2.0)}
    assert c.save(1, x)
    assert c.save(2, x)
    assert c.save(3, x)
    assert not c.save(3, x), "a step not newer than the latest is skipped"
    with pytest.raises(ValueError, match="already exists"):
      c.save(2, x, force=True)
    assert c.save(5, x, force=True)
    assert c.all_steps() == [1, 2, 3, 5]


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  workdir = pathlib.Path(tmp_path)
  good = make_state(seed=1)
  target = ckpt.abstract_like(good)
  c = ckpt.Checkpointer(workdir, max_to_keep=1)
  c.save(1, good, {"step": 1})

  # Let item-level commits through, crash right before the step directory
  # is renamed into place, i.e. after all data of step 2 is on disk.
  orig_finalize = ocp_path.atomicity.AtomicRenameTemporaryPath.finalize
  written = []

  async def crashing_finalize(self):
    if pathlib.Path(self.get_final()).parent == workdir:
      written.extend(p for p in pathlib.Path(self.get()).rglob("*") if p.is_file())
      raise RuntimeError("simulated crash during save")
    return await orig_finalize(self)

  monkeypatch.setattr(ocp_path.atomicity.AtomicRenameTemporaryPath, "finalize", crashing_finalize)
  with pytest.raises(RuntimeError, match="simulated crash"):
    c.save(2, make_state(seed=2), {"step": 2})
  monkeypatch.undo()

  assert len(written) > 3, "the crash should happen after array data was written"
  assert (workdir / ("2" + TMP_SUFFIX)).is_dir()
  assert not (workdir / "2").exists()
  assert (workdir / "1").is_dir(), "max_to_keep must not prune before the new step commits"
  assert c.latest_step() == 1
  step, state, extra = c.restore(target)
  assert (step, extra) == (1, {"step": 1})
  assert_trees_bitwise_equal(state, good)
  c.close()

  # A restarted job sees only the good step, and its first save cleans up.
  with ckpt.Checkpointer(workdir, max_to_keep=1) as c2:
    assert c2.latest_step() == 1
    step, state, _ = c2.restore(target)
    assert step == 1
    assert_trees_bitwise_equal(state, good)
    assert c2.save(2, make_state(seed=2), {"step": 2})
    assert c2.all_steps() == [2]
  assert step_dirs(workdir) == ["2"]


def test_leftover_tmp_dir_from_killed_process_is_ignored_and_removed(tmp_path):
  workdir = pathlib.Path(tmp_path)
  good = {"w": jnp.arange(6.0).reshape(2, 3)}
  with ckpt.Checkpointer(workdir) as c:
    c.save(1, good)
  partial = workdir / ("9" + TMP_SUFFIX) / "state"
  partial.mkdir(parents=True)
  (partial / "half_written_chunk").write_bytes(os.urandom(64))

  with ckpt.Checkpointer(workdir) as c:
    assert c.latest_step() == 1
    step, state, extra = c.restore(ckpt.abstract_like(good))
    assert (step, extra) == (1, {})
    assert_trees_bitwise_equal(state, good)
    c.save(2, good)
    assert c.all_steps() == [1, 2]
  assert step_dirs(workdir) == ["1", "2"]


def test_mismatched_restore_target_gives_clear_error(tmp_path):
  state = make_state()
  with ckpt.Checkpointer(tmp_path) as c:
    c.save(1, state)
    missing = ckpt.abstract_like({"params": state["params"], "extra_leaf": jnp.zeros(2)})
    with pytest.raises(ValueError, match="does not match the restore target") as err:
      c.restore(missing)
    assert "missing in target: opt_state/0/mu/lora_a" in str(err.value)
    assert "not in checkpoint: extra_leaf" in str(err.value)
    wrong_shape = ckpt.abstract_like(state)
    wrong_shape["params"]["lora_a"] = jax.ShapeDtypeStruct((8, 5), jnp.float32)
    with pytest.raises(ValueError, match=r"shape of params/lora_a: checkpoint \(8, 4\) vs target \(8, 5\)"):
      c.restore(wrong_shape)
    wrong_tree = ckpt.abstract_like(state)
    wrong_tree["opt_state"] = wrong_tree["opt_state"][0]
    with pytest.raises(ValueError, match="does not match the restore target"):
      c.restore(wrong_tree)


def test_sharded_save_restore_with_same_and_different_sharding(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh = Mesh(devices, ("data",))
  data_sharding = NamedSharding(mesh, P("data"))
  x = jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4)
  state = {"x": jax.device_put(x, data_sharding), "y": jax.device_put(jnp.arange(8, dtype=jnp.int32), data_sharding)}
  with ckpt.Checkpointer(tmp_path) as c:
    c.save(1, state)

    _, same, _ = c.restore(ckpt.abstract_like(state))
    assert_trees_bitwise_equal(same, state)
    assert same["x"].sharding.is_equivalent_to(data_sharding, 2)

    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    _, rep, _ = c.restore(target)
    assert_trees_bitwise_equal(rep, state)
    assert rep["x"].sharding.is_fully_replicated

    mesh2 = Mesh(devices.reshape(2, 4), ("a", "b"))
    target2 = {
      "x": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh2, P("b", "a"))),
      "y": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=NamedSharding(mesh2, P("a"))),
    }
    _, other, _ = c.restore(target2)
    assert_trees_bitwise_equal(other, state)
    assert other["x"].sharding == target2["x"].sharding


def test_async_save_then_wait(tmp_path):
  state = make_state()
  with ckpt.Checkpointer(tmp_path, async_save=True) as c:
    assert c.save(1, state, {"a": 1})
    c.wait()
    assert step_dirs(tmp_path) == ["1"]
    step, restored, extra = c.restore(ckpt.abstract_like(state))
    assert (step, extra) == (1, {"a": 1})
    assert_trees_bitwise_equal(restored, state)
