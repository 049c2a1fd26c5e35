"""Tiny model configs shared by tests."""
import functools
import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

from perl_jax import models


def tiny_config(family="llama", **overrides) -> models.ModelConfig:
  """A 2-layer model whose dims divide a 2x2x2 mesh."""
  kw = dict(family=family, vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family.startswith("gemma"):
    kw.update(norm_plus_one=True, sandwich_norm=True, scale_embeddings=True, activation="gelu_tanh",
              tie_embeddings=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4,
              sliding_layers=(True, False))
  kw.update(overrides)
  return models.ModelConfig(**kw)


def random_batch(seed, batch, seq, vocab, left_pad=()):
  """Token ids and a mask with the given per-row numbers of left-pad tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  for row, n in enumerate(left_pad):
    mask[row, :n] = 0
    ids[row, :n] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def make_tiny_hf_folder(folder, seed=0):
  """A 2-layer Llama saved by transformers (safetensors) with the real SmolLM2 tokenizer beside it."""
  import torch
  import transformers
  hf_cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
  torch.manual_seed(seed)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder, safe_serialization=True)
  models.load_tokenizer(models.default_model_path()).save_pretrained(folder)
  return folder


def head_lines(src, dst, n, start=0):
  """Copies lines [start, start+n) of a (gzipped) JSONL file into a plain file."""
  import gzip
  opener = gzip.open if str(src).endswith(".gz") else open
  with opener(src, "rt") as f:
    lines = f.readlines()[start:start + n]
  with open(dst, "w") as f:
    f.writelines(lines)
  return dst

def tiny_rm_and_sft_runs(d, model: dict | None = None, optim: dict | None = None):
  """In folder d: a tiny HF model (d/model), 48 Taskmaster-4 RM lines and 16 of its dialogs, a 2-step LoRA RM run
  (d/rm) and a 2-step LoRA SFT run (d/sft), with `model` / `optim` config fields set on both. Returns d."""
  from perl_jax import reward, sft
  from experiments.rm import smollm2 as rm_configs
  from experiments.sft import smollm2 as sft_configs
  root = pathlib.Path(__file__).resolve().parents[1]
  d = pathlib.Path(d)
  make_tiny_hf_folder(d / "model")
  head_lines(root / "experiments/data/taskmaster4/reward.jsonl.gz", d / "tm4.jsonl", 48)
  head_lines(root / "experiments/data/taskmaster4/dialogs.jsonl.gz", d / "dialogs.jsonl", 16)
  for name, configs, path in (("rm", rm_configs, "tm4.jsonl"), ("sft", sft_configs, "dialogs.jsonl")):
    c = configs.get_config("tm4_lora")
    c.model.update(path=str(d / "model"), **(model or {}))
    c.data.path = str(d / path)
    c.data.update(max_len=64, batch_size=8, eval_batch_size=8, eval_fraction=0.25)
    if name == "rm":
      c.data.min_prompt_tokens = 16
    c.optim.update(optim or {})
    c.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    (reward if name == "rm" else sft).train(c, d / name)
  return d



def run_two_hosts(script_text: str, tmp_path, *args, timeout: int = 400):
  """Runs `script_text` as processes 0 and 1 (argv: process id, coordinator port, *args) from the repo root,
  without the parent's fake-device flag; fails with both logs' tails if either exits non-zero."""
  import os
  import pathlib
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = pathlib.Path(tmp_path) / "worker.py"
  script.write_text(script_text)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  root = pathlib.Path(__file__).resolve().parents[1]
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), *map(str, args)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]


_SCRIPT_FLAGS: dict[str, set] = {}  # Global absl flags each loaded script defined.


@functools.cache
def load_script(name: str):
  """scripts/NAME.py as a module, loaded once per process. Scripts define their flags on absl's global FLAGS, and
  two scripts may both define e.g. --model: the flags the scripts loaded before defined are removed first (a test
  uses one script's flags at a time), so loading a second script in the same pytest worker does not fail."""
  from absl import flags
  for names in _SCRIPT_FLAGS.values():
    for flag in names & set(flags.FLAGS):
      delattr(flags.FLAGS, flag)
  before = set(flags.FLAGS)
  path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  _SCRIPT_FLAGS[name] = set(flags.FLAGS) - before
  return module
