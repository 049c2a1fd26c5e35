"""Model parity against transformers (PyTorch CPU, float32), KV cache, run-time options and bad inputs."""
import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import models
from perl_jax.models import ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
B, T = 2, 12
_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=1024)
_GEMMA3_ROPE = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=100.0)}
SPECS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=_LLAMA3_ROPE)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, sliding_window=4, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=3, num_key_value_heads=2, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters=_GEMMA3_ROPE, query_pre_attn_scalar=16)),
    # Every layer windowed: the per-layer mask and RoPE selection is skipped (transformer._per_layer).
    "gemma3_sliding": ("Gemma3TextConfig", dict(num_hidden_layers=2, num_key_value_heads=2, sliding_window=4,
                                                layer_types=["sliding_attention"] * 2,
                                                rope_parameters=_GEMMA3_ROPE, query_pre_attn_scalar=16)),
}
SHARDED = "llama3"


def _randomize(model, gemma: bool):
  """Weights with O(1) activations (HF init is too small to exercise norms, biases and soft-caps)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.normal_(0.0, 0.1)
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5)


def _build(name: str, root: pathlib.Path):
  cls, extra = SPECS[name]
  torch.manual_seed(0)
  hf_cfg = getattr(transformers, cls)(**{**_BASE, **extra})
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").float().eval()
  _randomize(model, name.startswith("gemma"))
  folder = root / name
  model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": "100KB"} if name == SHARDED else {}))
  return model, folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {name: _build(name, root) for name in SPECS}


_apply = jax.jit(models.apply, static_argnums=0)
_forward = jax.jit(models.forward, static_argnums=0)


def _ids_and_masks(vocab: int):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, size=(B, T))
  valid = np.array([[0] * 4 + [1] * (T - 4), [0] * 1 + [1] * (T - 1)])
  return ids, {"none": np.ones((B, T), np.int64), "left": valid, "right": valid[:, ::-1].copy()}


def _hf_logits(model, ids, mask):
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
  return out.logits.numpy()


def _max_diff(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask, bool)]))


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(SPECS))
def test_parity_with_transformers(hf_models, name, padding):
  model, folder = hf_models[name]
  cfg, params = models.load_pretrained(folder)
  ids, masks = _ids_and_masks(cfg.vocab_size)
  mask = masks[padding]
  if padding == "none":
    with torch.no_grad():
      want = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = _apply(cfg, params, jnp.asarray(ids))
  else:
    want = _hf_logits(model, ids, mask)
    got = _apply(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
  assert got.dtype == jnp.float32 and got.shape == (B, T, cfg.vocab_size)
  assert np.abs(want).max() > 1.0, "logits too small for the tolerance to mean anything"
  diff = _max_diff(got, want, mask)
  print(f"{name} {padding}: max|diff| {diff:.2e} (max|logit| {np.abs(want).max():.1f})")
  assert diff <= TOL, f"{name}/{padding}: max abs logit diff {diff:.3e} > {TOL}"


def test_config_fields_read(hf_models):
  cfgs = {n: models.load_hf_config(hf_models[n][1]) for n in SPECS}
  assert cfgs["llama"].tie_embeddings and not cfgs["llama3"].tie_embeddings
  assert cfgs["llama3"].rope.kind == "llama3" and cfgs["llama3"].num_kv_heads == 2
  assert cfgs["qwen2"].qkv_bias and cfgs["qwen3"].qk_norm and not cfgs["qwen3"].qkv_bias
  g2, g3 = cfgs["gemma2"], cfgs["gemma3"]
  assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window) == (2.0, 3.0, 4)
  assert g2.sliding_layers == (True, False) and g3.sliding_layers == (True, False, True)
  assert g3.rope.kind == "linear" and g3.rope.factor == 8.0 and g3.rope_local.theta == 100.0
  hf_llama = json.loads((hf_models["llama"][1] / "config.json").read_text())
  assert cfgs["llama"].max_position_embeddings == hf_llama["max_position_embeddings"]
  assert models.from_hf_dict(models.to_hf_dict(cfgs["llama"])) == cfgs["llama"]


def test_sharded_checkpoint_is_sharded(hf_models):
  folder = hf_models[SHARDED][1]
  assert len(list(folder.glob("*.safetensors"))) > 1
  assert (folder / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("name,change", [
    ("gemma2", dict(sliding_window=None)), ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)), ("gemma3", dict(rope_local=None)),
    ("gemma3", dict(rope=models.Rope(theta=1e6))), ("llama3", dict(rope=models.Rope(theta=500000.0))),
])
def test_parity_is_sensitive(hf_models, name, change):
  """Each feature under test changes the logits by far more than the parity tolerance."""
  model, folder = hf_models[name]
  cfg, params = models.load_pretrained(folder)
  ids, masks = _ids_and_masks(cfg.vocab_size)
  want = _hf_logits(model, ids, masks["none"])
  got = _apply(dataclasses.replace(cfg, **change), params, jnp.asarray(ids), jnp.asarray(masks["none"]))
  assert _max_diff(got, want, masks["none"]) > 100 * TOL


def _old_style(hf: dict) -> dict:
  """Rewrites a transformers-5 config.json into the older hub layout (rope_theta/rope_scaling, no layer_types)."""
  hf = dict(hf)
  rp = hf.pop("rope_parameters")
  if "full_attention" in rp:
    full, local = rp["full_attention"], rp["sliding_attention"]
    hf.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"],
              rope_scaling={k: v for k, v in full.items() if k != "rope_theta"})
    hf["sliding_window_pattern"] = 2
    hf.pop("_sliding_window_pattern", None)
    hf.pop("layer_types")
  else:
    hf.update(rope_theta=rp["rope_theta"], rope_scaling={k: v for k, v in rp.items() if k != "rope_theta"})
  return hf


@pytest.mark.parametrize("name", ["llama3", "gemma3"])
def test_old_style_config(hf_models, tmp_path, name):
  model, folder = hf_models[name]
  new = json.loads((folder / "config.json").read_text())
  for f in folder.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  (tmp_path / "config.json").write_text(json.dumps(_old_style(new)))
  cfg_new, _ = models.load_pretrained(folder)
  cfg, params = models.load_pretrained(tmp_path)
  assert cfg == cfg_new
  ids, masks = _ids_and_masks(cfg.vocab_size)
  diff = _max_diff(_apply(cfg, params, jnp.asarray(ids), jnp.asarray(masks["left"])),
                   _hf_logits(model, ids, masks["left"]), masks["left"])
  assert diff <= TOL, f"{name} old-style config: max abs logit diff {diff:.3e}"


# ------------------------------------------------------------------ the real embedded model


@pytest.fixture(scope="module")
def smollm2():
  path = models.default_model_path()
  if not path.exists():
    pytest.skip(f"{path} not installed")
  cfg, params = models.load_pretrained(path)
  return path, cfg, params


def test_real_model_matches_transformers_gguf(smollm2):
  path, cfg, params = smollm2
  tok = models.load_tokenizer(path)
  ids = np.asarray(tok("The capital of France is Paris. The capital of Germany is")["input_ids"])[None]
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids)).logits.numpy()
  got = np.asarray(_apply(cfg, params, jnp.asarray(ids)))
  diff = float(np.abs(got - want).max())
  print(f"smollm2 gguf: max|diff| {diff:.2e} (max|logit| {np.abs(want).max():.1f})")
  assert cfg.family == "llama" and cfg.vocab_size == want.shape[-1]
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  assert diff <= 1e-3


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_kv_cache_decode_matches_full_forward(hf_models, name):
  cfg, params = models.load_pretrained(hf_models[name][1])
  rng = np.random.default_rng(1)
  prompt_len, steps = 6, 7
  prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, prompt_len)))
  prompt_mask = jnp.asarray([[1] * prompt_len, [0, 0, 0] + [1] * (prompt_len - 3)], bool)
  new = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, steps)))
  full_ids = jnp.concatenate([prompt, new], 1)
  full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, steps), bool)], 1)
  full = _apply(cfg, params, full_ids, full_mask)

  cache = models.init_cache(cfg, B, prompt_len + steps, jnp.float32)
  out = _forward(cfg, params, prompt, prompt_mask, cache=cache)
  diff = _max_diff(out.logits, full[:, :prompt_len], prompt_mask)
  cache = out.cache
  for i in range(steps):
    out = _forward(cfg, params, new[:, i:i + 1], jnp.ones((B, 1), bool), cache=cache)
    cache = out.cache
    diff = max(diff, float(jnp.abs(out.logits[:, 0] - full[:, prompt_len + i]).max()))
  assert int(cache["index"]) == prompt_len + steps
  assert diff <= 1e-5, f"{name}: cached decode differs from full forward by {diff:.3e}"


# ------------------------------------------------------------------ run-time options


@pytest.mark.parametrize("name", ["llama3", "gemma2"])
def test_scan_and_remat_options_do_not_change_results(hf_models, name):
  cfg, params = models.load_pretrained(hf_models[name][1])
  ids, masks = _ids_and_masks(cfg.vocab_size)
  ids, mask = jnp.asarray(ids), jnp.asarray(masks["left"])

  def loss(p, c):
    return jnp.sum(jnp.where(mask[..., None], models.apply(c, p, ids, mask), 0.0) ** 2) / 1e3

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_logits, (ref_loss, ref_grad) = _apply(cfg, params, ids, mask), grad(params, cfg)
  tol = 1e-6 * max(1.0, float(jnp.abs(ref_logits).max()))  # a few ulps: XLA fuses scan and unrolled loops differently.
  for change in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots"), dict(remat="auto")):
    c = dataclasses.replace(cfg, **change)
    assert float(jnp.abs(_apply(c, params, ids, mask) - ref_logits).max()) <= tol, change
    if c.remat == "none":
      continue
    value, g = grad(params, c)
    assert abs(float(value - ref_loss)) <= 1e-5 * abs(float(ref_loss)), change
    gdiff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, ref_grad)))
    assert gdiff <= 1e-5, (change, gdiff)


def test_bfloat16_compute_is_close(hf_models):
  cfg, params = models.load_pretrained(hf_models["llama3"][1])
  ids, masks = _ids_and_masks(cfg.vocab_size)
  ref = _apply(cfg, params, jnp.asarray(ids))
  out = models.forward(dataclasses.replace(cfg, dtype="bfloat16"), params, jnp.asarray(ids))
  assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
  err = float(jnp.abs(out.logits - ref).max())
  assert err <= 0.05 * float(jnp.abs(ref).max()), err
  assert float(jnp.mean(out.logits.argmax(-1) == ref.argmax(-1))) >= 0.9


def test_bfloat16_params_load(hf_models):
  cfg, params = models.load_pretrained(hf_models["gemma2"][1], param_dtype=jnp.bfloat16, remat="full",
                                       dtype="bfloat16")
  assert cfg.remat == "full" and cfg.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert bool(jnp.isfinite(_apply(cfg, params, jnp.ones((1, 4), jnp.int32))).all())


# ------------------------------------------------------------------ bad inputs


def _error(path) -> str:
  with pytest.raises(ConfigError) as e:
    models.load_pretrained(path)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def _copy(folder: pathlib.Path, dest: pathlib.Path, **config_changes) -> pathlib.Path:
  dest.mkdir()
  for f in folder.iterdir():
    (dest / f.name).write_bytes(f.read_bytes())
  hf = json.loads((folder / "config.json").read_text())
  (dest / "config.json").write_text(json.dumps({**hf, **config_changes}))
  return dest


def test_missing_path(tmp_path):
  assert str(tmp_path / "nope") in _error(tmp_path / "nope")


def test_folder_without_config(hf_models, tmp_path):
  (tmp_path / "model.safetensors").write_bytes((hf_models["llama"][1] / "model.safetensors").read_bytes())
  msg = _error(tmp_path)
  assert str(tmp_path / "config.json") in msg


def test_unsupported_model_type(hf_models, tmp_path):
  folder = _copy(hf_models["llama"][1], tmp_path / "m", model_type="gpt2")
  msg = _error(folder)
  assert str(folder / "config.json") in msg and "model_type" in msg and "gpt2" in msg


def test_invalid_json(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama",\n')
  msg = _error(tmp_path)
  assert str(tmp_path / "config.json") in msg and "JSON" in msg


@pytest.mark.parametrize("change,words", [
    (dict(hidden_size=32), ["shape", "64)", "32)"]),
    (dict(num_hidden_layers=1), ["layers.1.", "num_hidden_layers"]),
    (dict(num_hidden_layers=3), ["missing"]),
    (dict(vocab_size=100), ["embed_tokens", "shape"]),
    (dict(tie_word_embeddings=False), ["lm_head", "missing"]),
])
def test_config_weights_mismatch(hf_models, tmp_path, change, words):
  name = "llama" if "tie_word_embeddings" in change else "llama3"
  folder = _copy(hf_models[name][1], tmp_path / "m", **change)
  msg = _error(folder)
  assert str(folder) in msg and "'" in msg, msg
  for w in words:
    assert w in msg, msg


def test_garbage_gguf(tmp_path):
  path = tmp_path / "bad.gguf"
  path.write_bytes(bytes(range(256)) * 8)
  assert str(path) in _error(path)


def test_truncated_gguf(tmp_path):
  path, real = tmp_path / "cut.gguf", models.default_model_path()
  if not real.exists():
    pytest.skip(f"{real} not installed")
  with open(real, "rb") as f:
    path.write_bytes(f.read(4096))
  assert str(path) in _error(path)


def test_gguf_with_unsupported_quantization_names_file_tensor_and_type(tmp_path):
  import gguf
  path = tmp_path / "q81.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  w.add_embedding_length(32)
  w.add_feed_forward_length(64)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
  block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
  w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32 // block * size), np.uint8),
               raw_shape=(32, 32 // block * size), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(models.ConfigError) as e:
    models.load_pretrained(path)
  msg = str(e.value)
  assert str(path) in msg and "blk.0.attn_q.weight" in msg and "Q8_1" in msg and "\n" not in msg


def test_count_params_takes_arrays_shape_dtype_structs_and_shape_tuples():
  tree = {"a": jnp.zeros((2, 3)), "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16), "c": {"d": (5, 6), "e": ()}}
  assert models.count_params(tree) == 6 + 4 + 30 + 1
  assert models.count_params({}) == 0


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_backward_saves_no_per_layer_mask_unless_layers_differ(hf_models, name):
  """Reverse mode through the layer scan: a model whose layers all attend alike (llama) keeps one attention mask;
  only one mixing sliding and global layers (gemma3) selects, and saves, a mask per layer ([L, ...] pred)."""
  cfg, params = models.load_pretrained(hf_models[name][1])
  b = 5  # Neither a layer count nor a head count: pred[L, ..., b, ...] is a mask saved per layer.
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(b, T))
  mask = np.ones((b, T), np.int32)
  mask[0, :3] = 0
  loss = lambda p: jnp.sum(models.forward(cfg, p, jnp.asarray(ids), jnp.asarray(mask)).hidden ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  per_layer_masks = re.search(rf"pred\[{cfg.num_layers},(\d+,)*{b},", hlo) is not None
  assert per_layer_masks == (any(cfg.sliding_layers) and not all(cfg.sliding_layers))


@pytest.mark.parametrize("field", ["remat", "attention"])
def test_unknown_run_time_choice_is_one_line_naming_field_and_value(hf_models, field):
  cfg, _ = models.load_pretrained(hf_models["llama3"][1])
  with pytest.raises(ConfigError) as e:
    dataclasses.replace(cfg, **{field: "dts"})
  assert str(e.value).startswith(f"config: field 'model.{field}': must be ") and "'dts'" in str(e.value) and "\n" not in str(e.value)
