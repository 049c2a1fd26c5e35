"""Compiled peak memory of scoring with K reward models (issue #32), from shapes alone: K LoRA members on one frozen
backbone (ensemble.member_scores, the member axis vmapped over adapters and heads, or the members scored in turn)
against K separate full RMs held at once (K backbone copies, each its own arrays, scored in one program).

  rows = ensemble_scoring.measure(cfg, name="1b", ks=(1, 4, 8), batch=8, seq=512)
"""
import dataclasses

import jax
import jax.numpy as jnp

from perl_jax import ensemble, heads, lora, models, trainer
from perl_jax.bench import rm_step


def _members(cfg, k: int, lora_cfg, base):
  def one(key):
    k_lora, k_head = jax.random.split(key)
    return {"lora": lora.init(k_lora, base, lora_cfg), "head": heads.init_head(k_head, cfg.hidden_size)}
  return ensemble.stack([one(key) for key in jax.random.split(jax.random.key(0), k)])


def _full_rms(cfg, k: int, base):
  """K separate full RMs: K backbone copies (each its own arrays, as K separately trained RMs are) and heads."""
  backbone = {n: v for n, v in base.items() if n != "lm_head"}
  return [{"backbone": jax.tree.map(jnp.copy, backbone), "head": heads.init_head(jax.random.key(i), cfg.hidden_size)}
          for i in range(k)]


def measure(cfg, *, name: str, ks=(1, 4, 8), batch: int = 8, seq: int = 512, dtype: str = "bfloat16",
            lora_cfg: lora.LoraConfig = lora.LoraConfig()) -> list[dict]:
  """One row per (K, arm): compiled peak, arguments and temporaries of one scoring call on [batch, seq] tokens."""
  pol = rm_step.policy(dtype)
  cfg = dataclasses.replace(cfg, dtype=pol.compute)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(pol.base)), models.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  scale = lora.scale(lora_cfg)
  rows = []
  for k in ks:
    members = jax.eval_shape(lambda b, k=k: _members(cfg, k, lora_cfg, b), shapes)
    lora_fn = jax.jit(lambda m, b, i: ensemble.member_scores(cfg, scale, m, b, i, jnp.ones_like(i)))
    turn_fn = jax.jit(lambda m, b, i: ensemble.member_scores(cfg, scale, m, b, i, jnp.ones_like(i), in_turn=True))
    full = jax.eval_shape(lambda b, k=k: _full_rms(cfg, k, b), shapes)

    def full_fn(rms, i):
      def one(rm):
        hidden = models.forward(cfg, rm["backbone"], i, jnp.ones_like(i), return_logits=False).hidden
        return heads.head_scores(rm["head"], hidden, jnp.ones_like(i))
      return jnp.stack([one(rm) for rm in rms])

    arms = (("lora_members", lora_fn, (members, shapes, ids)),
            ("lora_members_in_turn", turn_fn, (members, shapes, ids)), ("full_rms", jax.jit(full_fn), (full, ids)))
    for arm, fn, args in arms:
      m = trainer.memory_bytes(trainer.compile_step(fn, *args)[0].memory_analysis())
      rows.append(dict(model=name, k=k, arm=arm, dtype=dtype, batch=batch, seq=seq, backend=jax.default_backend(),
                       **{key: m[key] for key in ("compiled_peak_bytes", "argument_bytes", "temp_bytes")}))
  return rows


def markdown(rows: list[dict]) -> str:
  """K per line: one backbone + K LoRA members (vmapped, and in turn) against K full RMs (GiB, compiled peak;
  arguments / temporaries)."""
  gib = lambda b: f"{b / 2**30:.2f}"
  g = lambda r: f"{gib(r['compiled_peak_bytes'])} ({gib(r['argument_bytes'])} / {gib(r['temp_bytes'])})"
  by = {(r["model"], r["k"], r["arm"]): r for r in rows}
  lines = ["| model | K | one backbone + K LoRA members | the members in turn | K full RMs | ratio |",
           "|---|---|---|---|---|---|"]
  for (model, k, arm), r in by.items():
    if arm != "lora_members" or (model, k, "full_rms") not in by:
      continue
    f, t = by[(model, k, "full_rms")], by.get((model, k, "lora_members_in_turn"))
    lines.append(f"| {model} | {k} | {g(r)} | {g(t) if t else '–'} | {g(f)} "
                 f"| {r['compiled_peak_bytes'] / f['compiled_peak_bytes']:.3f} |")
  return "\n".join(lines)
