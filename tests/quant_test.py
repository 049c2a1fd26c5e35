"""Weight-only quantization (perl_jax/models/quant.py) against a numpy reference written from the definitions: codes,
scales, packing, the round trip's error bound; the forward on a quantized base against the same forward on its
dequantized weights (no float copy of the base in the compiled step, sharded = one device); a GGUF file's own blocks
against the dequantizing loader; one-line errors for settings that cannot apply."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from perl_jax import lora, models, optimizer, reward, runs, sharding, trained, trainer
from perl_jax.models import quant
from tests.helpers import random_batch, tiny_config


def _kernel(seed=0, shape=(2, 128, 12)):
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  w[1, :, 3] = 0.0  # an all-zero output column: scale 0, codes 0, dequantized exactly 0
  return w


def test_int8_matches_numpy_and_its_error_bound():
  w = _kernel()
  q = quant.quantize_int8(w)
  scale = np.abs(w).max(axis=1) / 127
  codes = np.clip(np.round(w / np.where(scale > 0, scale, 1)[:, None, :]), -127, 127)
  np.testing.assert_allclose(np.asarray(q.scale_LxO), scale, rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(q.codes_LxIxO), codes.astype(np.int8))
  err = np.abs(np.asarray(quant.dequantize_int8(q)) - w)
  assert (err <= scale[:, None, :] / 2 + 1e-7).all() and err[1, :, 3].max() == 0
  assert quant.quantized_bytes(q) == w.size + 4 * scale.size


def test_nf4_matches_numpy_and_its_error_bound():
  levels = quant.NF4_LEVELS
  assert levels[0] == -1 and levels[-1] == 1 and 0.0 in levels and (np.diff(levels) > 0).all()
  w, block = _kernel(1), 32
  q = quant.quantize_nf4(w, block)
  l, d_in, d_out = w.shape
  codes, absmax = np.zeros(w.shape, np.uint8), np.zeros((l, d_in // block, d_out), np.float32)
  for i in range(l):
    for b in range(d_in // block):
      for o in range(d_out):
        x = w[i, b * block:(b + 1) * block, o]
        absmax[i, b, o] = np.abs(x).max()
        norm = x / absmax[i, b, o] if absmax[i, b, o] > 0 else x
        codes[i, b * block:(b + 1) * block, o] = [np.argmin(np.abs(levels - v)) for v in norm]
  np.testing.assert_allclose(np.asarray(q.absmax_LxBxO), absmax)
  np.testing.assert_array_equal(np.asarray(quant.nf4_codes(q)), codes)
  packed = np.asarray(q.packed_LxHxO)
  assert packed.shape == (l, d_in // 2, d_out)
  np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])   # even rows in the low nibble
  np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
  deq = np.asarray(quant.dequantize_nf4(q))
  np.testing.assert_allclose(deq, levels[codes] * np.repeat(absmax, block, axis=1), rtol=1e-6)
  half_gap = np.diff(levels).max() / 2
  assert (np.abs(deq - w) <= np.repeat(absmax, block, axis=1) * half_gap + 1e-6).all()
  assert np.abs(deq[1, :, 3]).max() == 0
  assert quant.quantized_bytes(q) == w.size // 2 + 4 * absmax.size  # 4 bits a weight plus one float per block


def test_nf4_double_quantization_matches_numpy_and_keeps_the_codes():
  """Double quantization stores nf4's block absmax as int8 around the layer's mean, one float scale per row of block
  scales; the 4-bit codes are nf4's own, and the weights dequantize with the absmax so recovered."""
  w, block = _kernel(2, (3, 128, 40)), 32
  plain, q = quant.quantize_nf4(w, block), quant.quantize_nf4(w, block, double=True)
  assert isinstance(q, quant.NF4DQ) and q.shape == w.shape
  np.testing.assert_array_equal(np.asarray(q.packed_LxHxO), np.asarray(plain.packed_LxHxO))
  absmax = np.asarray(plain.absmax_LxBxO)
  mean = absmax.mean(axis=(1, 2))
  c = absmax - mean[:, None, None]
  scale = np.abs(c).max(axis=2) / 127
  codes = np.clip(np.round(c / scale[:, :, None]), -127, 127).astype(np.int8)
  np.testing.assert_allclose(np.asarray(q.absmax_mean_L), mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.absmax_scale_LxB), scale, rtol=1e-6)
  assert (np.abs(np.asarray(q.absmax_codes_LxBxO).astype(int) - codes) <= 1).all()  # a rounding tie may differ
  assert (np.asarray(q.absmax_codes_LxBxO) == codes).mean() > 0.99
  recovered = np.asarray(quant.absmax_of(q))
  assert (np.abs(recovered - absmax) <= scale[:, :, None] / 2 + 1e-6).all()
  levels = quant.NF4_LEVELS[np.asarray(quant.nf4_codes(plain))]
  np.testing.assert_allclose(np.asarray(quant.dequantize_nf4dq(q)), levels * np.repeat(recovered, block, axis=1),
                             rtol=1e-6, atol=1e-7)
  l, b = scale.shape
  assert quant.quantized_bytes(q) == w.size // 2 + absmax.size + 4 * l * b + 4 * l  # 8 bits a block, not 32
  assert quant.quantized_bytes(q) < quant.quantized_bytes(plain)


def test_double_quantization_of_another_kind_is_a_one_line_error():
  params = models.init_params(tiny_config(), jax.random.key(0))
  for kind in ("int8", "none"):
    with pytest.raises(quant.QuantError, match=rf"field 'model.quant_double': .* not to model.quant '{kind}'") as e:
      quant.quantize_base(params, kind, 16, double=True)
    assert "\n" not in str(e.value)
  config = ml_collections.ConfigDict({"mode": "lora", "model": {"quant": "int8", "quant_double": True}})
  with pytest.raises(quant.QuantError, match=r"'model.quant_double'"):
    trained.check_mode(config)
  mc = ml_collections.ConfigDict({"quant": "nf4", "quant_block": 16, "quant_double": True})
  qbase = runs.quantize_base(mc, params)
  assert isinstance(qbase["layers"]["attn"]["q_proj"]["kernel"], quant.NF4DQ) and quant.base_kind(qbase) == "nf4"


@pytest.mark.parametrize("block", [48, 7, 0])
def test_nf4_block_that_does_not_fit_is_a_one_line_error(block):
  with pytest.raises(quant.QuantError, match=r"field 'model.quant_block': block .* input size 128") as e:
    quant.quantize_nf4(_kernel(), block)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------- a quantized base in the forward


def _setup(kind, cfg=None, block=16):
  """kind "int8" | "nf4" | "nf4dq" (nf4, its block scales double-quantized)."""
  cfg = cfg or tiny_config()
  params = models.init_params(cfg, jax.random.key(0))
  qbase = quant.quantize_base(params, kind.removesuffix("dq"), block, double=kind == "nf4dq")
  adapter = lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2, alpha=4.0))
  adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapter)
  ids, mask = random_batch(0, 4, 10, cfg.vocab_size, left_pad=(0, 3, 1, 0))
  return cfg, params, qbase, adapter, ids, mask


@pytest.mark.parametrize("kind", ["int8", "nf4", "nf4dq"])
def test_forward_on_a_quantized_base_equals_its_dequantized_weights(kind):
  """Every layer kernel is stored quantized (nothing else is), and the forward (the layer scan, LoRA on top, the
  KV-cache decode) equals the same forward on the dequantized float weights."""
  cfg, params, qbase, adapter, ids, mask = _setup(kind)
  flat = traverse_util.flatten_dict(qbase, sep="/")
  kernels = [p for p in flat if p.endswith("/kernel") and p.startswith("layers/")]
  assert len(kernels) == 7 and all(quant.is_quantized(flat[p]) for p in kernels)
  assert not any(quant.is_quantized(v) for p, v in flat.items() if p not in kernels)
  assert quant.base_kind(qbase) == kind.removesuffix("dq") and quant.base_kind(params) == "none"
  assert models.count_params(qbase) == models.count_params(params)
  deq = quant.dequantize_base(qbase)
  for k in ("embedding", "scale"):
    np.testing.assert_array_equal(np.asarray(deq[{"embedding": "embed", "scale": "final_norm"}[k]][k]),
                                  np.asarray(params[{"embedding": "embed", "scale": "final_norm"}[k]][k]))
  ad = [(adapter, 2.0)]
  got = jax.jit(lambda p: models.forward(cfg, p, ids, mask, adapters=ad).logits)(qbase)
  want = jax.jit(lambda p: models.forward(cfg, p, ids, mask, adapters=ad).logits)(deq)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  plain = models.forward(cfg, params, ids, mask, adapters=ad).logits  # the float base: a different model
  assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 1e-4
  cache = models.init_cache(cfg, 4, 12, jnp.float32)
  step = lambda p: models.forward(cfg, p, ids, mask, adapters=ad, cache=cache).logits
  np.testing.assert_allclose(np.asarray(step(qbase)), np.asarray(step(deq)), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_only_the_adapters_and_head_and_the_optimizer_holds_no_quantized_array():
  """The LoRA RM's loss on an nf4 base: its gradient equals the gradient on the dequantized base (the codes are
  constants), and the trainer's state (params + AdamW moments) holds the adapters and head only."""
  cfg, params, qbase, _, ids, mask = _setup("nf4")
  rcfg = trained.RewardConfig(mode="lora", lora_cfg=lora.LoraConfig(rank=2, alpha=4.0))
  trainable = trained.init_reward(jax.random.key(3), rcfg, cfg, qbase)
  trainable["lora"] = jax.tree.map(lambda x: x + 0.05, trainable["lora"])
  batch = {"input_ids": ids.reshape(2, 2, -1), "attention_mask": mask.reshape(2, 2, -1)}
  grad = lambda base: jax.grad(lambda t: reward.loss_fn(cfg, rcfg, t, base, batch)[0])(trainable)
  g_q, g_d = grad(qbase), grad(quant.dequantize_base(qbase))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4), g_q, g_d)
  assert all(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(g_q["lora"]))
  state = trainer.new_state(trainable, optimizer.make_optimizer(optimizer.make_schedule(1e-3, 10, 1)),
                            jax.random.key(0))
  floats = [x for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert quant.tree_bytes(state["opt_state"]) <= 3 * quant.tree_bytes(trainable)  # mu, nu (+ counters)
  assert all(x.dtype != np.uint8 and x.dtype != np.int8 for x in jax.tree.leaves(state))
  assert sum(x.size for x in floats) < 4 * sum(x.size for x in jax.tree.leaves(trainable))


@pytest.mark.parametrize("kind", ["nf4", "nf4dq"])
def test_quantized_base_sharded_on_8_devices_equals_one_device(kind):
  """The nf4 base placed by the partition rules on a 2x2x2 mesh (codes and block scales split like the kernel they
  stand for; double-quantized scales' rows like its input axis): the same logits as on one device."""
  cfg, _, qbase, adapter, ids, mask = _setup(kind)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  specs = sharding.partition_specs(qbase, mesh)
  q_spec, down = specs["layers"]["attn"]["q_proj"]["kernel"], specs["layers"]["mlp"]["down_proj"]["kernel"]
  assert q_spec.packed_LxHxO == P(None, "fsdp", "tensor") and down.packed_LxHxO == P(None, "tensor", "fsdp")
  if kind == "nf4":
    assert q_spec.absmax_LxBxO == P(None, "fsdp", "tensor")
  else:
    assert q_spec.absmax_codes_LxBxO == P(None, "fsdp", "tensor") and q_spec.absmax_scale_LxB == P(None, "fsdp")
    assert down.absmax_scale_LxB == P(None, "tensor") and q_spec.absmax_mean_L == P()
  f = jax.jit(lambda p, a: models.forward(cfg, p, ids, mask, adapters=[(a, 2.0)]).logits)
  one = f(qbase, adapter)
  eight = f(sharding.shard(qbase, mesh), sharding.shard(adapter, mesh))
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), atol=1e-5, rtol=1e-5)
  i8 = sharding.partition_specs(quant.quantize_base(models.init_params(cfg, jax.random.key(0)), "int8"), mesh)
  assert i8["layers"]["attn"]["o_proj"]["kernel"].scale_LxO == P(None, "fsdp")


def test_the_layer_loop_dequantizes_one_layer_at_a_time():
  """No float copy of every layer may outlive the layer loop: neither hoisted out of it by XLA (loop-invariant code
  motion is on by default, as on GPU / TPU) nor kept by autodiff as the scan's residuals for the backward pass. The
  compiled LoRA gradient step's temporaries on an nf4 base exceed those on the float base by less than one layer's
  float32 kernels: without remat under XLA's default passes, and with "dots" under the CPU options training uses."""
  cfg = tiny_config(num_layers=8, hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=4)
  _, params, qbase, adapter, ids, mask = _setup("nf4", cfg=cfg, block=64)
  kernels_f32 = sum(np.asarray(k).nbytes for p, k in traverse_util.flatten_dict(params, sep="/").items()
                    if p.startswith("layers/") and p.endswith("/kernel"))
  # No remat under XLA's default passes (an accelerator's setting: both hazards at once); "dots" with the CPU options
  # (what training on CPU compiles).
  for remat, options in (("none", {}), ("dots", trainer.default_compiler_options() or {})):
    c = dataclasses.replace(cfg, remat=remat)
    loss = lambda a, base, c=c: models.forward(c, base, ids, mask, adapters=[(a, 2.0)],
                                               return_logits=False).hidden.sum()
    step = jax.jit(jax.grad(loss))
    mem = lambda base, step=step, options=options: trainer.memory_bytes(
        step.lower(adapter, base).compile(compiler_options=options).memory_analysis())
    q, d = mem(qbase), mem(params)
    assert q["argument_bytes"] < d["argument_bytes"] / 4  # 4-bit codes + block scales, not float kernels
    assert q["temp_bytes"] < d["temp_bytes"] + kernels_f32 / cfg.num_layers, (remat, options, q, d)


def test_unknown_quant_and_quant_with_full_mode_are_one_line_errors():
  with pytest.raises(quant.QuantError, match=r"field 'model.quant': unknown quantization 'fp4'") as e:
    quant.quantize_base({}, "fp4")
  assert "\n" not in str(e.value)
  config = ml_collections.ConfigDict({"mode": "full", "model": {"quant": "nf4"}})
  with pytest.raises(trained.ConfigError, match=r"field 'model.quant': 'nf4' .* mode 'lora'") as e:
    trained.check_mode(config)
  assert "\n" not in str(e.value)
  config.mode = "lora"
  trained.check_mode(config)
  config.model.quant = "int4"
  with pytest.raises(quant.QuantError, match="'model.quant'"):
    trained.check_mode(config)
  with pytest.raises(quant.QuantError, match=r"'model.quant_block': block 48 .* input size 64"):
    quant.quantize_base(models.init_params(tiny_config(), jax.random.key(0)), "nf4", 48)


# ---------------------------------------------------------------- a GGUF file's own blocks (model.quant "gguf")


def _write_gguf(path, kinds):
  """A 2-layer llama GGUF whose layer kernels are stored as kinds[layer][projection index] says."""
  import gguf
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(2)
  w.add_embedding_length(64)
  w.add_feed_forward_length(128)
  w.add_head_count(4)
  w.add_head_count_kv(2)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_context_length(64)
  w.add_tensor("token_embd.weight", (0.1 * rng.standard_normal((96, 64))).astype(np.float32))
  w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
  shapes = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
            "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128)}  # [out, in], as ggml stores them
  for layer in range(2):
    for norm in ("attn_norm", "ffn_norm"):
      w.add_tensor(f"blk.{layer}.{norm}.weight", (1 + 0.1 * rng.standard_normal(64)).astype(np.float32))
    for i, (name, shape) in enumerate(shapes.items()):
      kind = getattr(gguf.GGMLQuantizationType, kinds[layer][i])
      data = gguf.quants.quantize((0.1 * rng.standard_normal(shape)).astype(np.float32), kind)
      w.add_tensor(f"blk.{layer}.{name}.weight", data, raw_shape=data.shape, raw_dtype=kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_blocks_dequantize_to_the_loaders_floats_for_q4_0_q4_1_q8_0(tmp_path):
  """Kept as the file stores them (float16 scales and mins, 4-bit or 8-bit codes; Q/K rows un-permuted with their
  blocks), every kernel dequantizes to exactly what the dequantizing loader (the gguf package) gives, and the
  forward on the blocks equals the forward on those floats."""
  q = ["Q4_0", "Q4_1", "Q8_0", "Q4_1", "Q4_0", "Q8_0", "Q4_1"]
  path = _write_gguf(tmp_path / "mixed.gguf", [q, ["Q4_1", "Q4_0"] + q[2:]])  # Q4_0 and Q4_1 layers stack
  cfg, params = models.load_pretrained(path)
  blocks = models.load_gguf_blocks(path, cfg, params)
  flat_b, flat_p = (traverse_util.flatten_dict(t, sep="/") for t in (blocks, params))
  kinds = set()
  for k, v in flat_b.items():
    if k.startswith("layers/") and k.endswith("/kernel"):
      kinds.add(type(v).__name__)
      assert v.shape == flat_p[k].shape and v.scale_LxBxO.dtype == np.float16
      np.testing.assert_array_equal(np.asarray(quant.dense_kernel(v, np.float32)), np.asarray(flat_p[k]))
  assert kinds == {"GGUFQ4", "GGUFQ8"} and quant.base_kind(blocks) == "gguf"
  ids = np.random.default_rng(1).integers(0, 96, size=(2, 9)).astype(np.int32)
  f = jax.jit(lambda p: models.forward(cfg, p, ids).logits)
  np.testing.assert_allclose(np.asarray(f(blocks)), np.asarray(f(params)), atol=1e-5, rtol=1e-5)


def test_gguf_blocks_load_without_dequantizing_a_layer_kernel(tmp_path, monkeypatch):
  """load_pretrained(gguf_blocks=True) (what model.quant "gguf" loads) dequantizes only the tensors that stay float
  (embeddings, norms): no float copy of a layer kernel is made, and the tree equals the blocks put into the fully
  dequantized load. A folder is refused with one line."""
  import gguf
  q = ["Q4_0", "Q4_1", "Q8_0", "Q4_1", "Q4_0", "Q8_0", "Q4_1"]
  path = _write_gguf(tmp_path / "kept.gguf", [q, q])
  cfg, params = models.load_pretrained(path)
  want = models.load_gguf_blocks(path, cfg, params)
  shapes, real = [], gguf.quants.dequantize
  monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: shapes.append(data.shape) or real(data, kind))
  cfg_kept, kept = models.load_pretrained(path, gguf_blocks=True)
  assert cfg_kept == cfg
  n_tensors = len(gguf.GGUFReader(str(path)).tensors)
  assert len(shapes) == n_tensors - 7 * cfg.num_layers  # everything but the 7 kernels of each layer
  flat_k, flat_w = (traverse_util.flatten_dict(t, sep="/", is_leaf=lambda _, x: quant.is_quantized(x))
                    for t in (kept, want))
  assert flat_k.keys() == flat_w.keys()
  for k in flat_k:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), flat_k[k], flat_w[k])
  with pytest.raises(models.ConfigError, match=r"'model.quant': 'gguf' .* is not a .gguf file") as e:
    models.load_pretrained(tmp_path, gguf_blocks=True)
  assert "\n" not in str(e.value)


def test_embedded_q4_1_model_on_its_own_blocks_equals_the_dequantizing_loader():
  """SmolLM2-135M-Instruct's Q4_1 layer kernels kept as blocks (about 5 bits a weight): logits on real text equal
  the float32-dequantized model's to float tolerance, and the same next tokens."""
  real = models.default_model_path()
  if not real.exists():
    pytest.skip(f"{real} not installed")
  mc = ml_collections.ConfigDict(dict(path="", revision="", param_dtype="float32", dtype="float32", remat="none",
                                      attention="auto", quant="gguf", quant_block=64))
  cfg, blocks, tok = runs.load_model(mc)
  mc.quant = "none"
  _, params, _ = runs.load_model(mc)
  assert quant.base_kind(blocks) == "gguf" and str(real).endswith("Q4_1.gguf")
  assert quant.tree_bytes(blocks["layers"]) < 0.17 * quant.tree_bytes(params["layers"])
  ids = np.asarray([tok("User: Can I get a large iced latte with oat milk for pickup at noon?")["input_ids"]])
  f = jax.jit(lambda p: models.forward(cfg, p, ids).logits)
  got, want = np.asarray(f(blocks)), np.asarray(f(params))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_gguf_quant_without_a_gguf_file_or_with_mixed_block_types_is_a_one_line_error(tmp_path):
  with pytest.raises(quant.QuantError, match=r"'model.quant': 'gguf' keeps a GGUF file's own blocks") as e:
    quant.quantize_base({}, "gguf")
  assert "\n" not in str(e.value)
  q = ["Q4_1"] * 7
  path = _write_gguf(tmp_path / "mixed.gguf", [q, ["Q8_0"] + q[1:]])
  cfg, params = models.load_pretrained(path)
  with pytest.raises(models.ConfigError, match=r"mixed.gguf: tensors 'blk.\*.attn_q.weight': .*\(Q4_1, Q8_0\)") as e:
    models.load_gguf_blocks(path, cfg, params)
  assert "\n" not in str(e.value)


def test_quant_error_figures_by_hand():
  """scripts/quant_error.py's figures: equal logits give no error and full agreement; logits shifted by a constant
  per position keep every softmax (KL 0, same argmax) with absolute error that constant; a swapped argmax at one of
  four real tokens (the pad ignored) is 3/4 agreement."""
  from tests.helpers import load_script
  qe = load_script("quant_error")
  ref = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  same = qe.error_stats(ref, ref.copy(), mask)
  assert same["mean_abs_logit_error"] == 0 and same["kl_per_token"] == 0 and same["top1_agreement"] == 1
  shifted = qe.error_stats(ref, ref + 0.5, mask)
  assert shifted["mean_abs_logit_error"] == pytest.approx(0.5) and shifted["kl_per_token"] == pytest.approx(0, abs=1e-6)
  assert shifted["top1_agreement"] == 1
  got = ref.copy()
  got[1, 2] = -ref[1, 2]  # a different argmax at one real token of text 1 (unless the row is constant)
  row = qe.error_stats(ref, got, mask)
  assert row["top1_agreement"] == pytest.approx((1 + 2 / 3) / 2)  # mean over texts of each text's agreement
  p, q = jax.nn.softmax(ref[1, 2]), jax.nn.softmax(got[1, 2])
  assert row["kl_per_token"] == pytest.approx(float(jnp.sum(p * (jnp.log(p) - jnp.log(q)))) / 3 / 2, rel=1e-5)


def test_a_base_to_quantize_is_loaded_and_quantized_on_the_host(tmp_path):
  """runs.load_model with model.quant set builds the float base and its codes on the host's CPU device (an
  accelerator never holds the float copy), whatever the default device; quant "none" loads where JAX's default
  device is. Here the default is fake CPU device 3 and the host device is device 0."""
  import ml_collections
  from perl_jax import runs
  from tests.helpers import make_tiny_hf_folder
  make_tiny_hf_folder(tmp_path / "m")
  devices = jax.devices("cpu")
  assert len(devices) >= 4
  where = lambda tree: {d for x in jax.tree.leaves(tree) for d in x.devices()}
  with jax.default_device(devices[3]):
    for kind, want in (("nf4", devices[0]), ("none", devices[3])):
      mc = ml_collections.ConfigDict(dict(path=str(tmp_path / "m"), revision="", param_dtype="float32",
                                          dtype="float32", remat="none", attention="auto", quant=kind, quant_block=32))
      _, params, _ = runs.load_model(mc)
      assert quant.base_kind(params) == kind and where(params) == {want}
