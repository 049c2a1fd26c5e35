"""Our torch-free GGUF tokenizer against transformers' own GGUF converter (the oracle, which needs PyTorch)."""
import json
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT
from perl_jax import data, models
from perl_jax.models import tokenizer as tokenizer_lib

TM4 = ROOT / "experiments/data/taskmaster4/reward.jsonl.gz"
HH = ROOT / "experiments/data/hh-rlhf-harmless/pairs.jsonl.gz"
N_RECORDS = 80
EDGE_CASES = ["", " ", "  two  spaces ", "\n\n\tTabs\r\nand CRLF", "naïve café 日本語 😀👍🏽",
              "1234567 3.14159", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><repo_name>x</s><s>",
              "don't I'll we've", "ⅷ ﬁ Ｆｕｌｌ", "\u200b\u00a0zero width", "x" * 300]


@pytest.fixture(scope="module")
def model_path():
  path = models.default_model_path()
  if not path.exists():
    pytest.skip(f"{path} not installed")
  return path


@pytest.fixture(scope="module")
def ours(model_path):
  return models.load_tokenizer(model_path)


@pytest.fixture(scope="module")
def oracle(model_path):
  pytest.importorskip("torch")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name, local_files_only=True)


@pytest.fixture(scope="module")
def examples():
  """Parsed TM-4 (binary) and HH-RLHF (pairwise) examples from the shipped data."""
  tm4 = [ex for _, ex in zip(range(N_RECORDS), data.read_taskmaster4(TM4, skip_invalid=True))]
  hh = [ex for _, ex in zip(range(N_RECORDS), data.read_hh_rlhf(HH, skip_invalid=True))]
  return tm4, hh


@pytest.fixture(scope="module")
def texts(examples):
  """A few hundred raw strings: TM-4 context/generation JSON and HH chosen texts as shipped, parsed replies."""
  raw = []
  for path, fields in ((TM4, ("context", "generation")), (HH, ("chosen",))):
    for _, (_, line) in zip(range(N_RECORDS), data.files.iter_lines(path)):
      record = json.loads(line)
      raw += [record[f] for f in fields]
  tm4, hh = examples
  return raw + [ex["response"] for ex in tm4] + [ex["chosen"] for ex in hh] + EDGE_CASES


def _ids(encoded):
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_ids_match_transformers_gguf_on_shipped_text(ours, oracle, texts):
  assert len(texts) >= 300
  got, want = ours(texts)["input_ids"], oracle(texts)["input_ids"]
  mismatched = [t[:60] for t, g, w in zip(texts, got, want) if g != w]
  assert not mismatched, f"{len(mismatched)} of {len(texts)} texts tokenize differently, e.g. {mismatched[:3]}"
  assert sum(map(len, got)) > 30_000  # real text, not a handful of tokens


def test_chat_templated_prompts_match(ours, oracle, examples):
  prompts = [ex["prompt"] for ex in examples[0] + examples[1] if ex["prompt"]]
  assert len(prompts) >= 100
  for prompt in prompts:
    got = _ids(ours.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    want = _ids(oracle.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    assert got == want, prompt
  text = ours.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
  assert got[0] == ours.bos_token_id == ours.convert_tokens_to_ids("<|im_start|>")


def test_decode_round_trip(ours, oracle, texts):
  for text in texts:
    ids = ours(text)["input_ids"]
    assert ours.decode(ids) == text
    assert ours.decode(ids) == oracle.decode(ids)
  reply = ours("<|im_start|>assistant\nSure.<|im_end|>")["input_ids"]
  assert ours.decode(reply, skip_special_tokens=True) == oracle.decode(reply, skip_special_tokens=True) \
      == "assistant\nSure."


def test_special_tokens_and_chat_template_match(ours, oracle):
  for name in ("bos", "eos", "pad", "unk"):
    assert getattr(ours, f"{name}_token") == getattr(oracle, f"{name}_token")
    assert getattr(ours, f"{name}_token_id") == getattr(oracle, f"{name}_token_id")
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 2, 2, 0)
  assert ours.chat_template == oracle.chat_template and "<|im_start|>" in ours.chat_template
  assert ours.all_special_ids == oracle.all_special_ids
  assert ours.added_tokens_decoder == oracle.added_tokens_decoder and len(ours.added_tokens_decoder) == 17
  assert len(ours) == len(oracle) == 49152
  assert ours.add_bos_token == oracle.add_bos_token is False


def test_backend_and_saved_folder_match(ours, oracle, tmp_path):
  assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(oracle.backend_tokenizer.to_str())
  ours.save_pretrained(tmp_path / "ours")
  oracle.save_pretrained(tmp_path / "oracle")
  for name in ("tokenizer.json", "chat_template.jinja"):
    assert (tmp_path / "ours" / name).read_text() == (tmp_path / "oracle" / name).read_text()
  reloaded = models.load_tokenizer(tmp_path / "ours")
  assert reloaded("Hello there <|im_end|>")["input_ids"] == ours("Hello there <|im_end|>")["input_ids"]


def test_pre_tokenizer_splits_match_transformers_table():
  pytest.importorskip("torch")
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
  assert tokenizer_lib.PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


# ------------------------------------------------------------------ synthetic GGUFs (written with gguf)


def _gguf_type(value):
  import gguf
  T = gguf.GGUFValueType
  if isinstance(value, list):
    return (T.ARRAY, T.STRING if isinstance(value[0], str) else T.INT32)
  return (T.STRING,) if isinstance(value, str) else (T.BOOL,) if isinstance(value, bool) else (T.UINT32,)


def _write_gguf(path, fields: dict):
  """A tensor-free GGUF holding `fields` (str, bool, int, list of str or int)."""
  import gguf
  writer = gguf.GGUFWriter(str(path), arch=fields.pop("general.architecture", "llama"))
  for name, value in fields.items():
    writer.add_key_value(name, value, *_gguf_type(value))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


def _tiny_fields(**changes):
  fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab"],
            "tokenizer.ggml.token_type": [3, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.eos_token_id": 0}
  fields.update(changes)
  return {k: v for k, v in fields.items() if v is not None}


def test_split_pre_tokenizer_and_user_tokens_match_transformers(model_path, tmp_path):
  """A Llama-3 style file: 'llama-bpe' split regex, no <|endoftext|> in the vocabulary, a user-defined token."""
  pytest.importorskip("torch")
  import gguf
  from transformers import AutoTokenizer
  reader = gguf.GGUFReader(str(model_path))
  fields = {name: reader.fields[name].contents() for name in reader.fields
            if name.startswith(("tokenizer.", "llama.", "general.architecture"))}
  fields["tokenizer.ggml.tokens"][0] = "<|begin_of_text|>"
  fields["tokenizer.ggml.tokens"].append("<think>")
  fields["tokenizer.ggml.token_type"].append(tokenizer_lib.USER_DEFINED)
  fields["tokenizer.ggml.pre"] = "llama-bpe"
  fields = {k: v for k, v in fields.items() if not isinstance(v, float)}  # _write_gguf has no float type
  path = _write_gguf(tmp_path / "llama3ish.gguf", fields)
  ours = models.load_tokenizer(path)
  oracle = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name, local_files_only=True)
  assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(oracle.backend_tokenizer.to_str())
  text = "In 2024, 1234567 people said <think>hmm</think> <|begin_of_text|>don't   stop\n\n"
  assert ours(text)["input_ids"] == oracle(text)["input_ids"]
  assert ours.convert_tokens_to_ids("<think>") == 49152
  assert ours.convert_tokens_to_ids("<|endoftext|>") == 49153  # added past the vocabulary, as GPT-2's class does


def test_tiny_gguf_builds_a_working_tokenizer(tmp_path):
  tok = models.load_tokenizer(_write_gguf(tmp_path / "tiny.gguf", _tiny_fields()))
  assert tok("abab<|endoftext|>a")["input_ids"] == [3, 3, 0, 1]
  assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.bos_token is None


@pytest.mark.parametrize("name,changes,problem", [
    ("notok", {"tokenizer.ggml.tokens": None}, r"field 'tokenizer\.ggml\.tokens' is missing"),
    ("oob", {"tokenizer.ggml.eos_token_id": 7}, r"field 'tokenizer\.ggml\.eos_token_id': id 7 outside"),
    ("badmerge", {"tokenizer.ggml.merges": ["a c"]}, r"cannot build the BPE tokenizer \(.*out of vocabulary"),
])
def test_bad_files_name_the_file(tmp_path, name, changes, problem):
  path = _write_gguf(tmp_path / f"{name}.gguf", _tiny_fields(**changes))
  with pytest.raises(models.ConfigError, match=f"^{tmp_path}/{name}\\.gguf: {problem}"):
    models.load_tokenizer(path)


def test_not_a_gguf_names_the_file(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf at all")
  with pytest.raises(models.ConfigError, match=r"bad\.gguf: not a readable GGUF file"):
    models.load_tokenizer(bad)


_NO_TORCH = """
import sys
for name in ("torch", "peft", "accelerate"):
  sys.modules[name] = None  # `import torch` fails and find_spec says absent, as in a runtime-only venv
import tempfile
from perl_jax import models
for path in sys.argv[1:]:
  try:
    tok = models.load_tokenizer(path)
  except models.ConfigError as e:
    print("ConfigError:", e)
    continue
  ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
  tok.save_pretrained(tempfile.mkdtemp())
  print("ok", list(ids["input_ids"] if hasattr(ids, "keys") else ids))
"""


def test_runtime_needs_no_torch_and_names_the_extra_otherwise(model_path, ours, tmp_path):
  """In a process where torch/peft/accelerate cannot be imported: the embedded GGUF works end to end, and a
  sentencepiece ("llama") vocabulary, which only transformers' converter builds, fails in one line."""
  spm = _write_gguf(tmp_path / "spm.gguf", _tiny_fields(**{"tokenizer.ggml.model": "llama"}))
  proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(model_path), str(spm)], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  want = _ids(ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                       tokenize=True))
  assert proc.stdout.splitlines() == [
      f"ok {want}",
      f"ConfigError: {spm}: tokenizer.ggml.model 'llama' needs transformers' GGUF converter, which needs PyTorch "
      "(the test extras): pip install -r requirements-test.txt"]
