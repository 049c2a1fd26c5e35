"""Continue a chat prompt with the embedded (or any) model, a LoRA adapter attached and merged, via the KV cache.

  python scripts/generate.py [--model PATH] [--prompt "..."] [--max_new_tokens 48] [--temperature 0]
"""
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from perl_jax import lora, models, sampling

_MODEL = flags.DEFINE_string("model", "", "HF folder or .gguf; empty = embedded SmolLM2-135M-Instruct.")
_PROMPT = flags.DEFINE_string("prompt", "I'd like to order a coffee. What do you recommend?", "User message.")
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy; the paper samples RL rollouts at 0.7.")
_RANK = flags.DEFINE_integer("lora_rank", 4, "Rank of the (fresh, zero-delta) adapter attached to attention.")


def main(_):
  path = _MODEL.value or str(models.default_model_path())
  try:
    cfg, params = models.load_pretrained(path)
    tok = models.load_tokenizer(path)
  except models.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  lcfg = lora.LoraConfig(rank=_RANK.value, alpha=2.0 * _RANK.value)
  lora_params = lora.init(jax.random.key(0), params, lcfg)
  print(f"model: {path}\n{cfg.family}, {cfg.num_layers} layers; LoRA on attention: {lora.summary(params, lora_params)}")
  text = tok.apply_chat_template([{"role": "user", "content": _PROMPT.value}], tokenize=False,
                                 add_generation_prompt=True)
  enc = tok([text], return_tensors="np")
  ids, mask = jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask)
  adapters = [(lora_params, lora.scale(lcfg))]
  out = sampling.generate(cfg, params, ids, mask, max_new_tokens=_NEW.value, temperature=_TEMP.value,
                          adapters=adapters, rng=jax.random.key(1), pad_id=tok.pad_token_id)
  merged = lora.merge(params, lora_params, lora.scale(lcfg))
  t0 = time.perf_counter()
  out_merged = sampling.generate(cfg, merged, ids, mask, max_new_tokens=_NEW.value, temperature=_TEMP.value,
                                 rng=jax.random.key(1), pad_id=tok.pad_token_id)
  jax.block_until_ready(out_merged)
  dt = time.perf_counter() - t0
  n = int(out_merged.mask_BxN.sum())
  same = bool(jnp.all(out.tokens_BxN == out_merged.tokens_BxN))
  print(f"prompt: {_PROMPT.value}")
  print(f"reply:  {tok.decode(out_merged.tokens_BxN[0, :n], skip_special_tokens=True).strip()}")
  print(f"{n} tokens in {dt:.2f}s incl. compile ({n / dt:.1f} tok/s); adapter path == merged weights: {same}")


if __name__ == "__main__":
  app.run(main)
