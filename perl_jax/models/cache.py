"""A disk cache of what is slow to rebuild from a GGUF file: its dequantized float32 tensors with its config, and its
tokenizer. Every script that loads the embedded SmolLM2 GGUF otherwise spends seconds dequantizing it and building
its BPE tokenizer from the metadata.

An entry is keyed by the file (resolved path, size, modification time) and by the source of the modules that build
it (loading, tokenizer, config), so a changed file or a changed loader never reads a stale entry. Location:
$PERL_JAX_CACHE, else $XDG_CACHE_HOME/perl_jax, else ~/.cache/perl_jax; PERL_JAX_CACHE=off turns it off. A write
goes to a temporary folder renamed into place, so readers never see half an entry; a failed write logs a warning
and changes nothing else.
"""
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np

log = logging.getLogger("perl_jax")
_SOURCES = ("loading.py", "tokenizer.py", "config.py")
MAX_PARAM_BYTES = 4 << 30  # Larger float32 models (over ~1B params) are not copied into the cache.


def root() -> pathlib.Path | None:
  where = os.environ.get("PERL_JAX_CACHE", "")
  if where.lower() in ("off", "0", "none"):
    return None
  if where:
    return pathlib.Path(where).expanduser()
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "perl_jax"


@functools.cache
def _code_digest() -> str:
  here = pathlib.Path(__file__).parent
  return hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()[:16]


def entry(path, kind: str) -> pathlib.Path | None:
  """The cache folder for `kind` ("gguf_params" | "gguf_tokenizer") of the file `path`, or None (cache off)."""
  base = root()
  if base is None:
    return None
  p = pathlib.Path(path).resolve()
  st = p.stat()
  key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{_code_digest()}".encode()).hexdigest()[:24]
  return base / kind / key


def _write(folder: pathlib.Path, fill) -> None:
  """fill(tmp folder) then rename it to `folder`; another process that got there first wins."""
  try:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
      fill(tmp)
      tmp.rename(folder)
    except OSError:
      if not folder.is_dir():
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError as e:
    log.warning("model cache: could not write %s (%s); set PERL_JAX_CACHE to another folder or to off", folder, e)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v, np.float32)
  return out


def save_params(path, hf_config: dict, params: dict) -> None:
  """Stores a GGUF's HF-style config dict and its assembled params (as float32), unless they exceed
  MAX_PARAM_BYTES."""
  folder = entry(path, "gguf_params")
  if folder is None or folder.is_dir():
    return
  flat = _flat(params)
  if sum(a.nbytes for a in flat.values()) > MAX_PARAM_BYTES:
    log.info("model cache: %s is over %d GiB as float32, not cached", path, MAX_PARAM_BYTES >> 30)
    return
  from safetensors.numpy import save_file

  def fill(tmp):
    save_file(flat, str(tmp / "params.safetensors"))
    (tmp / "config.json").write_text(json.dumps(hf_config))
  _write(folder, fill)


def load_params(path) -> tuple[dict, dict] | None:
  """(HF-style config dict, float32 params tree) of a cached GGUF, or None."""
  folder = entry(path, "gguf_params")
  if folder is None or not (folder / "params.safetensors").is_file():
    return None
  from safetensors.numpy import load_file
  params: dict = {}
  for name, arr in load_file(str(folder / "params.safetensors")).items():
    node = params
    *parents, leaf = name.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = arr
  return json.loads((folder / "config.json").read_text()), params


def tokenizer_folder(path) -> pathlib.Path | None:
  """The cached tokenizer folder of a GGUF, if there is one."""
  folder = entry(path, "gguf_tokenizer")
  return folder if folder is not None and (folder / "tokenizer_config.json").is_file() else None


def save_tokenizer(path, tokenizer) -> None:
  folder = entry(path, "gguf_tokenizer")
  if folder is not None and not folder.is_dir():
    _write(folder, lambda tmp: tokenizer.save_pretrained(str(tmp)))
