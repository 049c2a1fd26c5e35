"""Every stage on a quantized frozen base (model.quant, issue #33): SFT, RM and RL (all four roles on the one nf4
backbone) train, restore onto the same quantized base and export. The merged exports dequantize and add the
adapters: transformers, loading them, gives our scores and logits on the nf4 base. Checkpoints hold adapters."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from perl_jax import lora, models, trained
from perl_jax import runs as runs_lib
from perl_jax.export import policy as export_policy
from perl_jax.models import quant
from perl_jax.rl import setup
from perl_jax.rl import train as rl_train
from perl_jax.export.policy import adapter_sets
from tests.conftest import ROOT
from tests.helpers import tiny_rm_and_sft_runs

from experiments.rl import smollm2 as rl_configs  # noqa: E402

QUANT = dict(quant="nf4", quant_block=16)  # The tiny model's kernels have 32 or 64 input rows.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """2-step LoRA SFT and RM runs on an nf4 base, then a 2-step RL run (REINFORCE + value) on it."""
  d = tiny_rm_and_sft_runs(tmp_path_factory.mktemp("quant_stages"), model=QUANT,
                           optim=dict(lr=0.05, warmup_steps=1))
  c = rl_configs.get_config("tm4_lora")
  c.model.update(**QUANT)
  c.reward_workdir, c.sft_workdir, c.data.path = str(d / "rm"), str(d / "sft"), str(d / "tm4.jsonl")
  c.data.update(batch_size=8, max_prompt_len=48, eval_fraction=0.5)
  c.rl.update(max_new_tokens=6, value_warmup_steps=0)
  c.optim.update(lr=0.05, warmup_steps=1)
  c.update(steps=2, log_every=1, checkpoint_every=2, eval_prompts=4)
  _, ev = rl_train.train(c, d / "rl")
  return d, ev


def _export(workdir, out, fmt):
  r = subprocess.run([sys.executable, "scripts/export.py", "--workdir", str(workdir), "--out", str(out), "--format",
                      fmt], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]


def test_sft_and_rm_restore_onto_the_quantized_base_and_checkpoint_adapters_only(runs):
  d, _ = runs
  rm, pol = trained.restore_reward(d / "rm"), trained.restore_policy(d / "sft")
  for run, keys in ((rm, {"lora", "head"}), (pol, {"lora"})):
    assert quant.base_kind(run.frozen) == "nf4" and set(run.trainable) == keys
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(run.trainable))
    assert all(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(run.trainable["lora"]))
  ckpt = sum(f.stat().st_size for f in (d / "rm" / "checkpoints").rglob("*") if f.is_file())
  assert ckpt < quant.tree_bytes(rm.frozen)  # adapters, head and optimizer state; never the base


def test_rl_on_an_nf4_base_holds_every_role_on_it_and_evaluates(runs):
  d, ev = runs
  assert {"reward_diff", "kl", "win_rate"} <= set(ev) and np.isfinite(ev["reward_diff"])
  lines = [json.loads(x) for x in (d / "rl" / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines if "train/loss" in x] == [1, 2]
  assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)
  policy = setup.restore(d / "rl")
  assert quant.base_kind(policy.frozen["base"]) == "nf4" and policy.frozen["sft"] is not None
  assert set(policy.trainable) == {"policy", "value"}
  assert not any(quant.is_quantized(x) for x in jax.tree.leaves(policy.trainable, is_leaf=quant.is_quantized))


def test_merged_rm_export_dequantizes_and_matches_transformers(runs):
  """The merged RM export is the nf4 base dequantized plus the merged LoRA: transformers' scores on it equal ours
  on the quantized base with the adapter unmerged."""
  from transformers import AutoModelForSequenceClassification
  import torch
  d, _ = runs
  _export(d / "rm", d / "rm_merged", "merged")
  rm = trained.restore_reward(d / "rm")
  config = json.loads((d / "rm_merged" / "config.json").read_text())
  model = AutoModelForSequenceClassification.from_pretrained(d / "rm_merged").eval()
  ids = np.random.default_rng(0).integers(3, 1000, size=(3, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  ours = np.asarray(trained.scores(rm.model_cfg, rm.stage, rm.trainable, rm.frozen, ids, mask))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits[:, 0].double().numpy()
  np.testing.assert_allclose(theirs + config["perl_reward_bias"], ours, atol=1e-4)
  float_base = models.load_pretrained(str(d / "model"))[1]  # the float base the nf4 codes round
  plain = trained.scores(rm.model_cfg, rm.stage, rm.trainable, float_base, ids, mask)
  assert np.abs(np.asarray(plain) - ours).max() > 1e-4


def test_policy_exports_on_an_nf4_base(runs):
  """Merged: transformers' logits equal the nf4 policy's (SFT + policy adapters on the quantized base). PEFT: the
  adapter is unchanged and its record says it was trained on an nf4 base."""
  import torch
  import transformers
  d, _ = runs
  policy = setup.restore(d / "rl")
  ids = np.random.default_rng(1).integers(3, 1000, size=(2, 12)).astype(np.int32)
  ours = np.asarray(models.forward(policy.model_cfg, policy.frozen["base"], ids, None,
                                   adapters=adapter_sets(policy)).logits)
  _export(d / "rl", d / "policy_merged", "merged")  # The CLI once; PEFT in process.
  export_policy.export_peft(policy, d / "policy_peft", runs_lib.model_path(policy.config.model))
  merged = transformers.AutoModelForCausalLM.from_pretrained(d / "policy_merged").eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy(), ours, atol=2e-4)
  record = json.loads((d / "policy_peft" / "perl_export.json").read_text())
  assert record["trained_on_quant"] == "nf4" and record["trained_on_quant_block"] == 16
  sft_run = trained.restore_policy(d / "sft")
  sft_ours = models.forward(sft_run.model_cfg, sft_run.frozen, ids, None,
                            adapters=[(sft_run.trainable["lora"], lora.scale(sft_run.stage.lora_cfg))]).logits
  merged_sft = trained.merged_policy(sft_run.stage, sft_run.trainable, sft_run.frozen, sft_run.frozen)
  assert quant.base_kind(merged_sft) == "none"
  np.testing.assert_allclose(np.asarray(models.forward(sft_run.model_cfg, merged_sft, ids, None).logits),
                             np.asarray(sft_ours), atol=2e-4)
