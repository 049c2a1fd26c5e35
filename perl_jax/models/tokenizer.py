"""Tokenizer through Hugging Face tokenizers: from a model folder, or built from a GGUF file's metadata.

A GGUF carries no tokenizer.json, only llama.cpp metadata (vocabulary, merges, token types, special token ids,
chat template). For byte-level BPE vocabularies (`tokenizer.ggml.model` = "gpt2": SmolLM2, Llama 3, Qwen) we
rebuild exactly what transformers' GGUF converter (transformers/integrations/gguf/gguf_tokenizer_mapping.py)
builds, reading the metadata with the `gguf` package, so no PyTorch is needed. Other vocabulary types go
through transformers' own GGUF path, which imports PyTorch.
"""
import importlib.util
import pathlib

from perl_jax.models import cache, hub
from perl_jax.models.config import ConfigError

# llama.cpp token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' GGUF_PRE_TOKENIZER_SPLITS);
# any other value ("smollm", "gpt2", ...) keeps GPT-2's own ByteLevel regex.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}
_GPT2_DEFAULT_SPECIAL = "<|endoftext|>"


def load_tokenizer(path, revision: str = ""):
  """An HF tokenizer for a model folder, a .gguf file or a Hub id (hub.resolve); pad defaults to eos when the model
  has none."""
  path = hub.resolve(path, revision)
  if not path.exists():
    raise ConfigError(f"{path}: no such file or folder")
  tok = _from_gguf(path) if path.suffix == ".gguf" else _from_folder(path)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


def _from_folder(path: pathlib.Path):
  """An HF model folder's own tokenizer files (tokenizer.json etc.)."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot build a tokenizer ({str(e).splitlines()[0]})") from None


def _from_gguf(path: pathlib.Path):
  """Byte-level BPE built here from the metadata; other vocabulary types through transformers. Kept in the model
  cache (models.cache), from which later loads of the same file read it."""
  cached = cache.tokenizer_folder(path)
  if cached is not None:
    return _from_folder(cached)
  tok = _build_from_gguf(path)
  cache.save_tokenizer(path, tok)
  return tok


def _build_from_gguf(path: pathlib.Path):
  meta = gguf_tokenizer_metadata(path)
  kind = meta.get("tokenizer.ggml.model")
  if kind == "gpt2":
    return byte_level_tokenizer(meta, where=str(path))
  return _from_gguf_via_transformers(path, kind)


def gguf_tokenizer_metadata(path) -> dict:
  """The `tokenizer.*` metadata of a GGUF file as Python values (strings, ints, bools, lists)."""
  import gguf
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # noqa: BLE001 - gguf raises assorted errors for corrupt files.
    raise ConfigError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                      ) from None
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("tokenizer."):
      try:
        out[name] = field.contents()
      except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: field '{name}' cannot be decoded ({e})") from None
  if "tokenizer.ggml.tokens" not in out:
    raise ConfigError(f"{path}: field 'tokenizer.ggml.tokens' is missing: the file carries no tokenizer")
  return out


def tokenizer_config(meta: dict, where: str) -> dict:
  """Keyword arguments of the transformers tokenizer: special tokens, chat template, add_bos/add_eos."""
  tokens = meta["tokenizer.ggml.tokens"]
  cfg = {}
  for key in ("chat_template", "ggml.add_bos_token", "ggml.add_eos_token"):
    if f"tokenizer.{key}" in meta:
      cfg[key.removeprefix("ggml.")] = meta[f"tokenizer.{key}"]
  for name, key in _SPECIAL_IDS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= token_id < len(tokens):
      raise ConfigError(f"{where}: field 'tokenizer.ggml.{key}': id {token_id} outside the vocabulary "
                        f"of {len(tokens)} tokens")
    cfg[name] = tokens[token_id] if token_id is not None else None
  return cfg


def byte_level_vocab(tokens: list[str]) -> dict[str, int]:
  """token -> id, with tokens not already spelled in GPT-2's byte alphabet re-spelled byte by byte."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  return {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
          for i, t in enumerate(tokens)}


def bpe_merges(meta: dict, vocab: dict[str, int]) -> list[tuple[str, ...]]:
  """The merges the file lists, or the ones its vocabulary and scores imply."""
  if "tokenizer.ggml.merges" in meta:
    return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  from transformers.tokenization_utils_base import generate_merges
  tokens = meta["tokenizer.ggml.tokens"]
  return generate_merges(vocab, dict(zip(tokens, meta.get("tokenizer.ggml.scores") or range(len(tokens)))))


def special_added_tokens(meta: dict, vocab: dict[str, int]):
  """(control tokens as special AddedTokens, user-defined tokens in the vocabulary as plain AddedTokens).

  A control token spelled outside the byte alphabet is a llama.cpp mislabel and is skipped, as transformers does.
  """
  from tokenizers import AddedToken
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  alphabet = set(bytes_to_unicode().values())
  typed = list(zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()))
  control = [AddedToken(t, normalized=False, special=True) for t, k in typed if k == CONTROL and set(t) <= alphabet]
  user = [AddedToken(t, normalized=False, special=False) for t, k in typed if k == USER_DEFINED and t in vocab]
  return control, user


def byte_level_backend(meta: dict, vocab: dict[str, int]):
  """The `tokenizers.Tokenizer` GPT-2 style: BPE model, ByteLevel pre-tokenizer (or the file's split regex)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
  from tokenizers.models import BPE
  backend = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(meta, vocab), dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
  backend.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                           pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)]))
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
  # transformers' GPT2Tokenizer registers its default special token before the file's own ones.
  backend.add_special_tokens([AddedToken(_GPT2_DEFAULT_SPECIAL, normalized=False, special=True)])
  control, user = special_added_tokens(meta, vocab)
  backend.add_special_tokens(control)
  backend.add_tokens(user)
  return backend


def byte_level_tokenizer(meta: dict, where: str = "gguf"):
  """A transformers fast tokenizer for a "gpt2" (byte-level BPE) GGUF vocabulary, without PyTorch."""
  from transformers import PreTrainedTokenizerFast
  vocab = byte_level_vocab(meta["tokenizer.ggml.tokens"])
  try:
    backend = byte_level_backend(meta, vocab)
  except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for inconsistent merges.
    raise ConfigError(f"{where}: cannot build the BPE tokenizer ({str(e).splitlines()[0]})") from None
  return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=where,
                                 **tokenizer_config(meta, where))


def _from_gguf_via_transformers(path: pathlib.Path, kind):
  """Vocabulary types other than byte-level BPE (llama SPM, t5, ...): transformers' GGUF path (needs PyTorch)."""
  if importlib.util.find_spec("torch") is None:
    raise ConfigError(f"{path}: tokenizer.ggml.model '{kind}' needs transformers' GGUF converter, which needs "
                      "PyTorch (the test extras): pip install -r requirements-test.txt")
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot build a tokenizer ({str(e).splitlines()[0]})") from None
