"""A base model named by a local path or by a Hugging Face Hub id ("org/name", optionally a revision), resolved to
a local folder: downloaded through `huggingface_hub` when online, or found in its local cache (HF_HUB_OFFLINE=1,
HF_HUB_CACHE / HF_HOME pick the cache). A path that exists is used as it is."""
import pathlib
import re

from perl_jax.models.config import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder needs: config, weights, tokenizer files (no PyTorch .bin, no other formats).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(name: str) -> bool:
  """"org/name" that is not a local path (nothing exists there, and it does not start with '.', '/' or '~')."""
  return bool(_HUB_ID.match(name)) and not pathlib.Path(name).exists()


def resolve(path, revision: str = "") -> pathlib.Path:
  """The local file or folder that `path` names: itself, or a Hub id's snapshot folder (weights as safetensors)."""
  name = str(path)
  if not is_hub_id(name):
    return pathlib.Path(name).expanduser()
  import huggingface_hub
  try:
    folder = huggingface_hub.snapshot_download(repo_id=name, revision=revision or None, allow_patterns=MODEL_FILES)
  except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds (offline, not found, auth, network).
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    at = f" (revision {revision})" if revision else ""
    raise ConfigError(f"{name}: no such local file or folder, and the Hub id{at} could not be resolved online or "
                      f"from the Hugging Face cache ({type(e).__name__}: {why})") from None
  return pathlib.Path(folder)
