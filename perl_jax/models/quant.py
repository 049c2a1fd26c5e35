"""Weight-only quantization of the frozen layer kernels [L, in, out] for a QLoRA-style base (issue #33): the formats,
their exact round trips, and the base as a params tree whose layer kernels are quantized (`quantize_base`).

int8: symmetric, per output channel: scale_o = max_i |W_io| / 127, code = round(W / scale) in [−127, 127].
nf4 (Dettmers et al. 2023): 4-bit NormalFloat codes, blockwise absmax. Each block is `block` consecutive input rows
of one output column (the contracting axis, so a matmul dequantizes along what it reduces over):
absmax_bo = max |W_bo|, code = the NF4 level nearest to W / absmax, two codes per byte (low nibble: even row).
nf4 with double quantization (QLoRA's second level, `double=True`): the float32 absmax are stored as int8 around their
layer's mean, c = round((absmax − mean_l) / s_lb), s_lb = max_o |absmax_lbo − mean_l| / 127: one float per row of block
scales over the output axis, where bitsandbytes takes blocks of 256 over the flattened absmax and an 8-bit float
map (rows here shard like the kernel). 4 + 8/block bits a weight instead of 4 + 32/block (0.125 vs 0.5 at 64).
gguf: a GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks (32 input rows, float16 scale and min), read by
models.load_gguf_blocks and dequantized exactly as ggml does.

A quantized kernel is a NamedTuple of arrays in the kernel's place (a pytree node, so jit, scan and sharding see
its arrays; the layer scan slices their leading L axis like any kernel's). `models.forward` dequantizes one
projection at a time inside the layer loop (`matmul`), so no whole-model float copy exists. Only the layer
kernels are quantized: embeddings, LM head, norms, biases, LoRA adapters and heads keep their float dtypes.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perl_jax.errors import ConfigError

# The 16 NF4 levels (bitsandbytes' table): quantiles of N(0, 1) normalised to [−1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
KINDS = ("none", "int8", "nf4", "gguf")
GGUF_BLOCK = 32  # ggml's Q4_0 / Q4_1 / Q8_0 blocks: 32 consecutive input rows of one output row.
DEFAULT_BLOCK = 64


class QuantError(ConfigError):
  """A quantization setting that cannot apply (a one-line message naming the field)."""


def _codes_shape(q):
  """The float kernel's shape: that of the codes (one per weight)."""
  return tuple(q[0].shape)


def _packed_shape(q):
  """The float kernel's shape: the packed codes' with the input axis doubled (two codes a byte)."""
  *lead, h, o = q[0].shape
  return (*lead, 2 * h, o)


_ndim = property(lambda q: len(q.shape))


class Int8(NamedTuple):
  codes_LxIxO: jnp.ndarray  # int8
  scale_LxO: jnp.ndarray  # float32, per output channel
  shape = property(_codes_shape)
  ndim = _ndim


class NF4(NamedTuple):
  packed_LxHxO: jnp.ndarray  # uint8, H = in / 2: rows 2h (low nibble) and 2h + 1 (high nibble)
  absmax_LxBxO: jnp.ndarray  # float32, B = in / block
  shape = property(_packed_shape)
  ndim = _ndim


class NF4DQ(NamedTuple):
  """nf4 whose block absmax are themselves quantized (double quantization): absmax = code · scale + mean."""
  packed_LxHxO: jnp.ndarray  # uint8, as NF4's
  absmax_codes_LxBxO: jnp.ndarray  # int8, the block absmax around the layer's mean
  absmax_scale_LxB: jnp.ndarray  # float32, one per row of block scales (over the output axis)
  absmax_mean_L: jnp.ndarray  # float32, the layer's mean absmax
  shape = property(_packed_shape)
  ndim = _ndim


class GGUFQ4(NamedTuple):
  """ggml Q4_0 / Q4_1 blocks kept as the file stores them: w = d·q + m, q in 0..15 (Q4_0: m = −8·d)."""
  packed_LxHxO: jnp.ndarray  # uint8, H = in / 2; block b's byte j: rows 32b + j (low nibble), 32b + 16 + j (high)
  scale_LxBxO: jnp.ndarray  # float16 d, B = in / 32
  min_LxBxO: jnp.ndarray  # float16 m
  shape = property(_packed_shape)
  ndim = _ndim


class GGUFQ8(NamedTuple):
  """ggml Q8_0 blocks kept as the file stores them: w = d·q, q in −128..127."""
  codes_LxIxO: jnp.ndarray  # int8
  scale_LxBxO: jnp.ndarray  # float16 d, B = in / 32
  shape = property(_codes_shape)
  ndim = _ndim


QUANTIZED = (Int8, NF4, NF4DQ, GGUFQ4, GGUFQ8)


def is_quantized(x) -> bool:
  return isinstance(x, QUANTIZED)


def _symmetric_int8(x, axis: int):
  """(codes, scale): scale = max |x| over `axis` / 127 (that axis dropped), codes = round(x / scale) in
  [−127, 127] as int8; an all-zero slice gets scale 0 and codes 0."""
  scale = jnp.max(jnp.abs(x), axis=axis) / 127.0
  safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), axis)
  return jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale


def quantize_int8(w_LxIxO) -> Int8:
  return Int8(*_symmetric_int8(jnp.asarray(w_LxIxO, jnp.float32), axis=1))


def dequantize_int8(q: Int8, dtype=jnp.float32):
  """codes · scale_o, for any leading axes (a whole [L,in,out] stack or one layer's [in,out])."""
  return (q.codes_LxIxO.astype(jnp.float32) * q.scale_LxO[..., None, :]).astype(dtype)


def check_block(shape, block: int, field: str = "model.quant_block") -> None:
  """nf4 needs an even input size that `block` divides."""
  d_in = shape[1]
  if block < 2 or block % 2 or d_in % block:
    raise QuantError(f"config: field '{field}': block {block} must be even and divide the kernel's input size "
                     f"{d_in} (shape {tuple(shape)})")


def quantize_nf4(w_LxIxO, block: int = DEFAULT_BLOCK, double: bool = False) -> NF4 | NF4DQ:
  """NF4 codes and block absmax; with `double`, the absmax double-quantized (NF4DQ; the codes are the same)."""
  check_block(w_LxIxO.shape, block)
  w = jnp.asarray(w_LxIxO, jnp.float32)
  l, d_in, d_out = w.shape
  blocks = w.reshape(l, d_in // block, block, d_out)
  absmax = jnp.max(jnp.abs(blocks), axis=2)
  x = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, :, None, :]
  # The nearest level: the number of midpoints below x (a tie goes to the lower level, as argmin's first minimum).
  mids = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
  codes = jnp.searchsorted(mids, x, side="left").astype(jnp.uint8).reshape(l, d_in, d_out)
  q = NF4((codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(jnp.uint8), absmax)
  return double_quantize(q) if double else q


def double_quantize(q: NF4) -> NF4DQ:
  """The block absmax [L,B,O] as int8 around the layer's mean, one float32 scale per (layer, block row):
  mean_l = mean_bo absmax, s_lb = max_o |absmax − mean_l| / 127, code = round((absmax − mean_l) / s_lb)."""
  a = q.absmax_LxBxO
  mean = jnp.mean(a, axis=(1, 2))
  codes, scale = _symmetric_int8(a - mean[:, None, None], axis=2)
  return NF4DQ(q.packed_LxHxO, codes, scale, mean)


def absmax_of(q: NF4DQ):
  """The block absmax back from their int8 codes: code · scale + mean, for any leading axes."""
  return q.absmax_codes_LxBxO.astype(jnp.float32) * q.absmax_scale_LxB[..., None] + q.absmax_mean_L[..., None, None]


def nf4_codes(q: NF4):
  """The 4-bit codes [..., in, out] unpacked from their bytes."""
  lo, hi = q.packed_LxHxO & 0xF, q.packed_LxHxO >> 4
  *lead, h, o = q.packed_LxHxO.shape
  return jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * h, o)


def dequantize_nf4(q: NF4, dtype=jnp.float32):
  """NF4_LEVELS[code] · absmax of the code's block, for any leading axes."""
  codes = nf4_codes(q)
  *lead, d_in, d_out = codes.shape
  nb = q.absmax_LxBxO.shape[-2]
  vals = jnp.asarray(NF4_LEVELS)[codes].reshape(*lead, nb, d_in // nb, d_out)
  return (vals * q.absmax_LxBxO[..., None, :]).reshape(*lead, d_in, d_out).astype(dtype)


def dequantize_nf4dq(q: NF4DQ, dtype=jnp.float32):
  """NF4_LEVELS[code] · the code's block absmax, itself dequantized (absmax_of)."""
  return dequantize_nf4(NF4(q.packed_LxHxO, absmax_of(q)), dtype)


def dequantize_gguf_q4(q: GGUFQ4, dtype=jnp.float32):
  """d·q + m per block of 32 input rows (float32 arithmetic on the float16 d and m, as ggml and the gguf package
  dequantize), for any leading axes."""
  *lead, h, o = q.packed_LxHxO.shape
  nb = h // (GGUF_BLOCK // 2)
  p = q.packed_LxHxO.reshape(*lead, nb, GGUF_BLOCK // 2, o)
  codes = jnp.concatenate([p & 0xF, p >> 4], axis=-2).astype(jnp.float32)  # [..., B, 32, O]
  w = codes * q.scale_LxBxO.astype(jnp.float32)[..., None, :] + q.min_LxBxO.astype(jnp.float32)[..., None, :]
  return w.reshape(*lead, nb * GGUF_BLOCK, o).astype(dtype)


def dequantize_gguf_q8(q: GGUFQ8, dtype=jnp.float32):
  """d·q per block of 32 input rows, for any leading axes."""
  *lead, d_in, o = q.codes_LxIxO.shape
  nb = d_in // GGUF_BLOCK
  codes = q.codes_LxIxO.astype(jnp.float32).reshape(*lead, nb, GGUF_BLOCK, o)
  return (codes * q.scale_LxBxO.astype(jnp.float32)[..., None, :]).reshape(*lead, d_in, o).astype(dtype)


_DEQUANTIZE = {Int8: dequantize_int8, NF4: dequantize_nf4, NF4DQ: dequantize_nf4dq, GGUFQ4: dequantize_gguf_q4,
               GGUFQ8: dequantize_gguf_q8}


def dense_kernel(w, dtype):
  """A kernel as a float array in `dtype`: dequantized when quantized, else cast. The one place the forward reads a
  kernel, so a quantized base is expanded one projection at a time, inside the layer loop."""
  if is_quantized(w):
    return _DEQUANTIZE[type(w)](w, dtype)
  return w.astype(dtype)


def matmul(x, w, dtype):
  """x @ W over the last axis of x, W a float or a quantized kernel [in, out] (dequantized to `dtype`). With a
  quantized W the product is rematerialised from (x, codes): otherwise, with no remat policy, autodiff keeps each
  layer's dequantized kernel for the backward pass (a residual of the layer scan: a float copy of the whole base)."""
  mm = lambda x_, w_: jnp.einsum("...i,io->...o", x_, dense_kernel(w_, dtype))
  if not is_quantized(w):
    return mm(x, w)
  return jax.checkpoint(mm, policy=jax.checkpoint_policies.nothing_saveable)(x, w)


def check_kind(kind: str, field: str = "model.quant") -> None:
  if kind not in KINDS:
    raise QuantError(f"config: field '{field}': unknown quantization '{kind}' (one of {', '.join(KINDS)})")


def _layer_kernel(path: str, leaf) -> bool:
  return path.startswith("layers/") and path.endswith("/kernel") and getattr(leaf, "ndim", 0) == 3


def check_double(kind: str, double: bool, field: str = "model.quant_double") -> None:
  if double and kind != "nf4":
    raise QuantError(f"config: field '{field}': double quantization applies to nf4's block scales, not to "
                     f"model.quant '{kind}'")


def quantize_base(params, kind: str, block: int = DEFAULT_BLOCK, double: bool = False):
  """The params tree with every layer kernel [L,in,out] quantized (`kind` "int8" | "nf4"; "none" returns it as it
  is). nf4's `block` must divide every kernel's input size (a one-line QuantError naming model.quant_block); `double`
  double-quantizes nf4's block scales (NF4DQ; a one-line error for another kind).
  "gguf" is not a quantizer: a GGUF file's own blocks are loaded as they are (models.load_gguf_blocks)."""
  check_kind(kind)
  check_double(kind, double)
  if kind == "none":
    return params
  if kind == "gguf":
    raise QuantError("config: field 'model.quant': 'gguf' keeps a GGUF file's own blocks, so it needs the base "
                     "loaded from that file (model.path a .gguf, or the embedded default), not float weights")
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, leaf in flat.items():
    if kind == "nf4" and _layer_kernel(path, leaf):
      check_block(leaf.shape, block)
  fn = quantize_int8 if kind == "int8" else lambda w: quantize_nf4(w, block, double)
  out = {p: fn(leaf) if _layer_kernel(p, leaf) else leaf for p, leaf in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def frozen_base(base, mode: str, kind: str, block: int = DEFAULT_BLOCK, abstract: bool = False,
                double: bool = False):
  """The benchmarks' frozen base stored as `kind` (quantize_base; shapes only when `abstract`); a one-line error for
  a quantized base under full tuning."""
  if kind == "none":
    return base
  if mode != "lora":
    raise QuantError(f"config: field 'model.quant': '{kind}' needs a frozen base (mode 'lora')")
  fn = lambda b: quantize_base(b, kind, block, double)
  return jax.eval_shape(fn, base) if abstract else fn(base)


def dequantize_base(params, dtype=jnp.float32):
  """Every quantized kernel back to a float array in `dtype` (other leaves unchanged): for a merged export."""
  return jax.tree.map(lambda x: dense_kernel(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)


def base_kind(params) -> str:
  """ "int8" | "nf4" | "gguf" when the tree holds quantized kernels, else "none"."""
  names = {Int8: "int8", NF4: "nf4", NF4DQ: "nf4", GGUFQ4: "gguf", GGUFQ8: "gguf"}
  for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
    if is_quantized(leaf):
      return names[type(leaf)]
  return "none"


def quantized_bytes(q) -> int:
  """Bytes the quantized kernel holds (codes and scales)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in q)


def tree_bytes(tree) -> int:
  """Bytes of every array in a pytree (of arrays or ShapeDtypeStructs), quantized kernels as stored."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
