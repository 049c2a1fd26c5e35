"""Reward-model step benchmark, full vs LoRA: params, step time, tokens/s, peak memory, MFU.

Peak memory is reported two ways:
  compiled_peak_bytes = argument + output + temp - alias, from
    jax.jit(step).lower(...).compile().memory_analysis(): every live input (state, frozen base, batch),
    every output, the compiler's scratch; outputs aliased to the donated state reuse its buffers, so they
    are subtracted once. This is the figure the paper compares, and the only one an --abstract run has.
  peak_bytes_in_use = device.memory_stats()["peak_bytes_in_use"] after the timed steps (None on CPU).

Dtype policy, identical for full and LoRA (`policy()`):
  "bfloat16": compute in bf16; what is trained (full: whole backbone + head; LoRA: A, B + head) is kept as
    fp32 master weights with fp32 AdamW moments; the frozen base (LoRA only) is stored in bf16.
  "float32": everything fp32.

FLOPs (`step_flops`), per step, with tokens = sequences * T, N_mm = parameters of the layers' matmul
kernels (no embedding: it is a gather; no LM head: the RM reads hidden states), N_lora = adapter
parameters, A = 4 * L * T^2 * num_heads * head_dim (QK^T and PV as computed, unmasked) per sequence:
  full:  6 * N_mm * tokens + 3 * A * sequences
  lora:  4 * N_mm * tokens + 6 * N_lora * tokens + 3 * A * sequences
    (the frozen base's weight gradients, 2 * N_mm * tokens, are never computed)
  remat "full" adds one more forward (2 * N_mm [+ 2 * N_lora] * tokens + A * sequences) to the hardware
  count. MFU uses the model count (no recompute); the speedup ceiling is the ratio of hardware counts,
  ~1.5x (6N/4N) without remat, ~1.33x (8N/6N) with.
"""
import dataclasses
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from perl_jax import checkpoint, lora, models, optimizer, reward, sharding, trained, trainer
from perl_jax.models import ModelConfig, Rope, quant

_LLAMA3_ROPE = Rope(theta=500000.0, kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position=8192)
PRESETS = {
    "tiny": dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=True),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, tie_embeddings=True,
                         rms_norm_eps=1e-5, rope=Rope(theta=100000.0)),
    "1b": dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
               num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True, rms_norm_eps=1e-5,
               rope=_LLAMA3_ROPE),
    "2b": dict(family="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26,
               num_heads=8, num_kv_heads=4, head_dim=256, tie_embeddings=True, activation="gelu_tanh",
               norm_plus_one=True, sandwich_norm=True, scale_embeddings=True, query_scale=256 ** -0.5,
               attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
               sliding_layers=tuple(i % 2 == 0 for i in range(26))),
    "7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, head_dim=128, tie_embeddings=False, rms_norm_eps=1e-5),
}
# Published totals, for tests: SmolLM2-135M, Llama-3.2-1B, Gemma-2-2B, Llama-2-7B.
KNOWN_TOTALS = {"smollm2-135m": 134_515_008, "1b": 1_235_814_400, "2b": 2_614_341_888, "7b": 6_738_415_616}

PAPER = {"rm": {"memory": (0.43, 0.74), "speedup": (1.15, 1.9)}, "rl": {"memory": (0.74, 0.80),
                                                                      "speedup": (1.05, 1.3)}}
PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# One definition for training and benchmarks (see trainer.CPU_COMPILER_OPTIONS).
CPU_COMPILER_OPTIONS = trainer.CPU_COMPILER_OPTIONS


def memory_target(total_params: int) -> float:
  """Project target for the RM's LoRA/full compiled-peak ratio."""
  return 0.35 if total_params >= 1e9 else 0.5


@dataclasses.dataclass(frozen=True)
class Policy:
  """Who is stored and computed in which dtype (see module docstring)."""
  name: str
  compute: str
  base: str      # frozen base params, LoRA mode
  trained: str   # master weights of what is trained (reward.init_trainable makes these fp32)


def policy(dtype: str) -> Policy:
  if dtype == "bfloat16":
    return Policy("bf16 compute, fp32 trained master + AdamW, bf16 frozen base", "bfloat16", "bfloat16", "float32")
  if dtype == "float32":
    return Policy("fp32 everywhere", "float32", "float32", "float32")
  raise ValueError(f"dtype must be float32 or bfloat16, got '{dtype}'")


def preset(name: str, **overrides) -> ModelConfig:
  return ModelConfig(**{**PRESETS[name], **overrides})


def default_shape(name: str, total_params: int) -> tuple[int, int, str]:
  """(pairs per batch, sequence length, remat): tiny for 'tiny', 8 x 1024 otherwise, remat from 1B."""
  if name == "tiny":
    return 2, 32, "none"
  return 8, 1024, "full" if total_params >= 1e9 else "none"


def matmul_params(cfg: ModelConfig) -> int:
  """N_mm: parameters of the layers' q, k, v, o, gate, up, down kernels."""
  flat = traverse_util.flatten_dict(models.param_shapes(cfg), sep="/")
  return models.count_params([s for p, s in flat.items() if p.startswith("layers/") and p.endswith("/kernel")])


def step_flops(cfg: ModelConfig, mode: str, n_lora: int, sequences: int, seq: int, remat: str) -> dict:
  """Model and hardware FLOPs of one RM train step, with the formula as text (module docstring)."""
  n_mm, tokens = matmul_params(cfg), sequences * seq
  attn = 4 * cfg.num_layers * seq ** 2 * cfg.num_heads * cfg.head_dim * sequences
  if mode == "full":
    model, fwd = 6 * n_mm * tokens + 3 * attn, 2 * n_mm * tokens + attn
    formula = "6*N_mm*tokens + 12*L*T^2*heads*head_dim*sequences"
  else:
    model, fwd = 4 * n_mm * tokens + 6 * n_lora * tokens + 3 * attn, 2 * (n_mm + n_lora) * tokens + attn
    formula = "4*N_mm*tokens + 6*N_lora*tokens + 12*L*T^2*heads*head_dim*sequences"
  hardware = model + (fwd if remat == "full" else 0)
  formula += f"; N_mm={n_mm}" + (f", N_lora={n_lora}" if mode == "lora" else "") + (
      "; hardware adds one forward for remat=full" if remat == "full" else "")
  return {"model_flops": model, "hardware_flops": hardware, "flop_formula": formula}


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s by device kind (H100/H200 SXM 989e12, A100 312e12), else None; MFU of a float32
  run is also taken against this bf16 peak."""
  return next((v for k, v in PEAK_FLOPS_BF16.items() if k in device_kind), None)


def _shape_structs(cfg: ModelConfig, dtype):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), models.param_shapes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def make_batch(pairs: int, seq: int, vocab: int, seed: int = 0, abstract: bool = False) -> dict:
  """A full-length pairwise batch: input_ids / attention_mask int32[pairs, 2, seq] (2*pairs sequences)."""
  shape = (pairs, 2, seq)
  if abstract:
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("input_ids", "attention_mask")}
  ids = np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones(shape, np.int32)}


def build(cfg: ModelConfig, mode: str, dtype: str, lora_cfg: lora.LoraConfig, abstract: bool,
          base_params=None, seed: int = 0, quant_kind: str = "none", quant_block: int = quant.DEFAULT_BLOCK,
          quant_double: bool = False):
  """(rcfg, optimizer, state, base) for one mode under the dtype policy; ShapeDtypeStructs if abstract.

  Full mode trains a copy of the backbone (all but an unread untied LM head); LoRA keeps the base separate, its
  layer kernels stored as `quant_kind` says (quant.quantize_base)."""
  pol = policy(dtype)
  rcfg = trained.RewardConfig(mode=mode, loss="bt", lora_cfg=lora_cfg)
  optim = optimizer.make_optimizer(optimizer.make_schedule(1e-5, 1000, 10))
  base_dtype = pol.base if mode == "lora" else pol.trained
  if base_params is None:
    base = _shape_structs(cfg, base_dtype) if abstract else models.init_params(
        cfg, jax.random.key(seed), jnp.dtype(base_dtype))
  else:
    base = jax.tree.map(lambda x: x.astype(base_dtype), base_params)
  base = quant.frozen_base(base, mode, quant_kind, quant_block, abstract, quant_double)
  make_state = lambda b: trainer.new_state(
      trained.init_reward(jax.random.key(seed + 1), rcfg, cfg, b), optim, jax.random.key(seed + 2))
  state = jax.eval_shape(make_state, base) if abstract else make_state(base)
  return rcfg, optim, state, trained.reward_frozen(rcfg, base)


@dataclasses.dataclass
class Prepared:
  """A compiled RM step with its placed state, frozen base and batch; `step()` runs one step and blocks.
  model_cfg and rcfg are the ones the step was compiled with (model_cfg under the dtype policy)."""
  compiled: Any
  state: Any
  base: Any
  batch: Any
  host_batch: dict
  row: dict
  model_cfg: ModelConfig
  rcfg: trained.RewardConfig
  metrics: Any = None

  def step(self):
    self.state, self.metrics = self.compiled(self.state, self.base, self.batch)
    jax.block_until_ready((self.state, self.metrics))


def prepare(cfg: ModelConfig, mode: str, *, name: str, pairs: int, seq: int, dtype: str = "bfloat16",
            lora_cfg: lora.LoraConfig = lora.LoraConfig(), abstract: bool = False, base_params=None, mesh=None,
            cpu_no_hoist: bool = True, compiler_options: dict | None = None, quant_kind: str = "none",
            quant_block: int = quant.DEFAULT_BLOCK, microbatches: int = 1, quant_double: bool = False) -> Prepared:
  """Compiles reward.train_step for one mode (placing state, base and batch unless abstract); the row holds
  everything known before timing.

  Compiles as training does (trainer.compile_step, trainer.default_compiler_options: CPU_COMPILER_OPTIONS on CPU,
  so the memory estimate is not inflated by a CPU-only f32 copy of the frozen weights); `cpu_no_hoist=False`
  compiles with XLA's default passes, `compiler_options` replaces the options altogether."""
  cfg = dataclasses.replace(cfg, dtype=policy(dtype).compute)
  mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
  rcfg, optim, state, base = build(cfg, mode, dtype, lora_cfg, abstract, base_params, quant_kind=quant_kind,
                                   quant_block=quant_block, quant_double=quant_double)
  batch = make_batch(pairs, seq, cfg.vocab_size, abstract=abstract)
  state_sh, base_sh = sharding.shardings(state, mesh), sharding.shardings(base, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, 3) for k in batch}
  step = trainer.jit_step(functools.partial(reward.loss_fn, cfg, rcfg), optim, state_sh, base_sh, batch_sh, mesh,
                          microbatches)
  if compiler_options is None:
    compiler_options = trainer.default_compiler_options() if cpu_no_hoist else {}
  compiled, perf = trainer.compile_step(step, *checkpoint.abstract_like((state, base, batch)),
                                        compiler_options=compiler_options)
  options, compile_s = compiler_options or None, perf["compile_s"]

  n_trainable = models.count_params(state["trainable"])
  n_lora = models.count_params(state["trainable"].get("lora", {}))
  n_total = models.count_params(base) + n_trainable if mode == "lora" else n_trainable
  device = mesh.devices.flat[0]
  sequences = 2 * pairs
  flops = step_flops(cfg, mode, n_lora, sequences, seq, cfg.remat)
  row = dict(phase="rm", model=name, mode=mode, quant=quant_kind,
             quant_block=quant_block if quant_kind == "nf4" else None, quant_double=quant_double,
             frozen_bytes=quant.tree_bytes(base),
             dtype=dtype, policy=policy(dtype).name, pairs=pairs,
             sequences=sequences, seq=seq, microbatches=microbatches,
             batch_note=f"{pairs} pairs = {sequences} sequences of {seq} tokens"
             + (f", {microbatches} microbatches" if microbatches > 1 else ""),
             remat=cfg.remat, attention=cfg.attention, lora_rank=lora_cfg.rank if mode == "lora" else None,
             lora_targets=list(lora_cfg.targets) if mode == "lora" else None, abstract=abstract,
             trainable_params=n_trainable, total_params=n_total, tokens_per_step=sequences * seq,
             **trainer.memory_bytes(compiled.memory_analysis()), compile_s=compile_s, compiler_options=options,
             backend=jax.default_backend(), device_kind=device.device_kind, num_devices=mesh.devices.size,
             jax_version=jax.__version__, **flops, peak_flops_bf16=peak_flops(device.device_kind),
             peak_bytes_in_use=None, step_times_s=None, step_s=None, tokens_per_s=None, mfu=None)
  if abstract:
    return Prepared(compiled, state, base, batch, batch, row, cfg, rcfg)
  placed = jax.device_put((state, base, batch), (state_sh, base_sh, batch_sh))
  return Prepared(compiled, *placed, batch, row, cfg, rcfg)


def measure(cfg: ModelConfig, mode: str, *, name: str, pairs: int, seq: int, dtype: str = "bfloat16",
            lora_cfg: lora.LoraConfig = lora.LoraConfig(), abstract: bool = False, steps: int = 5,
            base_params=None, mesh=None, cpu_no_hoist: bool = True, quant_kind: str = "none",
            quant_block: int = quant.DEFAULT_BLOCK, microbatches: int = 1, quant_double: bool = False) -> dict:
  """Compiles (and unless abstract, times) reward.train_step for one mode; returns one JSON-able row."""
  p = prepare(cfg, mode, name=name, pairs=pairs, seq=seq, dtype=dtype, lora_cfg=lora_cfg, abstract=abstract,
              base_params=base_params, mesh=mesh, cpu_no_hoist=cpu_no_hoist, quant_kind=quant_kind,
              quant_block=quant_block, microbatches=microbatches, quant_double=quant_double)
  row = p.row
  if abstract:
    return row
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    p.step()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  device = jax.tree.leaves(p.state)[0].devices().pop()
  stats = device.memory_stats() or {}
  row.update(step_times_s=times, step_s=step_s, tokens_per_s=row["tokens_per_step"] / step_s,
             peak_bytes_in_use=stats.get("peak_bytes_in_use"), loss=float(p.metrics["loss"]))
  if row["peak_flops_bf16"]:
    row["mfu"] = row["model_flops"] / step_s / row["peak_flops_bf16"]
  return row


def compare(rows: list[dict]) -> list[dict]:
  """LoRA vs full per (model, dtype, shape, remat): memory ratio, speed-up and its ceiling, vs targets; one per
  LoRA row, so a LoRA row on a quantized base (`quant`) is compared with the same full row."""
  out = []
  key = lambda r: (r.get("model"), r["dtype"], r["pairs"], r["seq"], r["remat"], r["abstract"],
                   r.get("microbatches", 1))
  full = {key(r): r for r in rows if r["mode"] == "full"}
  for r in rows:
    f = full.get(key(r))
    if r["mode"] != "lora" or f is None or not f["compiled_peak_bytes"]:
      continue
    c = dict(model=r.get("model"), lora=mode_label(r), dtype=r["dtype"], pairs=r["pairs"], seq=r["seq"],
             remat=r["remat"], abstract=r["abstract"], total_params=f["total_params"],
             memory_ratio=r["compiled_peak_bytes"] / f["compiled_peak_bytes"],
             memory_target=memory_target(f["total_params"]), paper_memory=PAPER["rm"]["memory"],
             speedup=f["step_s"] / r["step_s"] if r["step_s"] and f["step_s"] else None,
             speedup_ceiling=f["hardware_flops"] / r["hardware_flops"], paper_speedup=PAPER["rm"]["speedup"])
    if r["peak_bytes_in_use"] and f["peak_bytes_in_use"]:
      c["measured_memory_ratio"] = r["peak_bytes_in_use"] / f["peak_bytes_in_use"]
    out.append(c)
  return out


def mode_label(r) -> str:
  """"lora", "full", or "lora+nf4" for a LoRA row on a quantized base ("lora+nf4dq": its block scales
  double-quantized); " (4 mb)" when its step accumulates over 4 microbatches."""
  q, mb = r.get("quant") or "none", r.get("microbatches", 1)
  q += "dq" if r.get("quant_double") else ""
  return (r["mode"] if q == "none" else f"{r['mode']}+{q}") + (f" ({mb} mb)" if mb > 1 else "")


def _gib(b):
  return "-" if b is None else f"{b / 2 ** 30:.2f}"


def _num(x, fmt):
  return "-" if x is None else format(x, fmt)


def markdown(rows: list[dict]) -> str:
  """One line per run, then one per LoRA/full comparison with the targets and the paper's ranges."""
  lines = ["| model | mode | dtype | pairs x T (seqs) | remat | trainable | total | compiled peak GiB "
           "| arg / temp GiB | peak in use GiB | compile s | step s | tokens/s | MFU |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.get('model')} | {mode_label(r)} | {r['dtype']} | {r['pairs']}x{r['seq']} ({r['sequences']}) "
        f"| {r['remat']} | {r['trainable_params']:,} | {r['total_params']:,} | {_gib(r['compiled_peak_bytes'])} "
        f"| {_gib(r['argument_bytes'])} / {_gib(r['temp_bytes'])} | {_gib(r['peak_bytes_in_use'])} "
        f"| {r['compile_s']:.1f} | {_num(r['step_s'], '.3f')} | {_num(r['tokens_per_s'], ',.0f')} "
        f"| {_num(r['mfu'], '.1%')} |")
  comps = compare(rows)
  if comps:
    lines += ["", "| model | LoRA row | dtype | pairs x T | remat | LoRA/full compiled peak | target | paper | speedup "
              "| speedup ceiling | paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
      ok = "ok" if c["memory_ratio"] <= c["memory_target"] else "MISS"
      lines.append(
          f"| {c['model']} | {c['lora']} | {c['dtype']} | {c['pairs']}x{c['seq']} | {c['remat']} "
          f"| {c['memory_ratio']:.3f} "
          f"| <= {c['memory_target']} ({ok}) | {c['paper_memory'][0]:.2f}-{c['paper_memory'][1]:.2f} "
          f"| {_num(c['speedup'], '.2f') + ('x' if c['speedup'] else '')} | {c['speedup_ceiling']:.2f}x "
          f"| {c['paper_speedup'][0]}-{c['paper_speedup'][1]}x |")
  return "\n".join(lines)
