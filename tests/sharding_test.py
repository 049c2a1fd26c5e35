"""Sharding: same loss and gradients on one device and on a 2x2x2 mesh; rules; two-process multi-host."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from perl_jax import lora, models, sharding
from tests.helpers import random_batch, run_two_hosts, tiny_config


def _lm_loss(cfg, lscale, lora_params, params, ids, mask):
  logits = models.forward(cfg, params, ids, mask, adapters=[(lora_params, lscale)]).logits
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  m = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.sum(m)


def _setup():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  lcfg = lora.LoraConfig(rank=4, alpha=8)
  lp = lora.init(jax.random.key(1), params, lcfg)
  lp = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lp)
  ids, mask = random_batch(3, 8, 12, cfg.vocab_size, left_pad=(0, 2, 0, 5, 1, 0, 0, 3))
  return cfg, lcfg, params, lp, ids, mask


def test_loss_and_grads_equal_on_one_device_and_2x2x2_mesh():
  cfg, lcfg, params, lp, ids, mask = _setup()
  fn = jax.value_and_grad(lambda lp, p, i, m: _lm_loss(cfg, lora.scale(lcfg), lp, p, i, m))
  one = jax.devices()[0]
  loss1, grad1 = jax.jit(fn)(*jax.device_put((lp, params, ids, mask), one))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  p_sh, l_sh = sharding.shardings(params, mesh), sharding.shardings(lp, mesh)
  b_sh = sharding.batch_sharding(mesh)
  assert p_sh["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert l_sh["layers"]["attn"]["o_proj"]["b"].spec == P(None, None, "fsdp")
  step = jax.jit(fn, in_shardings=(l_sh, p_sh, b_sh, b_sh), out_shardings=(sharding.replicated(mesh), l_sh))
  args = (jax.device_put(lp, l_sh), jax.device_put(params, p_sh), jax.device_put(ids, b_sh), jax.device_put(mask, b_sh))
  loss8, grad8 = step(*args)
  assert len(loss8.sharding.device_set) == 8
  np.testing.assert_allclose(float(loss8), float(loss1), atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), grad8, grad1)


def test_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  tree = {"layers": {"attn": {"k_proj": {"kernel": jnp.zeros((2, 6, 3))}}}, "final_norm": {"scale": jnp.zeros(6)}}
  specs = sharding.partition_specs(tree, mesh)
  assert specs["layers"]["attn"]["k_proj"]["kernel"] == P(None, "fsdp")
  assert specs["final_norm"]["scale"] == P()
  opt_like = {"mu": {"layers": {"attn": {"q_proj": {"a": jnp.zeros((2, 8, 4))}}}}}
  assert sharding.partition_specs(opt_like, mesh)["mu"]["layers"]["attn"]["q_proj"]["a"] == P(None, "fsdp")


_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from perl_jax import sharding
pid, port, out = int(sys.argv[1]), sys.argv[2], f"{sys.argv[3]}.{sys.argv[1]}.json"
sharding.initialize_distributed(True, f"127.0.0.1:{port}", 2, pid)
sys.path.insert(0, os.getcwd())
from tests.sharding_test import _setup, _lm_loss
from perl_jax import lora
cfg, lcfg, params, lp, ids, mask = _setup()
mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1)
rows = slice(pid * 4, pid * 4 + 4)
batch = sharding.global_batch({"ids": ids[rows], "mask": mask[rows]}, mesh)
fn = jax.jit(jax.value_and_grad(lambda lp, p, i, m: _lm_loss(cfg, lora.scale(lcfg), lp, p, i, m)),
             out_shardings=sharding.replicated(mesh))
loss, grad = fn(sharding.shard(lp, mesh), sharding.shard(params, mesh), batch["ids"], batch["mask"])
g = float(jax.numpy.sum(grad["layers"]["attn"]["q_proj"]["b"]))
json.dump({"loss": float(loss), "gsum": g, "devices": jax.device_count()}, open(out, "w"))
"""


def test_stacked_members_take_one_members_spec_with_the_member_axis_replicated():
  """An ensemble's members (perl_jax.ensemble.stack, under a "members" key) are split like one member's leaf, the
  leading member axis replicated; the same leaves outside "members" keep their own rules."""
  mesh = sharding.make_mesh(2, 2, 2)
  one = {"lora": {"layers": {"attn": {"q_proj": {"a": jnp.zeros((2, 8, 4)), "b": jnp.zeros((2, 4, 8))},
                                      "o_proj": {"a": jnp.zeros((2, 8, 4)), "b": jnp.zeros((2, 4, 8))}}}},
         "head": {"kernel": jnp.zeros((8, 1))}}
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 3), one)
  specs = sharding.partition_specs({"reward": {"members": stacked}, "policy": one}, mesh)
  own = sharding.partition_specs(one, mesh)
  flat = lambda t: jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, P))
  assert flat(specs["policy"]) == flat(own)
  def trimmed(spec):  # Trailing Nones dropped, as the rules write specs (P(None) is P()).
    parts = list(spec)
    while parts and parts[-1] is None:
      parts.pop()
    return P(*parts)
  assert flat(specs["reward"]["members"]) == [trimmed(P(None, *s)) for s in flat(own)]
  assert specs["reward"]["members"]["lora"]["layers"]["attn"]["q_proj"]["a"] == P(None, None, "fsdp")


def test_two_process_multi_host_matches_single_process(tmp_path):
  run_two_hosts(_WORKER, tmp_path, tmp_path / "out")
  results = [json.loads((tmp_path / f"out.{i}.json").read_text()) for i in range(2)]
  cfg, lcfg, params, lp, ids, mask = _setup()
  loss, grad = jax.value_and_grad(lambda lp: _lm_loss(cfg, lora.scale(lcfg), lp, params, ids, mask))(lp)
  for r in results:
    assert r["devices"] == 4
    np.testing.assert_allclose(r["loss"], float(loss), atol=1e-5)
    np.testing.assert_allclose(r["gsum"], float(jnp.sum(grad["layers"]["attn"]["q_proj"]["b"])), atol=1e-4)
