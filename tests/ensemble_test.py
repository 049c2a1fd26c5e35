"""Reward-model ensembles on one backbone (perl_jax/ensemble.py): K members scored in one pass equal K single-RM
passes; K = 1 is the single path bit for bit; combinations equal numpy; the compiled scoring step's arguments hold
one backbone; 8 fake devices equal one; bad input is a one-line error."""
import jax
import numpy as np
import pytest

from perl_jax import ensemble, heads, lora, models, sharding
from tests.helpers import random_batch, tiny_config

SCALE = 2.0


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 8, 6, cfg.vocab_size, left_pad=(0, 2, 1, 0, 3, 0, 0, 1))
  members = []
  for k in range(4):
    key_a, key_b, key_h = jax.random.split(jax.random.key(10 + k), 3)
    ad = lora.init(key_a, params, lora.LoraConfig(rank=2, alpha=4.0))
    ad = jax.tree.map(lambda x, key=key_b: x + 0.2 * jax.random.normal(key, x.shape), ad)
    members.append({"lora": ad, "head": heads.init_head(key_h, cfg.hidden_size)})
  return cfg, params, ids, mask, members


def _single(cfg, params, member, ids, mask):
  hidden = models.forward(cfg, params, ids, mask, adapters=[(member["lora"], SCALE)], return_logits=False).hidden
  return heads.head_scores(member["head"], hidden, mask)


def test_member_scores_equal_single_passes_and_k1_is_the_single_path(setup):
  cfg, params, ids, mask, members = setup
  got = np.asarray(ensemble.member_scores(cfg, SCALE, ensemble.stack(members), params, ids, mask))
  want = np.stack([np.asarray(_single(cfg, params, m, ids, mask)) for m in members])
  assert got.shape == (4, 8) and np.abs(want[0] - want[1]).max() > 1e-3  # members differ
  np.testing.assert_allclose(got, want, atol=1e-5)
  turn = ensemble.member_scores(cfg, SCALE, ensemble.stack(members), params, ids, mask, in_turn=True)
  np.testing.assert_allclose(np.asarray(turn), want, atol=1e-5)
  one = jax.jit(lambda s: ensemble.member_scores(cfg, SCALE, s, params, ids, mask))(ensemble.stack(members[:1]))
  ref = jax.jit(lambda m: _single(cfg, params, m, ids, mask))(members[0])
  np.testing.assert_array_equal(np.asarray(one)[0], np.asarray(ref))


def test_combine_equals_numpy():
  r = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(ensemble.combine(r, "mean")), r.mean(0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ensemble.combine(r, "min")), r.min(0))
  np.testing.assert_allclose(np.asarray(ensemble.combine(r, "mean_minus_std", lam=0.5)), r.mean(0) - 0.5 * r.std(0),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="field 'rl.reward_ensemble': must be one of mean, min, mean_minus_std"):
    ensemble.combine(r, "max")


def test_scoring_step_holds_one_backbone(setup):
  """The compiled step's argument bytes grow by the adapters and heads alone from K = 1 to K = 4 (K backbone copies
  would add 3 backbones), and at K = 1 are at most one backbone + one member + the batch (XLA drops the unused
  lm_head)."""
  cfg, params, ids, mask, members = setup
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  args = {}
  for k in (1, 4):
    fn = jax.jit(lambda s, p, i, m: ensemble.member_scores(cfg, SCALE, s, p, i, m))
    args[k] = fn.lower(ensemble.stack(members[:k]), params, ids, mask).compile().memory_analysis().argument_size_in_bytes
  assert args[4] - args[1] == 3 * nbytes(members[0])
  assert nbytes(params) - nbytes(params["lm_head"]) <= args[1] <= nbytes(params) + nbytes(members[0]) + 2 * ids.nbytes


def test_ensemble_on_8_devices_equals_one(setup):
  cfg, params, ids, mask, members = setup
  stacked = ensemble.stack(members)
  one = ensemble.member_scores(cfg, SCALE, stacked, params, ids, mask)
  mesh = sharding.make_mesh(2, 2, 2)
  b_sh = sharding.batch_sharding(mesh)
  member_sh = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *s.spec)),
                           sharding.shardings(members[0], mesh))
  out = jax.jit(lambda s, p, i, m: ensemble.member_scores(cfg, SCALE, s, p, i, m))(
      jax.device_put(stacked, member_sh), sharding.shard(params, mesh), jax.device_put(ids, b_sh),
      jax.device_put(mask, b_sh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(one), atol=1e-5)


def test_bad_members_are_one_line_errors(setup):
  _, params, _, _, members = setup
  with pytest.raises(ValueError, match="no members"):
    ensemble.stack([])
  other = {"lora": lora.init(jax.random.key(1), params, lora.LoraConfig(rank=3)), "head": members[0]["head"]}
  with pytest.raises(ValueError, match="member 1 does not match member 0") as e:
    ensemble.stack([members[0], other])
  assert "\n" not in str(e.value)


def test_scoring_benchmark_holds_one_backbone_against_k_full_rms():
  """bench/ensemble_scoring from shapes: going from K = 1 to 4, the LoRA arm's compiled arguments grow by three
  members' adapters and heads, the full arm's by three backbones; the table prints one line per K."""
  from perl_jax.bench import ensemble_scoring, rm_step
  cfg = rm_step.preset("tiny")
  rows = {(r["k"], r["arm"]): r for r in ensemble_scoring.measure(cfg, name="tiny", ks=(1, 4), batch=2, seq=16,
                                                                   dtype="float32")}
  member = 4 * (lora.closed_form_count(cfg, lora.LoraConfig()) + cfg.hidden_size + 1)  # float32 adapters + head
  backbone = 4 * models.count_params({k: v for k, v in models.param_shapes(cfg).items() if k != "lm_head"})
  grow = lambda arm: rows[(4, arm)]["argument_bytes"] - rows[(1, arm)]["argument_bytes"]
  assert grow("lora_members") == grow("lora_members_in_turn") == 3 * member
  assert 3 * backbone <= grow("full_rms") <= 3 * (backbone + member)
  # In turn, K = 4 members' temporaries stay those of about one member; vmapped, they grow with K.
  temp = lambda k, arm: rows[(k, arm)]["temp_bytes"]
  assert temp(4, "lora_members_in_turn") < 0.5 * temp(4, "lora_members")
  assert temp(4, "lora_members_in_turn") <= 1.5 * temp(1, "lora_members")
  table = ensemble_scoring.markdown(list(rows.values()))
  assert "| tiny | 1 |" in table and "| tiny | 4 |" in table
