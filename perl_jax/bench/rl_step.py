"""RL benchmark rows: the compiled peak memory of the RL update step with every role resident (policy,
reference, value, reward), LoRA vs full, from shapes alone (`abstract`) or timed (rollout + update) on device.

LoRA: one base (dtype policy's `base`) + SFT, policy, value and RM adapter sets. Full: trainable float32 policy
and value copies + frozen reference and reward copies (four backbones). The rollout batch is `batch` prompts of
`prompt_len` tokens with `new_tokens` sampled tokens each; the update is one REINFORCE step (epochs = minibatches
= 1), as in the paper.
"""
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from perl_jax import checkpoint, heads, lora, models, optimizer, sharding, trainer
from perl_jax.models import quant
from perl_jax.bench import rm_step
from perl_jax.rl import RLConfig, learner, roles, rollout
from perl_jax.rl.step import RLStep


_OPTIM = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=10, weight_decay=0.0, clip_norm=1.0))


def build(cfg, rlcfg: RLConfig, base_params):
  """(state, frozen) of an RL run on `base_params`: random SFT / RM adapters and head stand in for trained ones."""
  k_sft, k_rm, k_head, k_init, k_state = jax.random.split(jax.random.key(0), 5)
  sft_lora = lora.init(k_sft, base_params, rlcfg.policy_lora)
  rm = {"lora": lora.init(k_rm, base_params, rlcfg.policy_lora), "head": heads.init_head(k_head, cfg.hidden_size)}
  _, optim = optimizer.make(_OPTIM, 1000)
  trainable = roles.init_trainable(k_init, cfg, rlcfg, base_params, sft_lora, rm)
  frozen = roles.frozen_params(rlcfg, base_params, sft_lora, rm)
  return learner.new_state(trainable, optim, k_state, rlcfg), frozen


def measure(cfg, mode: str, *, name: str, batch: int, prompt_len: int, new_tokens: int, dtype: str = "bfloat16",
            lora_cfg: lora.LoraConfig = lora.LoraConfig(), abstract: bool = False, steps: int = 3,
            cpu_no_hoist: bool = True, quant_kind: str = "none", quant_block: int = quant.DEFAULT_BLOCK,
            quant_double: bool = False) -> dict:
  """Compiles (and unless abstract, times rollout + update of) one RL step; returns one JSON-able row. LoRA mode's
  one base may be quantized (`quant_kind`)."""
  pol = rm_step.policy(dtype)
  cfg = dataclasses.replace(cfg, dtype=pol.compute)
  rlcfg = RLConfig(mode=mode, max_new_tokens=new_tokens, temperature=0.7, policy_lora=lora_cfg,
                   value_lora=lora_cfg, sft_scale=lora.scale(lora_cfg), reward_scale=lora.scale(lora_cfg),
                   eos_id=-1)
  base_dtype = jnp.dtype(pol.base if mode == "lora" else pol.trained)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  if abstract:
    base = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, base_dtype), models.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  else:
    base = models.init_params(cfg, jax.random.key(1), base_dtype)
  base = quant.frozen_base(base, mode, quant_kind, quant_block, abstract, quant_double)
  if abstract:
    state, frozen = jax.eval_shape(lambda b: build(cfg, rlcfg, b), base)
  else:
    state, frozen = build(cfg, rlcfg, base)
  state_sh, frozen_sh = sharding.shardings(state, mesh), sharding.shardings(frozen, mesh)
  _, optim = optimizer.make(_OPTIM, 1000)
  update = learner.jit_update(cfg, rlcfg, optim, state_sh, frozen_sh, mesh)
  options = rm_step.CPU_COMPILER_OPTIONS if cpu_no_hoist and jax.default_backend() == "cpu" else None
  compiled, perf = trainer.compile_step(update, checkpoint.abstract_like(state), checkpoint.abstract_like(frozen),
                                        rollout.batch_struct(batch, prompt_len, new_tokens), compiler_options=options)
  n_train, n_frozen = models.count_params(state["trainable"]), models.count_params(frozen)
  row = dict(phase="rl", model=name, mode=mode, quant=quant_kind,
             quant_block=quant_block if quant_kind == "nf4" else None, quant_double=quant_double,
             frozen_bytes=quant.tree_bytes(frozen),
             dtype=dtype, policy=pol.name, batch=batch, prompt_len=prompt_len,
             new_tokens=new_tokens, seq=prompt_len + new_tokens, abstract=abstract,
             lora_rank=lora_cfg.rank if mode == "lora" else None, trainable_params=n_train, frozen_params=n_frozen,
             backbone_params=models.count_params(models.param_shapes(cfg)),
             **trainer.memory_bytes(compiled.memory_analysis()), compile_s=perf["compile_s"],
             backend=jax.default_backend(), device_kind=mesh.devices.flat[0].device_kind, jax_version=jax.__version__,
             step_s=None, rollout_s=None, update_s=None, step_times_s=None)
  if abstract:
    return row
  state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
  step = RLStep(cfg, rlcfg, optim, mesh=mesh, state_sh=state_sh, frozen_sh=frozen_sh)
  prompts = {"input_ids": np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len), np.int32),
             "attention_mask": np.ones((batch, prompt_len), np.int32)}
  times, phases = [], []
  for _ in range(steps + 1):  # The first step compiles sampling, scoring and the update.
    t0 = time.perf_counter()
    state, metrics = step(state, frozen, prompts)
    jax.block_until_ready(state["step"])
    times.append(time.perf_counter() - t0)
    phases.append((float(metrics["rollout_s"]), float(metrics["update_s"])))
  step_s = statistics.median(times[1:])
  tokens = batch * new_tokens
  row.update(step_times_s=times, step_s=step_s, rollout_s=statistics.median(p[0] for p in phases[1:]),
             update_s=statistics.median(p[1] for p in phases[1:]),
             sample_tokens_per_s=float(metrics["sample_tokens_per_s"]),
             update_tokens_per_s=float(metrics["update_tokens_per_s"]), response_tokens_per_s=tokens / step_s)
  return row


def compare(rows: list[dict]) -> list[dict]:
  """LoRA/full compiled-peak ratio and full/LoRA step-time speed-up per (model, dtype, shape), one per LoRA row (a
  LoRA row on a quantized base is compared with the same full row)."""
  out = []
  key = lambda r: (r["model"], r["dtype"], r["batch"], r["prompt_len"], r["new_tokens"])
  full = {key(r): r for r in rows if r["mode"] == "full"}
  for lo in rows:
    fu = full.get(key(lo))
    if lo["mode"] != "lora" or fu is None:
      continue
    speed = fu["step_s"] / lo["step_s"] if lo["step_s"] and fu["step_s"] else None
    out.append(dict(zip(("model", "dtype", "batch", "prompt_len", "new_tokens"), key(lo)), lora=rm_step.mode_label(lo),
                    memory_ratio=lo["compiled_peak_bytes"] / fu["compiled_peak_bytes"], speedup=speed,
                    lora_peak_gib=lo["compiled_peak_bytes"] / 2**30, full_peak_gib=fu["compiled_peak_bytes"] / 2**30))
  return out


def markdown(rows: list[dict]) -> str:
  """One line per row (model, mode, shapes, params, compiled peak, step time), then LoRA/full per shape."""
  head = ["model", "mode", "dtype", "batch × (prompt + new)", "trainable", "frozen", "compiled peak (GiB)",
          "step (s)", "rollout / update (s)", "response tok/s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    step = f"{r['step_s']:.2f}" if r.get("step_s") else "–"
    phases = f"{r['rollout_s']:.2f} / {r['update_s']:.2f}" if r.get("update_s") else "–"
    tps = f"{r['response_tokens_per_s']:.1f}" if r.get("response_tokens_per_s") else "–"
    lines.append(f"| {r['model']} | {rm_step.mode_label(r)} | {r['dtype']} | {r['batch']} × ({r['prompt_len']} + "
                 f"{r['new_tokens']}) | {r['trainable_params']:,} | {r['frozen_params']:,} | "
                 f"{r['compiled_peak_bytes'] / 2**30:.2f} | {step} | {phases} | {tps} |")
  for c in compare(rows):
    speed = f", full/LoRA step time {c['speedup']:.2f}×" if c["speedup"] else ""
    label = "LoRA" if c["lora"] == "lora" else f"LoRA ({c['lora'].split('+')[1]} base)"
    lines.append(f"\n{c['model']} {c['dtype']}: {label}/full compiled peak {c['memory_ratio']:.3f}{speed}")
  return "\n".join(lines)
