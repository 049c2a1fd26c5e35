"""Offline eval and HF / PEFT export of a trained RM, checked against transformers + PEFT (torch) as oracles.

A tiny random Llama (SmolLM2 tokenizer) is saved as an HF folder, trained for 2 steps with reward.train on
a small Taskmaster-4 file (BCE, so the head bias moves off 0), then restored, evaluated and exported.
"""
import dataclasses
import json
import os
import runpy
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from perl_jax import data, lora, models, reward, stats, trained
from perl_jax.export import base as export_base, reward as export_reward
from tests.conftest import ROOT

WORDS = ("coffee tea latte espresso large small iced hot oat milk sugar please thanks order pickup time name "
         "table booking tonight tomorrow two four people window quiet menu price receipt").split()


def _text(rng, n):
  return " ".join(rng.choice(WORDS, size=n))


def _write_tm4(path, n, seed):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      context = [{"role": "agent", "text": "Welcome, what can I get you?"},
                 {"role": "user", "text": _text(rng, int(rng.integers(2, 12)))}]
      generation = {"role": "agent", "text": _text(rng, int(rng.integers(1, 10)))}
      f.write(json.dumps({"context": json.dumps(context), "generation": json.dumps(generation),
                          "reward": float(i % 2)}) + "\n")


def _write_hh(path, n, seed):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      prompt = f"\n\nHuman: {_text(rng, int(rng.integers(2, 10)))}\n\nAssistant:"
      f.write(json.dumps({"chosen": prompt + " " + _text(rng, int(rng.integers(1, 8))),
                          "rejected": prompt + " " + _text(rng, int(rng.integers(1, 8))) + " no"}) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("export")
  base = root / "base"
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
      eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
  lm = transformers.LlamaForCausalLM(hf_cfg)
  with torch.no_grad():
    for name, p in lm.named_parameters():
      if "norm" in name:
        p.normal_(1.0, 0.2)
  lm.save_pretrained(base)
  models.load_tokenizer(models.default_model_path()).save_pretrained(base)

  files = types.SimpleNamespace(train=root / "tm4_train.jsonl", eval=root / "tm4_eval.jsonl", hh=root / "hh.jsonl")
  _write_tm4(files.train, 16, 0)
  _write_tm4(files.eval, 12, 1)
  _write_hh(files.hh, 10, 2)
  config = runpy.run_path(str(ROOT / "experiments/rm/smollm2.py"))["get_config"]("tm4_lora")
  config.model.path = str(base)
  config.data.update(path=str(files.train), eval_path=str(files.eval), max_len=64, min_prompt_tokens=8,
                     batch_size=8, eval_batch_size=8)
  config.optim.update(lr=0.05, warmup_steps=1)
  config.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  workdir = root / "run"
  reward.train(config, str(workdir))
  rm = trained.restore_reward(workdir)
  host = types.SimpleNamespace(trainable=jax.device_get(rm.trainable), base=jax.device_get(rm.frozen))
  return types.SimpleNamespace(root=root, base=base, files=files, config=config, workdir=workdir, rm=rm, host=host)


def _encoded(run, fmt, path, with_truncated=False):
  arrays, num_truncated = reward.encode(fmt, data.read_examples(fmt, path), run.rm.tokenizer, run.config.data)
  return (arrays, num_truncated) if with_truncated else arrays


def _our_scores(run, ids, mask):
  rm = run.rm
  return np.asarray(trained.scores(rm.model_cfg, rm.stage, run.host.trainable, run.host.base, ids, mask))


def _hf_scores(model, ids, mask, pad_id):
  import torch
  ids = np.where(mask.astype(bool), ids, pad_id)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  return logits[:, 0].double().numpy()


def _cli(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
                        timeout=300)


def test_restore_gives_trained_state(run):
  assert run.rm.step == 2
  assert export_reward.head_bias(run.rm) != 0.0
  assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(run.host.trainable["lora"]))


def test_merged_export_matches_transformers(run):
  from transformers import AutoModelForSequenceClassification
  out = run.root / "merged"
  result = _cli("scripts/export.py", "--workdir", str(run.workdir), "--out", str(out), "--format", "merged")
  assert result.returncode == 0, result.stderr
  config = json.loads((out / "config.json").read_text())
  pad = config["pad_token_id"]
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  assert pad not in (2, None) and config["perl_reward_bias"] == pytest.approx(export_reward.head_bias(run.rm))
  model = AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert model.config.num_labels == 1
  arrays = _encoded(run, "taskmaster4", run.files.eval)
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  ours = _our_scores(run, ids, mask)
  np.testing.assert_allclose(_hf_scores(model, ids, mask, pad) + config["perl_reward_bias"], ours, atol=1e-4)

  from transformers import AutoTokenizer
  assert AutoTokenizer.from_pretrained(out).pad_token_id == pad


def test_merged_export_loads_in_perl_jax(run):
  out = run.root / "merged_inproc"
  export_reward.export_merged(run.rm, out)
  cfg, params = models.load_pretrained(out)
  rm = run.rm
  arrays = _encoded(run, "taskmaster4", run.files.eval)
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  lora_tree, scale = run.host.trainable["lora"], lora.scale(rm.stage.lora_cfg)
  loaded = models.forward(cfg, params, ids, mask).logits
  merged = models.forward(rm.model_cfg, lora.merge(run.host.base, lora_tree, scale), ids, mask).logits
  adapted = models.forward(rm.model_cfg, run.host.base, ids, mask, adapters=[(lora_tree, scale)]).logits
  np.testing.assert_allclose(loaded, merged, atol=1e-4)
  np.testing.assert_allclose(loaded, adapted, atol=1e-4)


def test_peft_export_matches_peft(run):
  from peft import PeftModel
  from transformers import AutoModelForSequenceClassification
  out = export_reward.export_peft(run.rm, run.root / "peft")
  adapter = json.loads((out / "adapter_config.json").read_text())
  assert adapter["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert (adapter["r"], adapter["lora_alpha"], adapter["task_type"]) == (4, 8, "SEQ_CLS")
  side = json.loads((out / export_reward.SIDE_FILE).read_text())
  base = AutoModelForSequenceClassification.from_pretrained(run.base, num_labels=1, pad_token_id=side["pad_token_id"])
  model = PeftModel.from_pretrained(base, out).eval()
  arrays = _encoded(run, "taskmaster4", run.files.eval)
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  np.testing.assert_allclose(_hf_scores(model, ids, mask, side["pad_token_id"]) + side["bias"],
                             _our_scores(run, ids, mask), atol=1e-4)


def test_peft_export_names_its_base_by_hub_id_and_loads_by_that_name(run, monkeypatch):
  """Restored against the base as an HF cache snapshot, the adapter names it "perl-test/tiny-llama" (no local path);
  AutoPeftModelForSequenceClassification then finds that base in the cache (offline) and gives our scores."""
  from huggingface_hub import constants as hf_constants
  from peft import AutoPeftModelForSequenceClassification
  cache = run.root / "hub"
  snapshot = cache / "models--perl-test--tiny-llama" / "snapshots" / ("c" * 40)
  shutil.copytree(run.base, snapshot)
  (snapshot.parents[1] / "refs").mkdir()
  (snapshot.parents[1] / "refs" / "main").write_text("c" * 40)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  rm = trained.restore_reward(run.workdir, model_path=str(snapshot))
  out = export_reward.export_peft(rm, run.root / "peft_hub")
  adapter = json.loads((out / "adapter_config.json").read_text())
  record = json.loads((out / "perl_export.json").read_text())
  assert adapter["base_model_name_or_path"] == record["base_model"] == "perl-test/tiny-llama"
  assert record["base_quantization"] is None  # A safetensors base: nothing was dequantized.
  side = json.loads((out / export_reward.SIDE_FILE).read_text())
  model = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1,
                                                                 pad_token_id=side["pad_token_id"]).eval()
  arrays = _encoded(run, "taskmaster4", run.files.eval)
  ids, mask = arrays["input_ids"], arrays["attention_mask"]
  np.testing.assert_allclose(_hf_scores(model, ids, mask, side["pad_token_id"]) + side["bias"],
                             _our_scores(run, ids, mask), atol=1e-4)


def test_embedded_gguf_base_is_named_by_its_hub_id_and_quantization():
  record = export_base.base_record(str(models.default_model_path()))
  assert record == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_file": models.SMOLLM2_GGUF,
                    "base_quantization": "Q4_1"}


def test_peft_export_refuses_full_mode(run):
  rm = dataclasses.replace(run.rm, stage=dataclasses.replace(run.rm.stage, mode="full"))
  with pytest.raises(models.ConfigError, match="merged"):
    export_reward.export_peft(rm, run.root / "peft_full")


def _expected_binary(run):
  arrays, num_truncated = _encoded(run, "taskmaster4", run.files.eval, with_truncated=True)
  r, y = _our_scores(run, arrays["input_ids"], arrays["attention_mask"]), arrays["label"]
  return {**stats.binary_metrics(r, y), **stats.roc_auc_ci(r, y), "loss": float(np.mean(np.logaddexp(0, r) - y * r)),
          "num_examples": 12,
          "num_truncated": num_truncated}


def _expected_pairwise(run):
  arrays, num_truncated = _encoded(run, "hh_rlhf", run.files.hh, with_truncated=True)
  n, two, t = arrays["input_ids"].shape
  r = _our_scores(run, arrays["input_ids"].reshape(-1, t), arrays["attention_mask"].reshape(-1, t)).reshape(n, 2)
  return {**stats.pairwise_metrics(r[:, 0], r[:, 1]), "num_examples": 10, "num_truncated": num_truncated}


@pytest.mark.parametrize("fmt,extra", [("binary", ()), ("pairwise", ("--format", "hh_rlhf", "--batch_size", "16"))])
def test_eval_reward_cli(run, fmt, extra):
  data_file = run.files.eval if fmt == "binary" else run.files.hh
  result = _cli("scripts/eval_reward.py", "--workdir", str(run.workdir), "--data", str(data_file), *extra)
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.strip().splitlines()) == 1
  got = json.loads(result.stdout)
  expected = _expected_binary(run) if fmt == "binary" else _expected_pairwise(run)
  assert set(got) == set(expected) | {"step", "format"}
  assert (got["step"], got["format"]) == (2, "taskmaster4" if fmt == "binary" else "hh_rlhf")
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_eval_reward_cli_missing_data(run):
  missing = run.root / "nope.jsonl"
  result = _cli("scripts/eval_reward.py", "--workdir", str(run.workdir), "--data", str(missing))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def test_compare_rms_scores_the_same_examples_in_their_order(run, tmp_path):
  """scripts/compare_rms.py: each RM's scores come back in the examples' own order (reward.score_all undoes its
  length buckets), equal to scoring row by row; a run against itself differs by exactly 0; a second RM (the head
  negated) is compared with the first example by example."""
  import shutil
  other = tmp_path / "negated"
  shutil.copytree(run.workdir, other)
  eval_json = run.files.eval
  out = tmp_path / "cmp.json"
  result = _cli("scripts/compare_rms.py", "--runs", str(run.workdir), "--runs", str(run.workdir), "--data",
                str(eval_json), "--split", "all", "--out", str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  got = json.loads(out.read_text())
  arrays = _encoded(run, "taskmaster4", eval_json)
  ours = _our_scores(run, arrays["input_ids"], arrays["attention_mask"])
  np.testing.assert_allclose(got["scores"][0], ours, atol=1e-5)
  np.testing.assert_array_equal(got["labels"], arrays["label"])
  second = got["runs"][1]
  assert (second["roc_auc_diff"], second["roc_auc_diff_lo"], second["roc_auc_diff_hi"]) == (0.0, 0.0, 0.0)
  assert got["runs"][0]["roc_auc"] == pytest.approx(stats.roc_auc(ours, arrays["label"]))
  result = _cli("scripts/compare_rms.py", "--runs", str(run.workdir), "--data", str(eval_json))
  assert result.returncode == 2 and "at least two" in result.stderr


def test_compare_rms_pair_accuracy_rows_by_hand():
  """compare_rms.compare on pairs: accuracy counts chosen > rejected (a tie is wrong), its interval is Wilson's in
  the textbook form (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), and the second run's difference is the
  paired bootstrap of the per-pair differences."""
  from tests.helpers import load_script
  a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 1.0]])  # right, wrong, tie (wrong), right: 2 of 4
  b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 1.0]])  # 3 of 4
  first, second = load_script("compare_rms").compare([a, b], None, "pairwise")
  z, n = 1.959963984540054, 4
  for row, p in ((first, 0.5), (second, 0.75)):
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert row["accuracy"] == p
    np.testing.assert_allclose([row["accuracy_lo"], row["accuracy_hi"]],
                               [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)], rtol=1e-12)
  d, lo, hi = stats.paired_bootstrap_ci(np.array([0.0, 1.0, 0.0, 0.0]))
  assert (second["accuracy_diff"], second["accuracy_diff_lo"], second["accuracy_diff_hi"]) == (d, lo, hi) and d == 0.25
  assert "accuracy_diff" not in first
