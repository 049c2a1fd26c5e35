"""Tokenizer through Hugging Face tokenizers: from a model folder, or built from a GGUF file's metadata."""
import pathlib

from perl_jax.models.config import ConfigError


def load_tokenizer(path):
  """An HF tokenizer for a model folder or a .gguf file; pad defaults to eos when the model has none."""
  from transformers import AutoTokenizer
  path = pathlib.Path(path)
  if not path.exists():
    raise ConfigError(f"{path}: no such file or folder")
  try:
    if path.suffix == ".gguf":
      tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    else:
      tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot build a tokenizer ({str(e).splitlines()[0]})") from None
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok
