"""RM training loop: a resumed run ends bit-identical to an uninterrupted one; bad input fails cleanly."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from perl_jax import checkpoint, data, models, reward, trained
from tests.conftest import ROOT, bare_env
from tests.helpers import head_lines, make_tiny_hf_folder, run_two_hosts

sys.path.insert(0, str(ROOT))
from experiments.rm import smollm2  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny")
  make_tiny_hf_folder(d / "model")
  head_lines(ROOT / "experiments/data/taskmaster4/reward.jsonl.gz", d / "tm4.jsonl", 48)
  head_lines(ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", d / "hh.jsonl", 24)
  return d


def _config(tiny, arg="tm4_lora", **over):
  c = smollm2.get_config(arg)
  c.model.path = str(tiny / "model")
  c.data.path = str(tiny / ("tm4.jsonl" if arg.startswith("tm4") else "hh.jsonl"))
  c.data.update(max_len=64, min_prompt_tokens=16, batch_size=8, eval_batch_size=8, eval_fraction=0.25)
  c.update(steps=6, log_every=2, eval_every=3, checkpoint_every=2, keep_checkpoints=3)
  c.optim.warmup_steps = 2
  for k, v in over.items():
    node, *rest = k.split(".")
    (c[node] if rest else c)[rest[0] if rest else node] = v
  return c


@pytest.mark.parametrize("arg", ["tm4_lora", "hh_full"])
def test_resumed_run_is_bit_identical(tiny, tmp_path, arg):
  cfg = _config(tiny, arg)
  full_state, full_eval = reward.train(cfg, tmp_path / "a")
  reward.train(cfg, tmp_path / "b", stop_after=3)
  assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 3
  resumed_state, resumed_eval = reward.train(cfg, tmp_path / "b")
  assert int(resumed_state["step"]) == int(full_state["step"]) == 6
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full_state, resumed_state)
  np.testing.assert_equal(full_eval, resumed_eval)
  lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6]
  np.testing.assert_equal(json.loads((tmp_path / "a" / "eval.json").read_text()), full_eval)


def _bad_file(tmp_path, tiny, kind):
  lines = (tiny / "tm4.jsonl").read_text().splitlines()
  rec = json.loads(lines[3])
  if kind == "malformed":
    lines[3] = lines[3][:-5]
  elif kind == "reward":
    rec["reward"] = 0.5
    lines[3] = json.dumps(rec)
  elif kind == "missing":
    del rec["generation"]
    lines[3] = json.dumps(rec)
  path = tmp_path / f"{kind}.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize("kind,field", [("malformed", "malformed JSON"), ("reward", "'reward'"),
                                        ("missing", "'generation'")])
def test_bad_data_line_names_file_line_field_and_writes_nothing(tiny, tmp_path, kind, field):
  path = _bad_file(tmp_path, tiny, kind)
  cfg = _config(tiny)
  cfg.data.path = str(path)
  with pytest.raises(data.DataError) as e:
    reward.train(cfg, tmp_path / "run")
  msg = str(e.value)
  assert msg.startswith(f"{path}:4:") and field in msg and "\n" not in msg
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_exits_nonzero_with_one_line_and_keeps_last_checkpoint(tiny, tmp_path):
  cfg_args = ["--config", str(ROOT / "experiments/rm/smollm2.py:tm4_lora"), "--workdir", str(tmp_path / "run"),
              f"--config.model.path={tiny / 'model'}", "--config.data.max_len=64", "--config.data.batch_size=8",
              "--config.data.eval_batch_size=8",
              "--config.data.min_prompt_tokens=16", "--config.steps=2", "--config.eval_every=100",
              "--config.checkpoint_every=2", "--config.data.eval_fraction=0.25"]
  env = bare_env()
  ok = subprocess.run([sys.executable, "scripts/train_reward.py", *cfg_args,
                       f"--config.data.path={tiny / 'tm4.jsonl'}"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  ckpt = tmp_path / "run" / "checkpoints"
  before = sorted(p.name for p in ckpt.iterdir())
  bad = _bad_file(tmp_path, tiny, "reward")
  for data_path in (bad, tmp_path / "nope.jsonl"):
    r = subprocess.run([sys.executable, "scripts/train_reward.py", *cfg_args, "--config.steps=4",
                        f"--config.data.path={data_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and str(data_path) in err[0], r.stderr[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_missing_model_is_one_clear_error(tiny, tmp_path):
  cfg = _config(tiny)
  cfg.model.path = str(tmp_path / "no_model")
  with pytest.raises(models.ConfigError, match="no_model: no such file"):
    reward.train(cfg, tmp_path / "run")



_TRAIN_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, model, data_path, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, os.getcwd())
import numpy as np
from jax.experimental import multihost_utils
from tests.train_test import _config_for
from perl_jax import reward
state, ev = reward.train(_config_for(model, data_path), workdir)
b = multihost_utils.process_allgather(state["trainable"]["lora"]["layers"]["attn"]["q_proj"]["b"], tiled=True)
json.dump({"b_abs_sum": float(np.abs(np.asarray(b)).sum()), "eval": ev}, open(f"{workdir}.{pid}.json", "w"))
"""


def _config_for(model, data_path):
  c = smollm2.get_config("tm4_lora")
  c.model.path, c.data.path = str(model), str(data_path)
  c.data.update(max_len=64, min_prompt_tokens=16, batch_size=8, eval_batch_size=8, eval_fraction=0.25)
  c.update(steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  return c


def test_two_process_training_matches_one_process(tiny, tmp_path):
  """Two hosts x 2 devices (gloo) train the same model as one host x 8 devices: per-host data slicing,
  global batches, eval gathering and checkpointing across processes."""
  wd = tmp_path / "multi"
  run_two_hosts(_TRAIN_WORKER, tmp_path, tiny / "model", tiny / "tm4.jsonl", wd)
  multi = [json.loads((tmp_path / f"multi.{i}.json").read_text()) for i in range(2)]
  assert multi[0] == multi[1]
  assert checkpoint.Checkpointer(wd / "checkpoints").latest_step() == 4

  state, ev = reward.train(_config_for(tiny / "model", tiny / "tm4.jsonl"), tmp_path / "single")
  b = np.asarray(state["trainable"]["lora"]["layers"]["attn"]["q_proj"]["b"])
  np.testing.assert_allclose(multi[0]["b_abs_sum"], np.abs(b).sum(), rtol=1e-4)
  for k, v in ev.items():
    np.testing.assert_allclose(multi[0]["eval"][k], v, rtol=1e-4, err_msg=k)



@pytest.mark.parametrize("arg", ["tm4_lora", "hh_full"])
def test_probe_head_init_is_the_probe_of_the_runs_own_frozen_features(tiny, tmp_path, monkeypatch, arg):
  """head_init="probe" (LP-FT): the head a run starts from is probe.fit_head of the frozen features of its first
  probe_examples training examples, computed here independently (one unpadded row at a time). lr = 0 keeps the
  step-1 checkpoint at the initial state. A resumed run restores the head and does not fit it again."""
  import optax

  from perl_jax import probe, runs
  cfg = _config(tiny, arg, head_init="probe", probe_examples=12, steps=2, checkpoint_every=1, eval_every=0)
  cfg.optim.lr = 0.0
  reward.train(cfg, tmp_path / "run", stop_after=1)
  assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["head_probe"]["examples"] == 12

  model_cfg, base, tokenizer = runs.load_model(cfg.model)
  train_arrays, _, _ = reward.load_data(cfg, tokenizer)
  rcfg = trained.reward_config(cfg)
  init = reward.new_state(cfg, rcfg, model_cfg, base, optax.sgd(0.0))["trainable"]
  frozen = trained.reward_frozen(rcfg, base)
  rows = []
  for i in range(12):
    ids, mask = train_arrays["input_ids"][i], train_arrays["attention_mask"][i]
    n = int(mask.reshape(-1, mask.shape[-1]).sum(-1).max())  # Right padding: drop the all-pad tail.
    batch = {"input_ids": ids[None, ..., :n], "attention_mask": mask[None, ..., :n]}
    rows.append(np.asarray(trained.batch_features(model_cfg, rcfg, init, frozen, batch))[0])
  want, _ = probe.fit_head(np.stack(rows), train_arrays["label"][:12] if "label" in train_arrays else None,
                           seed=cfg.seed)
  got = trained.restore_reward(tmp_path / "run", step=1).trainable["head"]
  np.testing.assert_allclose(np.asarray(got["kernel"]), want["kernel"], rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(np.asarray(got["bias"]), want["bias"], rtol=2e-3, atol=2e-4)

  monkeypatch.setattr(reward, "probe_head", lambda *a, **k: pytest.fail("refit on resume"))
  resumed, _ = reward.train(cfg, tmp_path / "run")
  assert int(resumed["step"]) == 2


def test_probe_cache_is_shared_by_lora_ranks_and_seeds_and_equals_a_fresh_probe(tiny, tmp_path, monkeypatch):
  """probe_cache: the frozen features are computed once for every LoRA rank and seed (untrained adapters add
  exactly zero); a point that reads them starts from the head an uncached run of that point fits. Full tuning
  gets its own entry."""
  cache = tmp_path / "cache"

  def head(run, **over):
    cfg = _config(tiny, "tm4_lora", **{**dict(head_init="probe", probe_examples=12, steps=2, checkpoint_every=1,
                                              eval_every=0), **over})
    cfg.optim.lr = 0.0
    reward.train(cfg, tmp_path / run, stop_after=1)
    return trained.restore_reward(tmp_path / run, step=1).trainable["head"]

  head("r4", probe_cache=str(cache))
  assert len(list(cache.glob("*.npz"))) == 1
  fresh = head("r8_fresh", **{"lora.rank": 8, "seed": 1})
  real_score_all = reward.score_all
  monkeypatch.setattr(reward, "score_all", lambda *a, **k: pytest.fail("features recomputed"))
  cached = head("r8_cached", probe_cache=str(cache), **{"lora.rank": 8, "seed": 1})
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(np.asarray(cached[k]), np.asarray(fresh[k]), rtol=1e-4, atol=1e-5)
  monkeypatch.setattr(reward, "score_all", real_score_all)
  head("full", probe_cache=str(cache), mode="full")
  assert len(list(cache.glob("*.npz"))) == 2
