"""One decoder-only transformer (Llama, Qwen2/3, Gemma 2/3) as pure functions over a params pytree.

Params (kernels are [in, out]; every leaf under `layers` has a leading layer axis L so layers scan):
  embed/embedding [V,D]; final_norm/scale [D]; lm_head/kernel [D,V] (untied only)
  layers/{attn_norm,mlp_norm[,post_attn_norm,post_mlp_norm]}/scale [L,D]
  layers/attn/{q,k,v,o}_proj/{kernel[,bias]}; layers/attn/{q,k}_norm/scale [L,H] (Qwen3, Gemma 3)
  layers/mlp/{gate,up,down}_proj/{kernel[,bias]}
Adapters are LoRA trees mirroring `layers/...` with {a [L,in,r], b [L,r,out]} in place of a kernel; the
forward adds (x @ a) @ b * scale for each adapter set, never forming W + scale·A·B.
"""
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from perl_jax.models import quant
from perl_jax.models.attention import attend, attention_masks
from perl_jax.models.config import ModelConfig, Rope

Params = dict[str, Any]
Adapter = tuple[Params, float]  # (LoRA tree, alpha / rank)


class Output(NamedTuple):
  logits: jax.Array | None  # float32 [B,T,V]
  hidden: jax.Array         # final-normed hidden states [B,T,D], compute dtype
  cache: dict | None


def rms_norm(x, scale, eps: float, plus_one: bool):
  """RMSNorm computed in float32; Gemma scales by (1 + w)."""
  f = jnp.promote_types(x.dtype, jnp.float32)
  x32 = x.astype(f)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w = scale.astype(f)
  return (y * (1.0 + w) if plus_one else y * w).astype(x.dtype)


def inv_frequencies(rope: Rope, head_dim: int) -> jax.Array:
  """RoPE inverse frequencies with HF's default, linear and Llama-3 scaling rules."""
  inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if rope.kind == "linear":
    return inv / rope.factor
  if rope.kind == "llama3":
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv


def rope_tables(rope: Rope, head_dim: int, positions_BxT):
  """cos and sin tables [B,T,head_dim/2] in float32."""
  angles = positions_BxT.astype(jnp.float32)[..., None] * inv_frequencies(rope, head_dim)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxNxH, cos_BxTxh, sin_BxTxh):
  """Rotates the two halves of each head (HF's rotate_half convention)."""
  f = jnp.promote_types(x_BxTxNxH.dtype, jnp.float32)
  x1, x2 = jnp.split(x_BxTxNxH.astype(f), 2, axis=-1)
  cos, sin = cos_BxTxh[:, :, None].astype(f), sin_BxTxh[:, :, None].astype(f)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BxTxNxH.dtype)


def dense(x, p: Params, loras: Sequence[tuple[Params, float]], dtype):
  """x @ W (+ b) plus every adapter's low-rank update (x @ a) @ b * scale. A quantized W (quant.Int8 / NF4) is
  dequantized here, one projection of one layer at a time."""
  y = quant.matmul(x, p["kernel"], dtype)
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  for ab, scale in loras:
    low = jnp.einsum("...i,ir->...r", x, ab["a"].astype(dtype))
    y = y + jnp.einsum("...r,ro->...o", low, ab["b"].astype(dtype)) * jnp.asarray(scale, dtype)
  return y


def _activation(cfg: ModelConfig, x):
  return jax.nn.silu(x) if cfg.activation == "silu" else jax.nn.gelu(x, approximate=True)


def _per_layer(cfg: ModelConfig, is_sliding, sliding_value, global_value):
  """This layer's value: a per-layer select only when the model mixes sliding and global layers. Otherwise the
  value is the same for every layer, so inside a scan it stays one loop-invariant array instead of a per-layer
  copy that the backward pass would save for each layer (e.g. a [layers, B, heads, T, S] attention mask)."""
  if not any(cfg.sliding_layers):
    return global_value
  if all(cfg.sliding_layers):
    return sliding_value
  return jax.tree.map(lambda s, g: jnp.where(is_sliding, s, g), sliding_value, global_value)


def _block(cfg: ModelConfig, dtype, x, lp, loras, is_sliding, ropes, masks, kv_cache, cache_index, causal):
  """One decoder layer; returns the new residual stream and this layer's (k, v) cache. `causal`: self-attention
  whose positions increase along the sequence (attention.attend_causal may skip the keys after a query block)."""
  b, t, _ = x.shape
  norm = lambda v, p: rms_norm(v, p["scale"], cfg.rms_norm_eps, cfg.norm_plus_one)
  ad = lambda group, name: [(tree[group][name], s) for tree, s in loras if name in tree.get(group, {})]
  attn = lp["attn"]
  h = norm(x, lp["attn_norm"])
  q = dense(h, attn["q_proj"], ad("attn", "q_proj"), dtype).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = dense(h, attn["k_proj"], ad("attn", "k_proj"), dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = dense(h, attn["v_proj"], ad("attn", "v_proj"), dtype).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q, k = norm(q, attn["q_norm"]), norm(k, attn["k_norm"])
  (cos_g, sin_g), (cos_l, sin_l) = ropes
  cos, sin = _per_layer(cfg, is_sliding, (cos_l, sin_l), (cos_g, sin_g))
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if kv_cache is not None:
    k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), (0, cache_index, 0, 0))
    v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), (0, cache_index, 0, 0))
    kv_cache = (k, v)
    k, v = k.astype(dtype), v.astype(dtype)
  mask = _per_layer(cfg, is_sliding, masks[1], masks[0])
  o = attend(cfg, q, k, v, mask, causal=causal).reshape(b, t, cfg.num_heads * cfg.head_dim)
  o = dense(o, attn["o_proj"], ad("attn", "o_proj"), dtype)
  if cfg.sandwich_norm:
    o = norm(o, lp["post_attn_norm"])
  x = x + o
  mlp = lp["mlp"]
  h = norm(x, lp["mlp_norm"])
  g = dense(h, mlp["gate_proj"], ad("mlp", "gate_proj"), dtype)
  u = dense(h, mlp["up_proj"], ad("mlp", "up_proj"), dtype)
  y = dense(_activation(cfg, g) * u, mlp["down_proj"], ad("mlp", "down_proj"), dtype)
  if cfg.sandwich_norm:
    y = norm(y, lp["post_mlp_norm"])
  return x + y, kv_cache


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_remat(remat: str) -> str:
  """Remat "auto" is "dots" on XLA:CPU and "none" elsewhere. On 2 CPU cores (SmolLM2-135M fp32 LoRA RM step, 4 pairs x
  256 tokens, one interleaved run) "dots" took 0.87x the time of "none" and 0.66x its compiled peak: there,
  writing and re-reading the saved activations costs more than recomputing the elementwise ops between matmuls."""
  if remat != "auto":
    return remat
  return "dots" if jax.default_backend() == "cpu" else "none"


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
  """An empty KV cache: keys/values [L,B,S,K,H], per-slot positions and validity, write index."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=jnp.zeros((batch, max_len), jnp.int32),
              valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def forward(cfg: ModelConfig, params: Params, input_ids_BxT, attention_mask_BxT=None, *,
            positions_BxT=None, adapters: Sequence[Adapter] = (), cache: dict | None = None,
            return_logits: bool = True) -> Output:
  """Runs the decoder with zero or more LoRA adapter sets; optionally reads and extends a KV cache."""
  dtype = jnp.dtype(cfg.dtype)
  b, t = input_ids_BxT.shape
  mask = jnp.ones((b, t), bool) if attention_mask_BxT is None else attention_mask_BxT.astype(bool)
  causal = positions_BxT is None and cache is None  # Positions from the mask: non-decreasing along T.
  if positions_BxT is None:
    offset = 0 if cache is None else jnp.sum(cache["valid"], axis=1, keepdims=True)
    positions_BxT = offset + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  if cache is None:
    k_pos, k_valid, index = positions_BxT, mask, None
  else:
    index = cache["index"]
    k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions_BxT.astype(jnp.int32), (0, index))
    k_valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, index))
  masks = attention_masks(positions_BxT, k_pos, k_valid, cfg.sliding_window)
  rope_g = rope_tables(cfg.rope, cfg.head_dim, positions_BxT)
  rope_l = rope_tables(cfg.rope_local, cfg.head_dim, positions_BxT) if cfg.rope_local else rope_g

  x = params["embed"]["embedding"][input_ids_BxT].astype(dtype)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
  lora_layers = [(tree["layers"], scale) for tree, scale in adapters]
  sliding = jnp.asarray(cfg.sliding_layers)

  def body(x, xs):
    lp, lls, is_sliding, kv = xs
    x, kv = _block(cfg, dtype, x, lp, list(zip(lls, [s for _, s in lora_layers])), is_sliding,
                   (rope_g, rope_l), masks, kv, index, causal)
    return x, kv

  remat = resolve_remat(cfg.remat)
  if remat != "none":
    body = jax.checkpoint(body, policy=_REMAT[remat], prevent_cse=not cfg.scan_layers)
  kv_xs = None if cache is None else (cache["k"], cache["v"])
  xs = (params["layers"], [tree for tree, _ in lora_layers], sliding, kv_xs)
  if cfg.scan_layers:
    x, kv_out = jax.lax.scan(body, x, xs)
  else:
    outs = []
    for i in range(cfg.num_layers):
      x, kv = body(x, jax.tree.map(lambda a: a[i], xs))
      outs.append(kv)
    kv_out = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
  hidden = rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps, cfg.norm_plus_one)
  new_cache = None if cache is None else dict(k=kv_out[0], v=kv_out[1], pos=k_pos, valid=k_valid, index=index + t)
  logits = unembed(cfg, params, hidden) if return_logits else None
  return Output(logits, hidden, new_cache)


def unembed(cfg: ModelConfig, params: Params, hidden):
  """Hidden states to float32 logits (tied or separate head, optional soft-capping)."""
  w = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
  logits = jnp.einsum("...d,dv->...v", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.promote_types(hidden.dtype, jnp.float32))
  if cfg.final_softcap:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  return logits


def apply(cfg: ModelConfig, params: Params, input_ids, attention_mask=None):
  """Stable entry point: float32 logits [batch, seq, vocab]."""
  return forward(cfg, params, input_ids, attention_mask).logits


def param_shapes(cfg: ModelConfig) -> Params:
  """The params pytree as shapes (tuples), the single source of the layout above."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  proj = lambda i, o, bias: {"kernel": (L, i, o), **({"bias": (L, o)} if bias else {})}
  attn = {"q_proj": proj(D, q, cfg.qkv_bias), "k_proj": proj(D, kv, cfg.qkv_bias),
          "v_proj": proj(D, kv, cfg.qkv_bias), "o_proj": proj(q, D, False)}
  if cfg.qk_norm:
    attn.update(q_norm={"scale": (L, cfg.head_dim)}, k_norm={"scale": (L, cfg.head_dim)})
  layers = {"attn_norm": {"scale": (L, D)}, "mlp_norm": {"scale": (L, D)}, "attn": attn,
            "mlp": {"gate_proj": proj(D, F, cfg.mlp_bias), "up_proj": proj(D, F, cfg.mlp_bias),
                    "down_proj": proj(F, D, cfg.mlp_bias)}}
  if cfg.sandwich_norm:
    layers.update(post_attn_norm={"scale": (L, D)}, post_mlp_norm={"scale": (L, D)})
  shapes = {"embed": {"embedding": (V, D)}, "layers": layers, "final_norm": {"scale": (D,)}}
  if not cfg.tie_embeddings:
    shapes["lm_head"] = {"kernel": (D, V)}
  return shapes


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random params (N(0, 0.02) matrices and biases, norms near their identity), for tests and benchmarks."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
  keys = jax.random.split(rng, len(leaves))
  out = []
  for key, path, shape in zip(keys, paths, leaves):
    if "'scale'" in path:
      base = 0.0 if cfg.norm_plus_one else 1.0
      out.append((base + 0.1 * jax.random.normal(key, shape)).astype(dtype))
    else:
      out.append((0.02 * jax.random.normal(key, shape)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def count_params(tree) -> int:
  """Number of parameters in `tree`: the sum of sizes of its leaves, arrays, ShapeDtypeStructs or shape tuples."""
  leaf = lambda x: _is_shape(x) or quant.is_quantized(x)  # A quantized kernel counts its float kernel's size.
  return sum(math.prod(x if _is_shape(x) else x.shape) for x in jax.tree.leaves(tree, is_leaf=leaf))
