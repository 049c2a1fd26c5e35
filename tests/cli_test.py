"""Bad input is one line and exit 2, reported before any model is loaded: every case below names a base model
that does not exist, so an error that came after loading would be that model's, not the one asserted."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from perl_jax import cli, data, errors, reward, sft
from perl_jax.rl import train as rl_train
from tests.conftest import bare_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
NO_MODEL = "/nonexistent/model.gguf"


def get_config(stage: str, arg: str):
  path = ROOT / "experiments" / stage / "smollm2.py"
  spec = importlib.util.spec_from_file_location(f"cfg_{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.model.path = NO_MODEL
  return config


def run_script(name: str, *args):
  env = bare_env(PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, f"scripts/{name}.py", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("script,args,want", [
    ("train_reward", ["--config", "experiments/rm/smollm2.py:tm4_lora", "--config.data.pathh=x"],
     "error: unknown config field 'pathh' (Did you mean \"path\" instead of \"pathh\"?)"),
    ("train_sft", ["--config", "experiments/sft/smollm2.py:hh"],
     "error: flag --config=experiments/sft/smollm2.py:hh: config argument 'hh': expected DATASET_MODE"),
    ("train_rl", ["--config", "experiments/rl/nope.py"],
     "error: flag --config: [Errno 2] No such file or directory: 'experiments/rl/nope.py'"),
    ("train_reward", ["--config", "experiments/rm/smollm2.py:tm4_lora", "--config.steps=ten"],
     "error: flag --config.steps=ten: invalid literal for int()"),
])
def test_flag_and_config_errors_are_one_line_exit_2(tmp_path, script, args, want):
  r = run_script(script, "--workdir", str(tmp_path / "run"), *args)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().count("\n") == 0 and r.stderr.strip().startswith(want), r.stderr[-2000:]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


STAGES = {"rm": (reward.train, "tm4_lora"), "sft": (sft.train, "tm4_lora"), "rl": (rl_train.train, "tm4_lora_rloo")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_input_errors_come_before_the_model(tmp_path, stage):
  """A missing data file, an unknown format or mode, and a data set smaller than one batch: each a one-line error
  naming the file and field, raised before the (missing) model is touched."""
  train, arg = STAGES[stage]
  small = write_jsonl(tmp_path / "small.jsonl", [
      {"prompt": f"question {i}", "chosen": "yes", "rejected": "no", "completion": "yes", "label": 1,
       "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(3)])
  generic = {"rm": "preference", "sft": "messages", "rl": "prompt"}[stage]
  cases = [
      ({"data.path": str(tmp_path / "missing.jsonl")}, f"{tmp_path / 'missing.jsonl'}: no such file"),
      ({"data.format": "trl"}, "unknown"),
      ({"mode": "qlora"}, "config: field 'mode': must be 'lora' or 'full', got 'qlora'"),
      ({"data.path": small, "data.format": generic, "data.batch_size": 8, "data.eval_fraction": 0.0},
       f"{small}: field 'data.batch_size': 3 training"),
  ]
  for overrides, want in cases:
    config = get_config(stage, arg)
    for key, value in overrides.items():
      node, _, field = key.rpartition(".")
      (config[node] if node else config)[field] = value
    with pytest.raises((errors.DataError, errors.ConfigError)) as e:
      train(config, tmp_path / f"run_{stage}")
    assert want in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    assert NO_MODEL not in str(e.value)


def test_flag_error_line_unwraps_ml_collections_errors():
  key_error = AttributeError(KeyError("'lr'\nDid you mean \"lr\" instead of \"lrr\"?"))
  assert cli.flag_error_line(key_error) == "unknown config field 'lr' (Did you mean \"lr\" instead of \"lrr\"?)"
  assert cli.flag_error_line(ValueError("a\n  b")) == "a b"
  assert data.PROMPT_FORMATS and "preference" in data.SFT_FORMATS


def test_two_scripts_defining_the_same_flag_load_in_one_test_process():
  """quant_error.py and generate.py both define --model on absl's global FLAGS; loading both in one pytest worker
  failed with DuplicateFlagError (train_rl_test after quant_test under --dist loadfile)."""
  from tests.helpers import load_script
  assert load_script("quant_error") is not None and load_script("generate") is not None
