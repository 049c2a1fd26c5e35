"""A base model by Hub id: resolved from a Hugging Face cache folder the test builds (offline), at the default
revision or a named one; a path still wins; an id that is neither is a one-line ConfigError."""
import json
import pathlib

from huggingface_hub import constants as hf_constants
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from perl_jax import models
from perl_jax.models import hub
from tests.helpers import tiny_config

REPO = "tiny-org/tiny-llama"


def _snapshot(cache, commit: str, ref: str, seed: int):
  """One snapshot of REPO in the HF cache layout (models--org--name/{refs/REF, snapshots/COMMIT/...})."""
  cfg = tiny_config()
  params = models.init_params(cfg, jax.random.key(seed))
  repo = cache / "models--tiny-org--tiny-llama"
  folder = repo / "snapshots" / commit
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(models.to_hf_dict(cfg)))
  tensors = {k: np.asarray(v) for k, v in models.loading.hf_state_dict(cfg, params).items()}
  save_file(tensors, str(folder / "model.safetensors"))
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / ref).write_text(commit)
  return params


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  return cache


def test_hub_id_resolves_from_the_cache_at_a_revision(offline_cache):
  main = _snapshot(offline_cache, "a" * 40, "main", seed=0)
  v2 = _snapshot(offline_cache, "b" * 40, "v2", seed=1)
  for revision, want in (("", main), ("v2", v2)):
    cfg, params = models.load_pretrained(REPO, revision=revision)
    assert cfg.num_layers == tiny_config().num_layers
    got, expected = jax.tree.leaves(params), jax.tree.leaves(want)
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))
  assert hub.resolve(REPO) == offline_cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)


def test_paths_are_not_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "org").mkdir()
  (tmp_path / "org" / "model.gguf").write_text("")
  assert not hub.is_hub_id("org/model.gguf")  # It exists here: a local path.
  assert hub.resolve("org/model.gguf") == pathlib.Path("org/model.gguf")
  assert not hub.is_hub_id("/abs/path") and not hub.is_hub_id("./rel/x") and not hub.is_hub_id("a/b/c")
  assert hub.is_hub_id("Qwen/Qwen2.5-0.5B-Instruct")


def test_unknown_hub_id_is_one_line(offline_cache):
  with pytest.raises(models.ConfigError) as e:
    models.load_pretrained("nobody/nothing")
  assert str(e.value).startswith("nobody/nothing: no such local file or folder") and "\n" not in str(e.value)
