"""Weights from a Hugging Face folder (config.json + *.safetensors) or a GGUF file, into our params pytree."""
import pathlib
import re
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax.models import cache, hub, quant, transformer
from perl_jax.models.config import ConfigError, ModelConfig, from_hf_dict, load_hf_config

_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_HF_LAYER = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"), "self_attn.q_proj.bias": ("attn", "q_proj", "bias"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"), "self_attn.k_proj.bias": ("attn", "k_proj", "bias"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"), "self_attn.v_proj.bias": ("attn", "v_proj", "bias"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "self_attn.q_norm.weight": ("attn", "q_norm", "scale"), "self_attn.k_norm.weight": ("attn", "k_norm", "scale"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"), "mlp.gate_proj.bias": ("mlp", "gate_proj", "bias"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"), "mlp.up_proj.bias": ("mlp", "up_proj", "bias"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"), "mlp.down_proj.bias": ("mlp", "down_proj", "bias"),
    "pre_feedforward_layernorm.weight": ("mlp_norm", "scale"),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", "scale"),
}
_GGUF_LAYER = {
    "attn_norm.weight": ("attn_norm", "scale"), "ffn_norm.weight": ("mlp_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"), "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
    "attn_q_norm.weight": ("attn", "q_norm", "scale"), "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "attn_q.weight": ("attn", "q_proj", "kernel"), "attn_q.bias": ("attn", "q_proj", "bias"),
    "attn_k.weight": ("attn", "k_proj", "kernel"), "attn_k.bias": ("attn", "k_proj", "bias"),
    "attn_v.weight": ("attn", "v_proj", "kernel"), "attn_v.bias": ("attn", "v_proj", "bias"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"), "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}
_GGUF_TOP = {"token_embd.weight": ("embed", "embedding"), "output_norm.weight": ("final_norm", "scale"),
             "output.weight": ("lm_head", "kernel")}
_IGNORED = re.compile(r"rotary_emb\.inv_freq|rope_freqs|score\.|lm_head\.weight$")


def _gguf_layer_kernel(name: str) -> bool:
  """A GGUF tensor name that is one layer's projection kernel ("blk.N.attn_q.weight", ...)."""
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  return bool(m) and _GGUF_LAYER.get(m.group(2), ("",))[-1] == "kernel"


def _hf_path(cfg: ModelConfig, name: str):
  """Maps an HF tensor name to (our path, layer index or None); None for tensors we do not use."""
  for prefix in _HF_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  if name == "embed_tokens.weight":
    return ("embed", "embedding"), None
  if name == "norm.weight":
    return ("final_norm", "scale"), None
  if name == "lm_head.weight" and not cfg.tie_embeddings:
    return ("lm_head", "kernel"), None
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
  if not m:
    return None
  rest = m.group(2)
  if rest == "post_attention_layernorm.weight":
    return (("post_attn_norm" if cfg.sandwich_norm else "mlp_norm"), "scale"), int(m.group(1))
  return (_HF_LAYER[rest], int(m.group(1))) if rest in _HF_LAYER else None


def hf_layer_names(cfg: ModelConfig) -> dict[tuple, str]:
  """Our per-layer param path -> HF tensor name after 'model.layers.{i}.' (the inverse of `_hf_path`)."""
  names = {path: name for name, path in _HF_LAYER.items()}
  names[("post_attn_norm" if cfg.sandwich_norm else "mlp_norm", "scale")] = "post_attention_layernorm.weight"
  return names


def hf_state_dict(cfg: ModelConfig, params, dtype=jnp.float32) -> dict:
  """Our params as HF tensors: kernels [in,out] -> [out,in], stacked layers -> model.layers.{i}.*."""
  from flax import traverse_util
  top = {("embed", "embedding"): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
         ("lm_head", "kernel"): "lm_head.weight"}
  layer_names = hf_layer_names(cfg)
  out = {}
  for path, x in traverse_util.flatten_dict(params).items():
    x = jnp.asarray(x, dtype)
    if path[0] != "layers":
      out[top[path]] = x.T if path[-1] == "kernel" else x
      continue
    for i in range(x.shape[0]):
      out[f"model.layers.{i}.{layer_names[path[1:]]}"] = x[i].T if path[-1] == "kernel" else x[i]
  return out


def _assemble(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], where: str,
              to_path: Callable, dtype, layer_kernels: bool = True) -> dict:
  """Places [out,in] torch-layout tensors into the stacked params pytree, checking every shape; without
  `layer_kernels` the layer kernels are left out (a caller that fills them with a file's own blocks)."""
  shapes = transformer.param_shapes(cfg)
  stacks: dict[tuple, list] = {}
  top: dict[tuple, np.ndarray] = {}
  for name, arr in tensors:
    hit = to_path(cfg, name)
    if hit is None:
      if _IGNORED.search(name):
        continue
      raise ConfigError(f"{where}: tensor '{name}' is not used by a '{cfg.family}' model (config/weights mismatch)")
    path, layer = hit
    if path[-1] == "kernel":
      arr = arr.T
    expected = shapes if layer is None else shapes["layers"]
    try:
      for k in path:
        expected = expected[k]
    except KeyError:
      raise ConfigError(f"{where}: tensor '{name}' has no place in this config (config/weights mismatch)") from None
    want = expected if layer is None else expected[1:]
    if tuple(arr.shape) != tuple(want):
      raise ConfigError(f"{where}: tensor '{name}': shape {tuple(arr.shape)} does not match config {tuple(want)}")
    if layer is None:
      top[path] = arr
    else:
      if layer >= cfg.num_layers:
        raise ConfigError(f"{where}: tensor '{name}': layer {layer} >= num_hidden_layers {cfg.num_layers}")
      stacks.setdefault(path, [None] * cfg.num_layers)[layer] = arr
  params: dict = {}
  flat = {**top, **{("layers",) + p: v for p, v in stacks.items()}}
  for path, arr in flat.items():
    if isinstance(arr, list):
      missing = [i for i, a in enumerate(arr) if a is None]
      if missing:
        raise ConfigError(f"{where}: '{'/'.join(path)}' missing for layers {missing[:5]}")
      arr = np.stack(arr)
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = jnp.asarray(arr, dtype=dtype)
  _check_complete(shapes, params, where, skip=None if layer_kernels else _is_layer_kernel)
  return params


def _is_layer_kernel(path: str) -> bool:
  return path.startswith("layers/") and path.endswith("/kernel")


def _check_complete(shapes, params, where, prefix="", skip=None):
  for k, v in shapes.items():
    if skip is not None and skip(f"{prefix}{k}"):
      continue
    if isinstance(v, dict) and (k in params or skip is not None):  # a subtree of skipped leaves may be absent
      _check_complete(v, params.get(k, {}), where, f"{prefix}{k}/", skip)
    elif k not in params:
      raise ConfigError(f"{where}: weights for '{prefix}{k}' are missing (config/weights mismatch)")


def load_safetensors_folder(path: pathlib.Path, param_dtype=jnp.float32, **overrides):
  """An HF folder: config.json plus one or many (indexed) .safetensors shards."""
  from safetensors import safe_open
  cfg = load_hf_config(path, **overrides)
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise ConfigError(f"{path}: no *.safetensors files")

  def tensors():
    for f in files:
      with safe_open(str(f), framework="flax") as sf:
        for name in sf.keys():
          yield name, np.asarray(sf.get_tensor(name))

  return cfg, _assemble(cfg, tensors(), str(path), _hf_path, param_dtype)


def gguf_fields(reader) -> dict:
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("tokenizer.ggml.") and name not in (
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
      continue
    try:
      out[name] = field.contents()
    except Exception:  # noqa: BLE001 - metadata we do not read may use types gguf cannot decode.
      pass
  return out


def gguf_config(path: pathlib.Path, reader, **overrides) -> ModelConfig:
  """Builds an HF-style config dict from GGUF metadata, then a ModelConfig."""
  return from_hf_dict(gguf_hf_config(path, reader), where=str(path), **overrides)


def gguf_hf_config(path: pathlib.Path, reader) -> dict:
  """The HF-style config dict of a GGUF file's metadata."""
  f = gguf_fields(reader)
  arch = f.get("general.architecture")
  families = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text"}
  if arch not in families:
    raise ConfigError(f"{path}: field 'general.architecture': unsupported architecture '{arch}'")
  g = lambda key, default=None: f.get(f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1]
  heads = g("attention.head_count")
  hf = dict(model_type=families[arch], vocab_size=int(vocab), hidden_size=g("embedding_length"),
            intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
            num_attention_heads=heads, num_key_value_heads=g("attention.head_count_kv", heads),
            head_dim=g("attention.key_length", g("embedding_length") // heads),
            rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=g("rope.freq_base", 10000.0),
            tie_word_embeddings="output.weight" not in names, attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"), eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=f.get("tokenizer.ggml.padding_token_id"), max_position_embeddings=g("context_length"))
  if g("rope.scaling.type") not in (None, "none"):
    hf["rope_scaling"] = {"rope_type": g("rope.scaling.type"), "factor": g("rope.scaling.factor", 1.0)}
  if arch.startswith("gemma"):
    hf.update(sliding_window=g("attention.sliding_window"), attn_logit_softcapping=g("attn_logit_softcapping"),
              final_logit_softcapping=g("final_logit_softcapping"), query_pre_attn_scalar=hf["head_dim"])
  return hf


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's rotary row permutation of a Q or K weight [out, in]."""
  out = w.shape[0]
  return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: pathlib.Path, param_dtype=jnp.float32, keep_blocks: bool = False, **overrides):
  """A GGUF file: metadata to config, tensors dequantized with the gguf package. Loaded as float32 params, both are
  kept in the model cache (models.cache), from which later float32 loads of the same file read them; other
  dtypes assemble straight into `param_dtype` (no float32 copy of the whole model). With `keep_blocks`
  (model.quant "gguf") the layer kernels are never dequantized: they are the file's own blocks (load_gguf_blocks)
  and only the rest (embeddings, norms, LM head) is float, so no float copy of the layers is made."""
  cached = jnp.dtype(param_dtype) == jnp.float32 and not keep_blocks
  hit = cache.load_params(path) if cached else None
  if hit is not None:
    hf, params = hit
    return from_hf_dict(hf, where=str(path), **overrides), jax.tree.map(jnp.asarray, params)
  import gguf
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:  # noqa: BLE001 - gguf raises assorted errors for corrupt files.
    raise ConfigError(f"{path}: not a readable GGUF file ({e})") from None
  hf = gguf_hf_config(path, reader)
  cfg = from_hf_dict(hf, where=str(path), **overrides)
  llama = reader.fields["general.architecture"].contents() == "llama"

  def tensors():
    for t in reader.tensors:
      if keep_blocks and _gguf_layer_kernel(t.name):
        continue  # its blocks are read as they are (load_gguf_blocks)
      try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
      except NotImplementedError:
        raise ConfigError(f"{path}: tensor '{t.name}': unsupported quantization {t.tensor_type.name}") from None
      arr = np.asarray(arr, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
      m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
      if m and llama and m.group(2) in ("attn_q.weight", "attn_k.weight"):
        arr = _unpermute(arr, cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads)
      if cfg.norm_plus_one and t.name.endswith("norm.weight"):
        arr = arr - 1.0
      yield t.name, arr

  def to_path(cfg, name):
    if name in _GGUF_TOP:
      return _GGUF_TOP[name], None
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_LAYER:
      return _GGUF_LAYER[m.group(2)], int(m.group(1))
    return None

  params = _assemble(cfg, tensors(), str(path), to_path, param_dtype, layer_kernels=not keep_blocks)
  if keep_blocks:
    return cfg, load_gguf_blocks(path, cfg, params)
  if cached:
    cache.save_params(path, hf, params)
  return cfg, params


def _gguf_kernel_blocks(t, n_heads: int | None):
  """One layer kernel's ggml blocks as the file stores them, laid out [in/…, out] like our kernels; Q/K rows
  un-permuted as in load_gguf (each output row's blocks move with it)."""
  import gguf
  out = int(t.shape[1])
  raw = np.asarray(t.data, np.uint8).reshape(out, -1)
  kind = t.tensor_type.name
  half = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0]  # [out, B, 2] bytes -> [out, B]
  if kind in ("Q4_0", "Q4_1"):
    size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]  # 18 or 20 bytes a block
    blocks = raw.reshape(out, -1, size)
    d = half(blocks[..., 0:2])
    m = half(blocks[..., 2:4]) if kind == "Q4_1" else (-8 * d.astype(np.float32)).astype(np.float16)
    qs = blocks[..., size - 16:]  # [out, B, 16]
    parts = [qs, d, m]
  elif kind == "Q8_0":
    blocks = raw.reshape(out, -1, 34)
    parts = [blocks[..., 2:].view(np.int8), half(blocks[..., 0:2])]
  else:
    raise ConfigError(f"tensor '{t.name}': model.quant 'gguf' keeps Q4_0, Q4_1 and Q8_0 blocks; this file stores "
                      f"{kind} (use model.quant 'int8' or 'nf4')")
  if n_heads:
    parts = [_unpermute(x, n_heads) for x in parts]
  if kind == "Q8_0":
    codes, d = parts
    return quant.GGUFQ8(codes.reshape(out, -1).T, d.T)
  qs, d, m = parts
  return quant.GGUFQ4(qs.reshape(out, -1).T, d.T, m.T)


def load_gguf_blocks(path, cfg: ModelConfig, params: dict) -> dict:
  """`params` (load_gguf's, from the same file, with or without its float layer kernels) with every layer kernel
  set to the file's own ggml blocks (quant.GGUFQ4 / GGUFQ8: their scales and mins, no dequantize-then-requantize),
  each checked against the config's shape. The forward dequantizes them one projection at a time to the same
  float32 values load_gguf holds."""
  import gguf
  path = pathlib.Path(path)
  reader = gguf.GGUFReader(str(path))
  llama = reader.fields["general.architecture"].contents() == "llama"
  per_layer: dict[tuple, list] = {}
  kinds: dict[tuple, tuple] = {}  # (group, name) -> (the file's tensor name, its block type per layer)
  for t in reader.tensors:
    if not _gguf_layer_kernel(t.name):
      continue
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    heads = {"attn_q.weight": cfg.num_heads, "attn_k.weight": cfg.num_kv_heads}.get(m.group(2)) if llama else None
    try:
      blocks = _gguf_kernel_blocks(t, heads)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None
    per_layer.setdefault(_GGUF_LAYER[m.group(2)], []).append((int(m.group(1)), blocks))
    kinds.setdefault(_GGUF_LAYER[m.group(2)][:2], (m.group(2), []))[1].append(t.tensor_type.name)
  layers = dict(params["layers"])
  shapes = transformer.param_shapes(cfg)["layers"]
  for (group, name, _), blocks in per_layer.items():
    if len({type(b) for _, b in blocks}) > 1:
      file_name, types = kinds[(group, name)]
      raise ConfigError(f"{path}: tensors 'blk.*.{file_name}': model.quant 'gguf' stacks each projection's layers "
                        f"into one array, and these mix block types ({', '.join(sorted(set(types)))}): use "
                        "model.quant 'int8' or 'nf4'")
    in_order = [b for _, b in sorted(blocks, key=lambda ib: ib[0])]
    file_name = kinds[(group, name)][0]
    if [i for i, _ in sorted(blocks, key=lambda ib: ib[0])] != list(range(cfg.num_layers)):
      raise ConfigError(f"{path}: tensors 'blk.*.{file_name}': expected layers 0..{cfg.num_layers - 1}, found "
                        f"{sorted(i for i, _ in blocks)[:8]}")
    stacked = jax.tree.map(lambda *x: jnp.asarray(np.stack(x)), *in_order)
    want = tuple(shapes[group][name]["kernel"])
    if tuple(stacked.shape) != want:
      raise ConfigError(f"{path}: tensors 'blk.*.{file_name}': blocks of shape {tuple(stacked.shape)} do not match "
                        f"config {want}")
    group_params = layers.get(group, {})  # absent when load_gguf left the layer kernels out (keep_blocks)
    layers[group] = {**group_params, name: {**group_params.get(name, {}), "kernel": stacked}}
  _check_complete(shapes, layers, str(path), "layers/")
  return {**params, "layers": layers}


def load_pretrained(path, param_dtype=jnp.float32, *, revision: str = "", gguf_blocks: bool = False,
                    **overrides) -> tuple[ModelConfig, dict]:
  """(config, params) from an HF folder, a .gguf file or a Hub id (hub.resolve, at `revision`); params stored as
  `param_dtype`; `overrides` set config fields such as the compute dtype, remat or scan_layers. `gguf_blocks`: a
  .gguf file's layer kernels kept as its own blocks (load_gguf's keep_blocks; an error for any other source)."""
  path = hub.resolve(path, revision)
  if not path.exists():
    raise ConfigError(f"{path}: no such file or folder")
  if path.is_file() and path.suffix == ".gguf":
    return load_gguf(path, param_dtype, keep_blocks=gguf_blocks, **overrides)
  if gguf_blocks:
    raise ConfigError(f"config: field 'model.quant': 'gguf' keeps a GGUF file's own blocks, and {path} is not a .gguf "
                      "file (use model.quant 'int8' or 'nf4')")
  if path.is_dir():
    return load_safetensors_folder(path, param_dtype, **overrides)
  raise ConfigError(f"{path}: expected a folder with config.json + *.safetensors, or a .gguf file")
