"""SFT loss: masked next-token CE against numpy and against transformers' LlamaForCausalLM; LoRA-only gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import lora, losses, models, sft, trained
from tests.helpers import make_tiny_hf_folder, tiny_config

LCFG = lora.LoraConfig(rank=4, alpha=8.0)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(seed, b=3, t=12, vocab=128):
  """Right-padded rows with loss masks on a few spans; row 2 is a filler row (valid = 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
  lengths = [t, t - 4, t - 2]
  attn = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  loss = np.zeros((b, t), np.int32)
  loss[0, 3:6] = loss[0, 9:12] = 1
  loss[1, 5:8] = 1
  loss[2, 2:9] = 1
  ids[attn == 0] = 0
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "valid": np.asarray([1, 1, 0], np.int32)}


def _random_lora(base, seed=1):
  tree = lora.init(jax.random.key(seed), base, LCFG)
  return jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape) * 0.1, tree)


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  return cfg, models.init_params(cfg, jax.random.key(0))


def test_token_logprobs_equal_numpy_log_softmax_at_temperature():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  ids = rng.integers(0, 7, size=(2, 5))
  for temperature in (1.0, 0.7):
    got = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(ids), temperature))
    want = np.take_along_axis(_np_log_softmax(logits[:, :-1] / temperature), ids[:, 1:, None], -1)[..., 0]
    assert got.shape == (2, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_equals_numpy_masked_cross_entropy(tiny, mode):
  cfg, base = tiny
  scfg = trained.PolicyConfig(mode=mode, lora_cfg=LCFG)
  batch = _batch(0)
  if mode == "lora":
    trainable, frozen = {"lora": _random_lora(base)}, base
    adapters = [(trainable["lora"], lora.scale(LCFG))]
  else:
    trainable, frozen, adapters = trained.init_policy(None, scfg, base), trained.policy_frozen(scfg, base), []
  logits = np.asarray(models.forward(cfg, base, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                                     adapters=adapters).logits)
  nll, hits, n = 0.0, 0, 0
  for b in range(2):  # row 2 is filler
    logp = _np_log_softmax(logits[b].astype(np.float64))
    for t in range(1, batch["input_ids"].shape[1]):
      if batch["loss_mask"][b, t] and batch["attention_mask"][b, t]:
        nll -= logp[t - 1, batch["input_ids"][b, t]]
        hits += int(np.argmax(logits[b, t - 1]) == batch["input_ids"][b, t])
        n += 1
  loss, m = sft.make_loss_fn(cfg, scfg)(trainable, frozen, jax.tree.map(jnp.asarray, batch), None)
  np.testing.assert_allclose(float(loss), nll / n, rtol=1e-5)
  assert float(m["num_tokens"]) == n == 9 and float(m["accuracy"]) == pytest.approx(hits / n)


def test_loss_equals_transformers_llama_loss(tmp_path):
  import torch
  import transformers
  folder = make_tiny_hf_folder(tmp_path / "model")
  cfg, base = models.load_pretrained(folder)
  hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
  batch = _batch(1, vocab=cfg.vocab_size)
  batch["valid"][:] = 1
  labels = np.where(batch["loss_mask"] * batch["attention_mask"] == 1, batch["input_ids"], -100)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
              attention_mask=torch.tensor(batch["attention_mask"]), labels=torch.tensor(labels, dtype=torch.long)).loss.item()
  scfg = trained.PolicyConfig(mode="lora", lora_cfg=LCFG)
  trainable = trained.init_policy(jax.random.key(0), scfg, base)  # B = 0: the policy is the base
  loss, _ = sft.loss_fn(cfg, scfg, trainable, base, jax.tree.map(jnp.asarray, batch))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_gradient_is_taken_wrt_lora_only(tiny):
  cfg, base = tiny
  scfg = trained.PolicyConfig(mode="lora", lora_cfg=LCFG)
  trainable = {"lora": _random_lora(base)}
  batch = jax.tree.map(jnp.asarray, _batch(2))
  grads = jax.grad(lambda tr: sft.loss_fn(cfg, scfg, tr, base, batch)[0])(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  # Central difference along the gradient direction agrees with |g|^2.
  eps = 1e-3
  f = lambda s: float(sft.loss_fn(cfg, scfg, jax.tree.map(lambda p, g: p + s * g, trainable, grads), base, batch)[0])
  g2 = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose((f(eps) - f(-eps)) / (2 * eps), g2, rtol=2e-2)
  # No target tokens: zero loss, zero tokens (no division by zero).
  empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  loss, m = sft.loss_fn(cfg, scfg, trainable, base, empty)
  assert float(loss) == 0.0 and float(m["num_tokens"]) == 0.0
