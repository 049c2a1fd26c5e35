"""Weight-only quantization (perl_jax/quant.py) against a numpy reference written from the definitions: codes,
scales, packing, the round trip's error bound, and one-line errors for a block that cannot apply."""
import numpy as np
import pytest

from perl_jax import quant


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


@pytest.mark.parametrize("block", [48, 7, 0])
def test_nf4_block_that_does_not_fit_is_a_one_line_error(block):
  with pytest.raises(quant.QuantError, match=r"field 'model.quant_block': block .* input size 128") as e:
    quant.quantize_nf4(_kernel(), block)
  assert "\n" not in str(e.value)
