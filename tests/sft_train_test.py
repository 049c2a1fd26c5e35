"""SFT runs over the shared loop: held-out loss goes down, a resumed run is bit-identical, the run folder restores,
the CLI fails with one line on bad data."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from perl_jax import checkpoint, data, runs, sft, trained
from tests.conftest import ROOT, bare_env
from tests.helpers import head_lines, make_tiny_hf_folder

sys.path.insert(0, str(ROOT))
from experiments.sft import smollm2  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_sft")
  make_tiny_hf_folder(d / "model")
  head_lines(ROOT / "experiments/data/taskmaster4/dialogs.jsonl.gz", d / "tm4.jsonl", 32)
  head_lines(ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz", d / "hh.jsonl", 32)
  return d


def _config(tiny, arg="tm4_lora", **over):
  c = smollm2.get_config(arg)
  c.model.path = str(tiny / "model")
  c.data.path = str(tiny / ("tm4.jsonl" if arg.startswith("tm4") else "hh.jsonl"))
  c.data.update(max_len=96, batch_size=8, eval_batch_size=8, eval_fraction=0.25)
  c.update(steps=6, log_every=2, eval_every=3, checkpoint_every=2, keep_checkpoints=3)
  c.optim.update(warmup_steps=2, lr=1e-2 if c.mode == "lora" else 1e-3)
  c.update(over)
  return c


def _eval(cfg, trainable, frozen, eval_arrays, model_cfg, scfg):
  from perl_jax import sharding
  mesh = sharding.make_mesh(-1, 1, 1)
  sums = jax.jit(lambda tr, fr, b: sft.masked_sums(sft.logits(model_cfg, scfg, tr, fr, b["input_ids"],
                                                                b["attention_mask"]), b))
  return sft.evaluate(sums, trainable, frozen, eval_arrays, cfg.data.eval_batch_size, mesh)


@pytest.mark.parametrize("arg", ["tm4_lora", "hh_full"])
def test_training_lowers_held_out_loss_and_restores(tiny, tmp_path, arg):
  cfg = _config(tiny, arg, steps=8, eval_every=8)
  state, ev = sft.train(cfg, tmp_path / "run")
  run = trained.restore_policy(tmp_path / "run")
  assert run.step == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               run.trainable, state["trainable"])
  scfg = trained.policy_config(cfg)
  model_cfg, base, tok = runs.load_model(cfg.model)
  _, eval_arrays, info = sft.load_data(cfg, tok)
  assert info["eval_examples"] > 0 and info["train_examples"] + info["eval_examples"] == 32
  start = trained.init_policy(jax.random.key(cfg.seed), scfg, base)
  before = _eval(cfg, start, trained.policy_frozen(scfg, base), eval_arrays, model_cfg, scfg)
  after = _eval(cfg, run.trainable, run.frozen, eval_arrays, model_cfg, scfg)
  assert after["loss"] < before["loss"] - 0.1, (before, after)
  assert after["num_tokens"] == before["num_tokens"] == int(eval_arrays["loss_mask"][:, 1:].sum())
  np.testing.assert_allclose(after["loss"], ev["loss"], rtol=1e-5)
  np.testing.assert_allclose(ev["perplexity"], np.exp(ev["loss"]), rtol=1e-6)
  run = json.loads((tmp_path / "run" / "run.json").read_text())
  assert run["config"]["data"]["format"] == cfg.data.format and run["data"]["eval_examples"] == info["eval_examples"]


@pytest.mark.parametrize("arg", ["tm4_lora", "hh_full"])
def test_resumed_run_is_bit_identical(tiny, tmp_path, arg):
  cfg = _config(tiny, arg)
  full_state, full_eval = sft.train(cfg, tmp_path / "a")
  sft.train(cfg, tmp_path / "b", stop_after=3)
  assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 3
  resumed_state, resumed_eval = sft.train(cfg, tmp_path / "b")
  assert int(resumed_state["step"]) == int(full_state["step"]) == 6
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), full_state, resumed_state)
  np.testing.assert_equal(full_eval, resumed_eval)
  lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "train/loss" in l] == [2, 4, 6]
  assert [l["step"] for l in lines if "eval/loss" in l] == [3, 6]


def test_bad_line_stops_before_writing(tiny, tmp_path):
  lines = (tiny / "tm4.jsonl").read_text().splitlines()
  rec = json.loads(lines[4])
  rec["utterances"][0]["speaker"] = "agent"
  lines[4] = json.dumps(rec)
  bad = tmp_path / "bad.jsonl"
  bad.write_text("\n".join(lines) + "\n")
  cfg = _config(tiny)
  cfg.data.update(path=str(bad), skip_invalid=False)
  with pytest.raises(data.DataError) as e:
    sft.train(cfg, tmp_path / "run")
  assert str(e.value).startswith(f"{bad}:5: field 'utterances[0].speaker'") and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_template_without_stable_prefixes_is_one_config_error(tiny, tmp_path):
  import shutil
  from perl_jax import models
  model = shutil.copytree(tiny / "model", tmp_path / "model")
  (model / "chat_template.jinja").write_text(  # marks the last turn: earlier renders are not prefixes
      "{% for m in messages %}{{ m['role'] + ('!' if loop.last else '') + ': ' + m['content'] + eos_token }}"
      "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  cfg = _config(tiny, "hh_lora")
  cfg.model.path = str(model)
  with pytest.raises(models.ConfigError, match=f"^{model}: tokenizer: chat template is not prefix-stable"):
    sft.train(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_cli_runs_and_fails_with_one_line(tiny, tmp_path):
  args = ["--config", str(ROOT / "experiments/sft/smollm2.py:hh_lora"), "--workdir", str(tmp_path / "run"),
          f"--config.model.path={tiny / 'model'}", "--config.data.max_len=64", "--config.data.batch_size=8",
          "--config.data.eval_batch_size=8", "--config.steps=2", "--config.eval_every=2",
          "--config.data.eval_fraction=0.25"]
  env = bare_env(PYTHONPATH=str(ROOT))
  ok = subprocess.run([sys.executable, "scripts/train_sft.py", *args, f"--config.data.path={tiny / 'hh.jsonl'}"],
                      cwd=ROOT, env=env, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert checkpoint.Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 2
  assert {"loss", "accuracy", "perplexity"} <= set(json.loads((tmp_path / "run" / "eval.json").read_text()))
  missing = tmp_path / "nope.jsonl"
  r = subprocess.run([sys.executable, "scripts/train_sft.py", *args, "--workdir", str(tmp_path / "run2"),
                      f"--config.data.path={missing}"], cwd=ROOT, env=env, capture_output=True, text=True)
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and err == [f"error: {missing}: no such file"], r.stderr[-2000:]
