"""The model cache gives exactly what a fresh GGUF load gives (params bit for bit, config, tokenizer), and misses
when the file changes or the cache is off."""
import os
import shutil

import jax
import numpy as np
import pytest

from perl_jax import models
from perl_jax.models import cache, tokenizer


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch):
  monkeypatch.setenv("PERL_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "model.gguf"
  shutil.copy(models.default_model_path(), path)
  return path


def test_cached_params_and_tokenizer_equal_a_fresh_build(gguf_copy):
  assert cache.load_params(gguf_copy) is None and cache.tokenizer_folder(gguf_copy) is None
  cfg, params = models.load_pretrained(gguf_copy, dtype="bfloat16")  # Builds, and fills the cache.
  assert cache.load_params(gguf_copy) is not None
  cfg2, params2 = models.load_pretrained(gguf_copy, dtype="bfloat16")  # Reads the cache.
  assert cfg2 == cfg and cfg.dtype == "bfloat16"
  a, b = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(params2)
  assert [p for p, _ in a] == [p for p, _ in b]
  assert all(x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))

  fresh = models.load_tokenizer(gguf_copy)  # Builds, and fills the cache.
  assert cache.tokenizer_folder(gguf_copy) is not None
  cached = models.load_tokenizer(gguf_copy)  # Reads the cache.
  assert type(cached).__name__ == type(tokenizer._build_from_gguf(gguf_copy)).__name__
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 3 × ☕ please!"},
              {"role": "assistant", "content": "API call: order {\"items\": [1, 2]}"}]
  assert cached.apply_chat_template(messages, tokenize=False) == fresh.apply_chat_template(messages, tokenize=False)
  text = fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert cached(text)["input_ids"] == fresh(text)["input_ids"]
  assert (cached.eos_token_id, cached.bos_token_id, cached.pad_token_id) == (
      fresh.eos_token_id, fresh.bos_token_id, fresh.pad_token_id)
  assert cached.get_vocab() == fresh.get_vocab()


def test_a_changed_file_or_cache_off_misses(gguf_copy, monkeypatch):
  first = cache.entry(gguf_copy, "gguf_params")
  os.utime(gguf_copy, ns=(1, 1))
  assert cache.entry(gguf_copy, "gguf_params") != first
  monkeypatch.setenv("PERL_JAX_CACHE", "off")
  assert cache.entry(gguf_copy, "gguf_params") is None and cache.tokenizer_folder(gguf_copy) is None
  cache.save_params(gguf_copy, {}, {})
  assert not (gguf_copy.parent / "cache").exists()
