"""Weight-only quantization of frozen layer kernels [L, in, out] for a QLoRA-style base (issue #33, part 1: the
formats and their exact round trips; the forward that dequantizes one projection at a time comes next).

int8: symmetric, per output channel: scale_o = max_i |W_io| / 127, code = round(W / scale) in [−127, 127].
nf4 (Dettmers et al. 2023): 4-bit NormalFloat codes, blockwise absmax. Each block is `block` consecutive input rows
of one output column (the contracting axis, so a matmul dequantizes along what it reduces over):
absmax_bo = max |W_bo|, code = the NF4 level nearest to W / absmax, two codes per byte (low nibble: even row).
"""
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# The 16 NF4 levels (bitsandbytes' table): quantiles of N(0, 1) normalised to [−1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
KINDS = ("none", "int8", "nf4")


class QuantError(ValueError):
  """A quantization setting that cannot apply (a one-line message naming the field)."""


class Int8(NamedTuple):
  codes_LxIxO: jnp.ndarray  # int8
  scale_LxO: jnp.ndarray  # float32, per output channel


class NF4(NamedTuple):
  packed_LxHxO: jnp.ndarray  # uint8, H = in / 2: rows 2h (low nibble) and 2h + 1 (high nibble)
  absmax_LxBxO: jnp.ndarray  # float32, B = in / block


def quantize_int8(w_LxIxO) -> Int8:
  w = jnp.asarray(w_LxIxO, jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=1) / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  return Int8(jnp.clip(jnp.round(w / safe[:, None, :]), -127, 127).astype(jnp.int8), scale)


def dequantize_int8(q: Int8, dtype=jnp.float32):
  return (q.codes_LxIxO.astype(jnp.float32) * q.scale_LxO[:, None, :]).astype(dtype)


def check_block(shape, block: int, field: str = "model.quant_block") -> None:
  """nf4 needs an even input size that `block` divides."""
  d_in = shape[1]
  if block < 2 or block % 2 or d_in % block:
    raise QuantError(f"config: field '{field}': block {block} must be even and divide the kernel's input size "
                     f"{d_in} (shape {tuple(shape)})")


def quantize_nf4(w_LxIxO, block: int = 64) -> NF4:
  check_block(w_LxIxO.shape, block)
  w = jnp.asarray(w_LxIxO, jnp.float32)
  l, d_in, d_out = w.shape
  blocks = w.reshape(l, d_in // block, block, d_out)
  absmax = jnp.max(jnp.abs(blocks), axis=2)
  x = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, :, None, :]
  levels = jnp.asarray(NF4_LEVELS)
  codes = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1).astype(jnp.uint8).reshape(l, d_in, d_out)
  return NF4((codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(jnp.uint8), absmax)


def nf4_codes(q: NF4):
  """The 4-bit codes [L, in, out] unpacked from their bytes."""
  lo, hi = q.packed_LxHxO & 0xF, q.packed_LxHxO >> 4
  l, h, o = q.packed_LxHxO.shape
  return jnp.stack([lo, hi], axis=2).reshape(l, 2 * h, o)


def dequantize_nf4(q: NF4, dtype=jnp.float32):
  codes = nf4_codes(q)
  l, d_in, d_out = codes.shape
  nb = q.absmax_LxBxO.shape[1]
  vals = jnp.asarray(NF4_LEVELS)[codes].reshape(l, nb, d_in // nb, d_out)
  return (vals * q.absmax_LxBxO[:, :, None, :]).reshape(l, d_in, d_out).astype(dtype)


def quantized_bytes(q) -> int:
  """Bytes the quantized kernel holds (codes and scales)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in q)
