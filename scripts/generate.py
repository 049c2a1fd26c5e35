"""Talk to a model through the KV cache: the embedded (or any) base model with a fresh LoRA adapter attached and
merged (a check that both paths agree), or a trained SFT / RL run's policy (its adapters merged into the base).

  python scripts/generate.py [--model PATH_OR_HUB_ID] [--prompt "..."] [--max_new_tokens 48] [--temperature 0]
  python scripts/generate.py --workdir runs/demo/rl [--chat]   # a trained policy; --chat: one user turn a line
"""
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags

from perl_jax import cli, lora, models, runs, sampling, trained

_MODEL = flags.DEFINE_string("model", "", "HF folder, .gguf or Hub id; empty = embedded SmolLM2-135M-Instruct.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A trained SFT or RL run folder: its policy answers (adapters merged).")
_PROMPT = flags.DEFINE_string("prompt", "I'd like to order a coffee. What do you recommend?", "User message.")
_CHAT = flags.DEFINE_bool("chat", False, "Read user turns from stdin, one a line, and answer each in one conversation.")
_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy; the paper samples RL rollouts at 0.7.")
_RANK = flags.DEFINE_integer("lora_rank", 4, "Rank of the (fresh, zero-delta) adapter attached to attention.")


def trained_policy(workdir: str):
  """(model config, merged float32 params, tokenizer) of an SFT run or an RL run's policy."""
  config = runs.read_config(workdir)
  if "rl" in config:
    from perl_jax.export import policy as export_policy
    from perl_jax.rl import setup
    policy = setup.restore(workdir)
    return policy.model_cfg, export_policy.merged_params(policy), policy.tokenizer
  if "head_init" in config or "probe_examples" in config:
    raise models.ConfigError(f"{workdir}: a reward model run has no policy to talk to (an SFT or RL run has)")
  policy = trained.restore_policy(workdir)
  return policy.model_cfg, trained.merged_policy(policy.stage, policy.trainable, policy.frozen, policy.frozen), \
      policy.tokenizer


def reply(cfg, params, tok, messages, rng) -> tuple[str, int, float]:
  """(text, tokens, seconds) of the model's next assistant turn after `messages`."""
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  enc = tok([text], return_tensors="np")
  t0 = time.perf_counter()
  out = sampling.generate(cfg, params, jnp.asarray(enc.input_ids), jnp.asarray(enc.attention_mask),
                          max_new_tokens=_NEW.value, temperature=_TEMP.value, rng=rng, pad_id=tok.pad_token_id)
  jax.block_until_ready(out)
  n = int(out.mask_BxN.sum())
  return tok.decode(out.tokens_BxN[0, :n], skip_special_tokens=True).strip(), n, time.perf_counter() - t0


def talk(workdir: str):
  cfg, params, tok = trained_policy(workdir)
  print(f"policy of {workdir}: {cfg.family}, {cfg.num_layers} layers, adapters merged")
  messages = []
  turns = (line.strip() for line in sys.stdin) if _CHAT.value else iter([_PROMPT.value])
  for i, turn in enumerate(t for t in turns if t):
    messages.append({"role": "user", "content": turn})
    text, n, dt = reply(cfg, params, tok, messages, jax.random.key(i))
    messages.append({"role": "assistant", "content": text})
    print(f"user:   {turn}\nreply:  {text}\n({n} tokens in {dt:.2f}s)", flush=True)


def check_adapter_paths(path: str):
  cfg, params = models.load_pretrained(path)
  tok = models.load_tokenizer(path)
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


def main(_):
  if _WORKDIR.value:
    cli.run_or_exit(talk, _WORKDIR.value, info=False)
  else:
    cli.run_or_exit(check_adapter_paths, _MODEL.value or str(models.default_model_path()), info=False)


if __name__ == "__main__":
  cli.app_run(main)
