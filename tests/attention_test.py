"""Attention kernels agree: query-chunked and fused equal the written-out einsum, values and gradients."""
import dataclasses

import jax
import numpy as np
import pytest

from perl_jax import lora, models
from tests.helpers import random_batch, tiny_config


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_chunked_and_fused_match_einsum(family):
  base_cfg = tiny_config(family, attention="einsum")
  params = models.init_params(base_cfg, jax.random.key(0))
  lp = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), params, lora.LoraConfig(rank=2)))
  ids, mask = random_batch(0, 3, 12, base_cfg.vocab_size, left_pad=(0, 3, 7))

  def run(cfg):
    def loss(lp):
      out = models.forward(cfg, params, ids, mask, adapters=[(lp, 2.0)])
      return (out.logits * mask[..., None]).sum() / 100.0, out.logits
    (_, logits), grad = jax.value_and_grad(loss, has_aux=True)(lp)
    return np.asarray(logits), grad

  ref_logits, ref_grad = run(base_cfg)
  kinds = [("chunked", 4), ("auto", 4)] + ([("xla", 256)] if family == "llama" else [])
  for kind, block in kinds:
    logits, grad = run(dataclasses.replace(base_cfg, attention=kind, attention_block=block))
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, err_msg=kind)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4),
                 grad, ref_grad)


def test_chunked_attention_lowers_compiled_memory():
  cfg = tiny_config(attention="xla", num_layers=2)
  params = models.init_params(cfg, jax.random.key(0))
  ids, mask = random_batch(0, 8, 512, cfg.vocab_size)

  def temp_bytes(cfg):
    f = jax.jit(jax.grad(lambda p: models.forward(cfg, p, ids, mask, return_logits=False).hidden.sum()))
    return f.lower(params).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(cfg)
  chunked = temp_bytes(dataclasses.replace(cfg, attention="chunked", attention_block=64))
  assert chunked < 0.5 * full, (chunked, full)
