"""Reward ensembles in RL and averaged RMs (issue #32) on tiny real runs: two LoRA RM runs that differ in seed and
batch order, named by one `reward_workdir` (a glob or ':'-joined folders). RL's reward equals the members' single-RM
rewards combined (K = 1: the single path bit for bit); an RL run on an ensemble trains and restores; averaged RM
runs equal the dense average of the members' updates and export like any RM; compare_rms's ensemble row is the
members' combined scores; bad member lists are one-line errors."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from perl_jax import lora, reward, runs, sharding, stats, trained
from perl_jax.errors import ConfigError
from perl_jax.export import reward as export_reward
from perl_jax.rl import roles, setup
from perl_jax.rl import train as rl_train
from tests.conftest import ROOT
from tests.helpers import tiny_rm_and_sft_runs

from experiments.rl import smollm2 as rl_configs  # noqa: E402


@pytest.fixture(scope="module")
def d(tmp_path_factory):
  """tiny_rm_and_sft_runs plus a second RM run (d/rm2): the same recipe with seed 1 and batch order 1."""
  d = tiny_rm_and_sft_runs(tmp_path_factory.mktemp("ens"))
  c = runs.read_config(d / "rm")
  c.seed, c.data.shuffle_seed = 1, 1
  reward.train(c, d / "rm2")
  return d


def _config(d, reward_workdir, how="none", judge_workdir="", **rl):
  c = rl_configs.get_config("tm4_lora")
  c.reward_workdir, c.sft_workdir, c.data.path = reward_workdir, str(d / "sft"), str(d / "tm4.jsonl")
  c.judge_workdir = judge_workdir
  c.data.update(batch_size=8, max_prompt_len=48, eval_fraction=0.5)
  c.rl.update(max_new_tokens=6, reward_ensemble=how, **rl)
  c.update(steps=1, log_every=1, checkpoint_every=1, eval_prompts=4)
  return c


def _rewards(config, ids, mask):
  """RL's reward role for `config`'s reward_workdir, jitted, on fixed rows."""
  mesh = sharding.make_mesh()
  r = setup.load_roles(config, mesh)
  rlcfg = setup.config_from(config, r)
  frozen = roles.frozen_params(rlcfg, r.base, r.sft_lora, r.reward)
  return np.asarray(jax.jit(lambda f: roles.rewards(r.model_cfg, rlcfg, f, ids, mask))(frozen)), frozen


@pytest.fixture(scope="module")
def rows():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, 1000, (4, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] >= np.array([[0], [3], [1], [5]]), jnp.int32)
  return ids, mask


def test_ensemble_reward_equals_the_members_combined(d, rows):
  ids, mask = rows
  r0, _ = _rewards(_config(d, str(d / "rm")), ids, mask)
  r1, _ = _rewards(_config(d, str(d / "rm2")), ids, mask)
  assert np.abs(r0 - r1).max() > 1e-4  # the members differ
  k1, frozen = _rewards(_config(d, str(d / "rm"), "mean"), ids, mask)
  assert jax.tree.leaves(frozen["reward"]["members"])[0].shape[0] == 1
  np.testing.assert_array_equal(k1, r0)  # K = 1 is the single-RM path, bit for bit.
  both = np.stack([r0, r1])
  got, frozen = _rewards(_config(d, str(d / "rm*"), "mean"), ids, mask)  # a glob: rm, rm2 (sorted)
  assert jax.tree.leaves(frozen["reward"]["members"])[0].shape[0] == 2
  np.testing.assert_allclose(got, both.mean(0), atol=1e-5)
  got, _ = _rewards(_config(d, f"{d / 'rm2'}:{d / 'rm'}", "min"), ids, mask)  # ':'-joined, either order
  np.testing.assert_allclose(got, both.min(0), atol=1e-5)
  got, _ = _rewards(_config(d, str(d / "rm*"), "min", reward_ensemble_in_turn=True), ids, mask)  # one at a time
  np.testing.assert_allclose(got, both.min(0), atol=1e-5)
  got, _ = _rewards(_config(d, str(d / "rm*"), "mean_minus_std", reward_ensemble_lam=0.5), ids, mask)
  np.testing.assert_allclose(got, both.mean(0) - 0.5 * both.std(0), atol=1e-5)


def test_rl_run_on_an_ensemble_trains_restores_and_copies_member_0_into_the_value(d, tmp_path):
  config = _config(d, str(d / "rm*"), "mean_minus_std", value_init="reward")
  _, ev = rl_train.train(config, tmp_path / "rl")
  assert np.isfinite(ev["reward_after"]) and np.isfinite(ev["kl"])
  rows = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([r["train/reward_mean"] for r in rows if "train/reward_mean" in r]).all()
  assert runs.read_config(tmp_path / "rl").reward_workdir == f"{d / 'rm'}:{d / 'rm2'}"  # the glob's matches
  with pytest.raises(ConfigError, match="this run started against the reward model"):  # resumed on another reward
    rl_train.train(_config(d, str(d / "rm"), "mean_minus_std", value_init="reward"), tmp_path / "rl")
  run = setup.restore(tmp_path / "rl")
  assert jax.tree.leaves(run.frozen["reward"]["members"])[0].shape[0] == 2
  r = setup.load_roles(config, sharding.make_mesh())
  fresh = roles.init_trainable(jax.random.key(0), r.model_cfg, setup.config_from(config, r), r.base, r.sft_lora,
                               r.reward)
  member0 = trained.restore_reward(d / "rm").trainable
  for got, want in zip(jax.tree.leaves(fresh["value"]), jax.tree.leaves({"head": member0["head"],
                                                                         "lora": member0["lora"]})):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_judge_rm_is_scored_at_each_eval(d, tmp_path):
  """train_rl with judge_workdir: a copy of the RM itself as the judge gives judge figures equal to the RM's (two
  code paths, trained.scores and the RL reward role, on the same samples); the RM itself is refused as a judge."""
  copy = tmp_path / "judge"
  shutil.copytree(d / "rm", copy)
  _, ev = rl_train.train(_config(d, str(d / "rm"), judge_workdir=str(copy)), tmp_path / "rl")
  for key in ("reward_after", "reward_before", "reward_diff"):
    assert ev[f"judge_{key}"] == pytest.approx(ev[key], abs=1e-5)
  texts = [json.loads(x) for x in (tmp_path / "rl" / "eval_texts_1.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([t["judge_after"] for t in texts], [t["reward_after"] for t in texts], atol=1e-5)
  with pytest.raises(ConfigError, match="names a reward model the policy trains against"):
    rl_train.train(_config(d, str(d / "rm*"), "mean", judge_workdir=str(d / "rm2")), tmp_path / "rl2")


def _edited_copy(d, name, **fields):
  """A copy of d/rm whose run.json config has `fields` replaced (dotted keys)."""
  dst = d / name
  if not dst.exists():
    shutil.copytree(d / "rm", dst)
  path = dst / runs.RUN_FILE
  run = json.loads(path.read_text())
  for key, value in fields.items():
    node = run["config"]
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  path.write_text(json.dumps(run))
  return dst


@pytest.mark.parametrize("case", ["no_combine", "no_match", "rank", "backbone", "full_member", "sft_start",
                                  "full_rl", "sft_run"])
def test_bad_member_lists_are_one_line_errors(d, case):
  rm = str(d / "rm")
  other = {"rank": dict(**{"lora.rank": 2}), "backbone": {"model.path": str(d / "sft")},
           "full_member": {"mode": "full"}, "sft_start": {"init_from": str(d / "sft")}}
  if case == "no_combine":
    config, want = _config(d, str(d / "rm*")), "names 2 RM runs; set rl.reward_ensemble"
  elif case == "no_match":
    config, want = _config(d, str(d / "nothing*"), "mean"), "matches no folder"
  elif case == "sft_run":  # A glob that also matches another stage's folder.
    config, want = _config(d, f"{rm}:{d / 'sft'}", "mean"), "an SFT run, not a reward-model run"
  elif case == "full_rl":
    config, want = _config(d, rm, "mean"), "full-mode RL takes one RM"
    config.mode = "full"
  else:
    bad = _edited_copy(d, f"bad_{case}", **other[case])
    config = _config(d, f"{rm}:{bad}", "mean")
    want = {"rank": "its adapter", "backbone": "another backbone and tokenizer", "full_member": "full-mode RM",
            "sft_start": "another SFT run"}[case]
  with pytest.raises(ConfigError, match=want) as e:
    setup.config_from(config)
    setup.load_roles(config, sharding.make_mesh())
  assert "\n" not in str(e.value)


def _cli(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_averaged_rm_runs_equal_the_dense_average_and_export(d, tmp_path):
  """scripts/average_rm.py --how exact: the new run's merged weights are base + (1/K)·Σ_k ΔW_k (≤ 1e-5) and its head
  the members' mean; it restores and exports (merged) like any RM run. --how factor keeps rank r."""
  members = [trained.restore_reward(d / n) for n in ("rm", "rm2")]
  for how in ("exact", "factor"):
    out = tmp_path / how
    res = _cli("scripts/average_rm.py", "--runs", str(d / "rm"), "--runs", str(d / "rm2"), "--how", how,
               "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    avg = trained.restore_reward(out)
    assert avg.stage.lora_cfg.rank == (4 * 2 if how == "exact" else 4)
    np.testing.assert_allclose(np.asarray(avg.trainable["head"]["kernel"]),
                               np.mean([np.asarray(m.trainable["head"]["kernel"]) for m in members], 0), atol=1e-7)
  avg = trained.restore_reward(tmp_path / "exact")
  base = members[0].frozen
  dense = jax.tree.map(lambda *w: sum(w) / 2, *[lora.merge(base, m.trainable["lora"], lora.scale(m.stage.lora_cfg))
                                               for m in members])
  got = lora.merge(base, avg.trainable["lora"], lora.scale(avg.stage.lora_cfg))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(dense)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
  export_reward.export_merged(avg, tmp_path / "exported")  # In process: export.py's CLI is export_test's.
  tensors = safetensors.numpy.load_file(str(tmp_path / "exported" / "model.safetensors"))
  v = np.asarray(got["layers"]["attn"]["v_proj"]["kernel"])  # [L, in, out]; HF stores [out, in] per layer
  np.testing.assert_allclose(tensors["model.layers.1.self_attn.v_proj.weight"], v[1].T, atol=1e-5)
  res = _cli("scripts/average_rm.py", "--runs", str(d / "rm"), "--out", str(tmp_path / "one"))
  assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: --runs")


def test_compare_rms_ensemble_row_is_the_members_combined(d, tmp_path):
  out = tmp_path / "cmp.json"
  res = _cli("scripts/compare_rms.py", "--runs", str(d / "rm"), "--runs", str(d / "rm2"), "--members",
             str(d / "rm"), "--members", str(d / "rm2"), "--ensemble", "min", "--data", str(d / "tm4.jsonl"),
             "--split", "all", "--out", str(out))
  assert res.returncode == 0, res.stderr[-2000:]
  got = json.loads(out.read_text())
  s = np.asarray(got["scores"])
  assert s.shape[0] == 3 and got["runs"][2]["run"].startswith("ensemble min of 2")
  np.testing.assert_allclose(s[2], np.minimum(s[0], s[1]))
  labels = np.asarray(got["labels"])
  for row, scores in zip(got["runs"], s):
    assert row["ece"] == pytest.approx(stats.expected_calibration_error(1 / (1 + np.exp(-scores)), labels))
    assert 0 <= row["ece_lo"] <= row["ece_hi"] <= 1
  ens = got["runs"][2]
  aucs = [stats.roc_auc(x, labels) for x in s[:2]]
  assert ens["members_roc_auc_mean"] == pytest.approx(np.mean(aucs))
  assert ens["vs_members_roc_auc_diff"] == pytest.approx(stats.roc_auc(s[2], labels) - np.mean(aucs))
  assert ens["vs_members_roc_auc_diff_lo"] <= ens["vs_members_roc_auc_diff_hi"]
  assert "vs_members_roc_auc_diff" not in got["runs"][1]
