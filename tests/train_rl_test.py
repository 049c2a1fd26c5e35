"""scripts/train_rl.py end to end on a tiny backbone: RM and SFT runs -> RL run (metrics, sample texts,
checkpoint, resume), and one-line errors (exit 2) for a missing or mismatched RM / SFT folder."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from perl_jax import data, heads, reward, sft, trained
from perl_jax.rl import setup
from perl_jax.rl import train as rl_train
from tests.conftest import ROOT
from tests.helpers import load_script, tiny_rm_and_sft_runs

from experiments.rl import smollm2 as rl_configs  # noqa: E402
from experiments.rm import smollm2 as rm_configs  # noqa: E402

LOGGED = ("reward_mean", "reward_std", "kl_ref", "entropy", "value_loss", "explained_variance", "clip_fraction",
          "response_length", "finished_fraction", "sample_tokens_per_s", "update_tokens_per_s", "sample_s", "score_s",
          "update_s", "s_per_sample", "kl_coef", "loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny HF model, a 2-step LoRA RM run on Taskmaster-4 lines and a 2-step LoRA SFT run on its dialogs."""
  return tiny_rm_and_sft_runs(tmp_path_factory.mktemp("rl"))


def _rl_config(d, **over):
  c = rl_configs.get_config("tm4_lora")
  c.reward_workdir, c.sft_workdir, c.data.path = str(d / "rm"), str(d / "sft"), str(d / "tm4.jsonl")
  c.data.update(batch_size=8, max_prompt_len=48, eval_fraction=0.5)
  c.rl.max_new_tokens = 6
  c.update(steps=2, log_every=1, checkpoint_every=2, eval_prompts=4)
  c.update(over)
  return c


def test_rl_run_logs_metrics_samples_and_resumes(runs, tmp_path):
  _, ev = rl_train.train(_rl_config(runs, steps=3), tmp_path / "rl")
  assert {"reward_before", "reward_after", "kl", "win_rate", "reward_diff_lo", "win_rate_hi"} <= set(ev)
  assert ev["win_rate_lo"] <= ev["win_rate"] <= ev["win_rate_hi"] and ev["reward_diff_lo"] <= ev["reward_diff_hi"]
  lines = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
  rows = [r for r in lines if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3] and [r["step"] for r in lines if "eval/win_rate" in r] == [3]
  for key in LOGGED:
    assert all(f"train/{key}" in r for r in rows), key
  assert abs(rows[0]["train/kl_ref"]) < 1e-5               # fresh policy LoRA: π = π_SFT (sampler arithmetic aside)
  samples = [json.loads(line) for line in (tmp_path / "rl" / "samples.jsonl").read_text().splitlines()]
  assert samples and {"step", "reward", "prompt", "response"} <= set(samples[0])
  assert (tmp_path / "rl" / "summary.json").is_file()
  # A run killed after step 3 but before its checkpoint: it resumes at step 2 and redoes step 3, logging each
  # step's metrics and sample texts once.
  shutil.rmtree(tmp_path / "rl" / "checkpoints" / "3")
  state, _ = rl_train.train(_rl_config(runs, steps=4), tmp_path / "rl")
  rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4] and int(state["step"]) == 4
  steps = [json.loads(line)["step"] for line in (tmp_path / "rl" / "samples.jsonl").read_text().splitlines()]
  n = len(steps) // 4
  assert steps == [1] * n + [2] * n + [3] * n + [4] * n, steps


def test_fewer_prompts_than_a_batch_is_a_one_line_error(runs, tmp_path):
  c = _rl_config(runs)
  c.data.max_train_prompts = 4                              # data.batch_size is 8
  with pytest.raises(data.DataError, match="fewer than one batch") as e:
    rl_train.train(c, tmp_path / "few")
  assert "\n" not in str(e.value) and "tm4.jsonl" in str(e.value)


def _cli(tmp_path, *extra):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "scripts/train_rl.py", "--config", "experiments/rl/smollm2.py:tm4_lora",
                         "--workdir", str(tmp_path / "cli"), *extra], cwd=ROOT, env=env, capture_output=True,
                        text=True)


def test_missing_or_mismatched_runs_are_one_line_errors(runs, tmp_path):
  r = _cli(tmp_path, f"--config.reward_workdir={tmp_path / 'nope'}")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr, r.stderr[-2000:]
  other = tmp_path / "other_sft"                              # an SFT run that names another tokenizer/backbone
  other.mkdir()
  cfg = json.loads((runs / "sft" / "run.json").read_text())
  cfg["config"]["model"]["path"] = ""                         # the embedded SmolLM2-135M, not the tiny model
  (other / "run.json").write_text(json.dumps(cfg))
  (other / "checkpoints").symlink_to(runs / "sft" / "checkpoints")
  r = _cli(tmp_path, f"--config.reward_workdir={runs / 'rm'}", f"--config.sft_workdir={other}",
           f"--config.data.path={runs / 'tm4.jsonl'}")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "another backbone" in r.stderr, r.stderr[-2000:]
  assert not (tmp_path / "cli" / "checkpoints").exists()


def test_rl_config_decides_the_roles_precision_and_kv_cache(runs):
  """The roles load with the RL config's run-time model fields, not the RM run's (float32): bf16 compute when asked,
  "auto" = float32 on CPU; rl.cache_dtype "auto" follows the compute dtype; stop strings become device token ids."""
  from perl_jax import sharding
  mesh = sharding.make_mesh(-1, 1, 1)
  c = _rl_config(runs)
  assert c.model.dtype == "auto" and c.rl.cache_dtype == "auto"
  c.rl.stop_strings = ["<|im_end|>", "\nUser:"]
  r = setup.load_roles(c, mesh)
  rlcfg = setup.config_from(c, r)
  assert r.model_cfg.dtype == "float32" and rlcfg.cache_dtype == "float32"
  assert r.tokenizer.decode(list(rlcfg.stop_ids[0])) == "\nUser:" and len(rlcfg.stop_ids) == 1
  c.model.dtype, c.rl.cache_dtype = "bfloat16", "auto"
  r = setup.load_roles(c, mesh)
  assert r.model_cfg.dtype == "bfloat16" and setup.config_from(c, r).cache_dtype == "bfloat16"
  c.rl.cache_dtype = "float32"
  assert setup.config_from(c, r).cache_dtype == "float32"


def test_prompts_longer_than_the_window_or_context_are_one_line_errors(runs, tmp_path):
  base = (f"--config.reward_workdir={runs / 'rm'}", f"--config.sft_workdir={runs / 'sft'}",
          f"--config.data.path={runs / 'tm4.jsonl'}", "--config.data.batch_size=8")
  r = _cli(tmp_path, *base, "--config.data.max_prompt_len=16", "--config.data.truncate_prompts=False")
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
  assert "tm4.jsonl: field 'prompt'" in r.stderr and "max_prompt_len=16" in r.stderr and "conversation dlg-" in r.stderr
  r = _cli(tmp_path, *base, "--config.data.max_prompt_len=48", "--config.rl.max_new_tokens=2001")  # context 2048
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
  assert "'data.max_prompt_len' + 'rl.max_new_tokens' = 2049 tokens exceed the model's context (2048" in r.stderr
  assert not (tmp_path / "cli" / "checkpoints").exists()


def test_eval_policy_anchor_equality_and_judge(runs, tmp_path):
  """lr 0 keeps π = π_SFT: the same samples, so reward_after == reward_before, KL 0 and win rate ½ exactly; the
  run's own RM as judge gives the RM's figures through the independent trained.scores path."""
  from perl_jax.rl import evaluate
  rl_train.train(_rl_config(runs, steps=1, checkpoint_every=1, optim=dict(lr=0.0, warmup_steps=1, weight_decay=0.0,
                                                                          clip_norm=1.0)), tmp_path / "rl0")
  policy = setup.restore(tmp_path / "rl0")
  prompts = evaluate.held_out_prompts(policy.config, "taskmaster4", runs / "tm4.jsonl", "all")[:6]
  judge = trained.restore_reward(runs / "rm", mesh=policy.mesh)
  r = evaluate.evaluate(policy, prompts, batch_size=4, judge=judge, samples_per_prompt=2, with_texts=True)
  texts = r.pop("texts")       # one row per prompt (6 prompts in batches of 4: the padded rows are left out)
  assert len(texts) == 6 and all(len(t["before"]) == len(t["after"]) == 2 for t in texts)
  assert [t["before"] for t in texts] == [t["after"] for t in texts]      # π = π_SFT, same rng: same responses
  assert np.mean([t["reward_after"] for t in texts]) == pytest.approx(r["reward_after"], abs=1e-6)
  assert len({t["prompt"] for t in texts}) == 6 and all(t["after"][0] for t in texts)
  assert r["num_prompts"] == 6 and r["step"] == 1 and r["samples_per_prompt"] == 2
  assert r["reward_after"] == r["reward_before"] and abs(r["kl"]) < 1e-5 and r["win_rate"] == 0.5
  assert r["reward_diff"] == r["reward_diff_lo"] == r["reward_diff_hi"] == 0.0     # identical samples: no spread
  assert r["win_rate_lo"] < 0.5 < r["win_rate_hi"] and r["judge_win_rate"] == 0.5
  assert 0.0 <= r["finished_fraction_after"] == r["finished_fraction_before"] <= 1.0
  assert r["judge_reward_after"] == pytest.approx(r["reward_after"], abs=1e-5)
  assert r["response_length_after"] == r["response_length_before"] > 0
  cli = subprocess.run([sys.executable, "scripts/eval_policy.py", "--workdir", str(tmp_path / "rl0"), "--data",
                        str(runs / "tm4.jsonl"), "--split", "all", "--max_prompts", "4", "--batch_size", "4",
                        "--texts_out", str(tmp_path / "texts.jsonl")],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
  assert cli.returncode == 0, cli.stderr[-2000:]
  out = json.loads(cli.stdout)
  assert {"reward_before", "reward_after", "reward_diff_lo", "reward_diff_hi", "kl", "win_rate", "win_rate_lo",
          "win_rate_hi", "finished_fraction_after", "format", "split"} <= set(out)
  assert out["format"] == "taskmaster4" and out["win_rate"] == 0.5 and "texts" not in out
  rows = [json.loads(line) for line in (tmp_path / "texts.jsonl").read_text().splitlines()]
  assert [t["prompt"] for t in rows] == [t["prompt"] for t in texts[:4]]


def test_policy_export_merged_and_peft_match_transformers(runs, tmp_path):
  """The exported policy (SFT + policy adapters) gives our policy logits in transformers, merged and via PEFT."""
  import numpy as np
  import torch
  import transformers
  from peft import PeftModel
  from perl_jax import lora, models
  from perl_jax import runs as runs_lib
  from perl_jax.export import policy as export_policy
  from perl_jax.export.policy import adapter_sets
  c = _rl_config(runs, steps=2, optim=dict(lr=0.05, warmup_steps=1, weight_decay=0.0, clip_norm=1.0))
  c.rl.value_warmup_steps = 0                                 # the policy moves from step 1
  rl_train.train(c, tmp_path / "rl")
  policy = setup.restore(tmp_path / "rl")
  assert all(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(policy.trainable["policy"]))
  ids = np.random.default_rng(0).integers(3, 1000, size=(2, 12)).astype(np.int32)
  ours = np.asarray(models.forward(policy.model_cfg, policy.frozen["base"], ids, None,
                                   adapters=adapter_sets(policy)).logits)
  # In process (scripts/export.py on a policy run is tested through its CLI in quant_stages_test).
  export_policy.export_merged(policy, tmp_path / "merged", runs_lib.model_path(policy.config.model))
  export_policy.export_peft(policy, tmp_path / "peft", runs_lib.model_path(policy.config.model))
  adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert not os.path.isabs(adapter["base_model_name_or_path"])  # A name that travels, never a local path.
  generate = load_script("generate")  # generate.py --workdir talks to this policy, and to the SFT run under it.
  cfg, params, _ = generate.trained_policy(str(tmp_path / "rl"))
  np.testing.assert_allclose(np.asarray(models.forward(cfg, params, ids, None).logits), ours, atol=2e-4)
  sft_run = trained.restore_policy(runs / "sft")
  sft_logits = models.forward(sft_run.model_cfg, sft_run.frozen, ids, None,
                              adapters=[(sft_run.trainable["lora"], lora.scale(sft_run.stage.lora_cfg))]).logits
  cfg, params, _ = generate.trained_policy(str(runs / "sft"))
  np.testing.assert_allclose(np.asarray(models.forward(cfg, params, ids, None).logits), np.asarray(sft_logits),
                             atol=2e-4)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  peft = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(runs / "model"),
                                   tmp_path / "peft").eval()
  with torch.no_grad():
    for model in (merged, peft):
      theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
      np.testing.assert_allclose(theirs, ours, atol=2e-4)


def test_rm_started_from_the_sft_run_stands_on_it_in_training_restore_and_rl(runs, tmp_path):
  """config.init_from: the RM trains on base ⊕ SFT adapter (merged). Its restored scores equal the unmerged stack
  base + [SFT adapter, RM adapter] + head; RL then uses that SFT model as its one backbone and anchor."""
  import numpy as np
  from perl_jax import lora, models
  from perl_jax.export import reward as export_reward
  c = rm_configs.get_config("tm4_lora")
  c.model.path, c.data.path, c.init_from = str(runs / "model"), str(runs / "tm4.jsonl"), str(runs / "sft")
  c.data.update(max_len=64, batch_size=8, eval_batch_size=8, eval_fraction=0.25, min_prompt_tokens=16)
  c.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2, optim=dict(
      lr=0.05, warmup_steps=1, weight_decay=0.0, clip_norm=1.0, head_lr_mult=1.0))
  reward.train(c, tmp_path / "rm")
  rm, pol = trained.restore_reward(tmp_path / "rm"), trained.restore_policy(runs / "sft")
  sft_lora, rm_lora = pol.trainable["lora"], rm.trainable["lora"]
  assert all(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves((sft_lora, rm_lora)))  # both moved
  ids = np.random.default_rng(0).integers(3, 1000, size=(3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  stack = [(sft_lora, lora.scale(pol.stage.lora_cfg)), (rm_lora, lora.scale(rm.stage.lora_cfg))]
  hidden = models.forward(rm.model_cfg, pol.frozen, ids, mask, adapters=stack, return_logits=False).hidden
  expected = heads.head_apply(rm.trainable["head"], hidden[:, -1])
  got = trained.scores(rm.model_cfg, rm.stage, rm.trainable, rm.frozen, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
  without_sft = trained.scores(rm.model_cfg, rm.stage, rm.trainable, pol.frozen, ids, mask)
  assert float(np.abs(np.asarray(without_sft) - np.asarray(expected)).max()) > 1e-4   # 10× the tolerance above

  rl = _rl_config(runs, steps=1, checkpoint_every=1)
  rl.reward_workdir = str(tmp_path / "rm")
  roles_ = setup.load_roles(rl, rm.mesh)
  base, sft_adapter = roles_.base, roles_.sft_lora
  assert sft_adapter is None                                   # already merged into the one backbone
  np.testing.assert_allclose(np.asarray(models.forward(rm.model_cfg, base, ids, mask).logits),
                             np.asarray(sft.logits(pol.model_cfg, pol.stage, pol.trainable, pol.frozen, ids, mask)),
                             atol=1e-4)                        # reference = the SFT policy
  rl_train.train(rl, tmp_path / "rl")
  first = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])
  assert abs(first["train/kl_ref"]) < 1e-5                     # the policy starts at that anchor (two programs' sums)
  rl.sft_workdir = str(tmp_path / "rm")                        # any other run as anchor is refused
  with pytest.raises(models.ConfigError, match="starts from the SFT run"):
    setup.load_roles(rl, rm.mesh)
  with pytest.raises(models.ConfigError, match="--format merged"):
    export_reward.export_peft(rm, tmp_path / "peft")
  c.init_from = str(tmp_path / "nope")
  with pytest.raises(models.ConfigError, match="nope: not a run folder .* 'init_from'"):
    reward.train(c, tmp_path / "rm2")


_RL_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, runs_dir, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, os.getcwd())
import pathlib
import numpy as np
from jax.experimental import multihost_utils
from tests.train_rl_test import _two_host_config
from perl_jax.rl import train as rl_train
state, ev = rl_train.train(_two_host_config(pathlib.Path(runs_dir)), workdir)
leaves = [multihost_utils.process_allgather(x, tiled=True) for x in jax.tree.leaves(state["trainable"]["policy"])]
json.dump({"policy_abs_sum": float(sum(np.abs(np.asarray(x)).sum() for x in leaves)), "eval": ev},
          open(f"{workdir}.{pid}.json", "w"))
"""


def _two_host_config(d):
  c = _rl_config(d, steps=2, num_sample_texts=3, eval_prompts=4, eval_batch_size=4)
  c.rl.stop_strings = ["<|im_end|>", "<|im_start|>"]  # a stop string besides EOS: on device, no longer refused
  return c


def test_two_process_rl_matches_one_process(runs, tmp_path):
  """Two hosts x 2 devices (gloo) run RL as one host x 8 devices does: the rollout, the update, the sample lines
  (gathered from the global batch) and the in-training eval (its batches global arrays over the mesh)."""
  from tests.helpers import run_two_hosts
  import numpy as np
  wd = tmp_path / "multi"
  run_two_hosts(_RL_WORKER, tmp_path, runs, wd)
  multi = [json.loads((tmp_path / f"multi.{i}.json").read_text()) for i in range(2)]
  assert multi[0] == multi[1]
  state, ev = rl_train.train(_two_host_config(runs), tmp_path / "single")
  single = float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(state["trainable"]["policy"])))
  np.testing.assert_allclose(multi[0]["policy_abs_sum"], single, rtol=1e-4)
  assert set(multi[0]["eval"]) == set(ev)
  for k, v in ev.items():
    np.testing.assert_allclose(multi[0]["eval"][k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  lines = lambda p: [json.loads(x) for x in (p / "samples.jsonl").read_text().splitlines()]
  got, want = lines(wd), lines(tmp_path / "single")
  assert [(r["step"], r["prompt"], r["response"]) for r in got] == [(r["step"], r["prompt"], r["response"])
                                                                     for r in want]
  np.testing.assert_allclose([r["reward"] for r in got], [r["reward"] for r in want], rtol=1e-4, atol=1e-5)
