"""The one training loop: a generic jitted step over a loss, and `run`, which owns everything around it.

Every stage (reward model, SFT, RL) is a short set-up over this module:
  loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)        the stage's objective, a pure function
  train_step(loss_fn, optimizer, state, frozen, batch)              grad w.r.t. state["trainable"] only
  jit_step(...)                                                     explicit in/out shardings, state donated
  run(config, workdir, state=..., frozen=..., step_fn=..., ...)     resume, cadence, metrics, checkpoints, summary
The state is a printable dict: {"step": int32[], "trainable": ..., "opt_state": ..., "rng": uint32 key data}.
"""
import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perl_jax import checkpoint, metric_writers, runs, sharding
from perl_jax import models
from perl_jax.errors import ConfigError, TrainingError  # noqa: F401 (trainer.TrainingError)

log = logging.getLogger("perl_jax")


def new_state(trainable, optimizer: optax.GradientTransformation, rng) -> dict:
  """Everything a resumed run needs besides the data position: step, trainable, optimizer state and the run's
  RNG (a typed key or its raw uint32 data; stored as data so Orbax can write it)."""
  return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
          "rng": checkpoint.key_to_data(rng)}


def step_rng(state: dict) -> jax.Array:
  """The key of this step: fold_in(run key, step); a resumed run draws exactly what an uninterrupted one would."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def microbatches(batch, num_microbatches: int):
  """The batch as [M, B/M, ...] (scan over M): microbatch j holds rows j, j+M, j+2M, … so that each device's
  contiguous shard of the batch axis splits evenly, without moving rows between devices."""
  def cut(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {num_microbatches} microbatches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)
  return jax.tree.map(cut, batch)


def loss_and_grads(loss_fn: Callable, trainable, frozen, batch, rng, num_microbatches: int = 1,
                   weight_fn: Callable | None = None):
  """(metrics, grads) of loss_fn over `batch` w.r.t. `trainable`, optionally accumulated over M microbatches:
  g = Σ_j w_j·g_j with w_j = weight_fn(microbatch_j) / Σ_i weight_fn(microbatch_i) (equal weights by default);
  metrics are averaged with the same weights. For a loss that is a mean over rows (or, with weight_fn = the valid
  token count, a masked mean over tokens) this is the full batch's gradient at 1/M of the activation memory."""
  grad_fn = jax.value_and_grad(lambda tr, b: loss_fn(tr, frozen, b, rng), has_aux=True)
  if num_microbatches == 1:
    (_, metrics), grads = grad_fn(trainable, batch)
    return metrics, grads
  micro = microbatches(batch, num_microbatches)
  w_M = (jax.vmap(weight_fn)(micro) if weight_fn else jnp.ones(num_microbatches)).astype(jnp.float32)
  w_M = w_M / jnp.maximum(jnp.sum(w_M), 1e-12)

  def body(acc, xs):
    mb, w = xs
    (_, metrics), grads = grad_fn(trainable, mb)
    return jax.tree.map(lambda a, x: a + w * x.astype(a.dtype), acc, (metrics, grads)), None

  (_, metric_shapes), grad_shapes = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro))
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), t)
  (metrics, grads), _ = jax.lax.scan(body, (zeros(metric_shapes), zeros(grad_shapes)), (micro, w_M))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
  return metrics, grads


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, state: dict, frozen, batch,
               num_microbatches: int = 1, weight_fn: Callable | None = None):
  """One optimizer update of state["trainable"]; the gradient is never taken w.r.t. `frozen`.

  `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`; metrics gain grad_norm. With num_microbatches > 1
  the gradient is accumulated (`loss_and_grads`)."""
  step_metrics, grads = loss_and_grads(loss_fn, state["trainable"], frozen, batch, step_rng(state),
                                       num_microbatches, weight_fn)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
  trainable = optax.apply_updates(state["trainable"], updates)
  step_metrics = {**step_metrics, "grad_norm": optax.global_norm(grads)}
  return {**state, "step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, step_metrics


def jit_step(loss_fn: Callable, optimizer, state_shardings, frozen_shardings, batch_shardings, mesh,
             num_microbatches: int = 1):
  """train_step jitted with explicit in/out shardings (metrics replicated); the old state's buffers are donated.
  num_microbatches > 1 accumulates the gradient over equal microbatches (loss_fn a mean over rows)."""
  return jax.jit(functools.partial(train_step, loss_fn, optimizer, num_microbatches=num_microbatches),
                 in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def memory_bytes(analysis) -> dict:
  """The compiler's memory figures; compiled_peak_bytes = argument + output + temp - alias."""
  keys = ("argument", "output", "temp", "alias")
  if analysis is None:
    return {f"{k}_bytes": None for k in (*keys, "compiled_peak", "xla_peak")}
  m = {f"{k}_bytes": int(getattr(analysis, f"{k}_size_in_bytes")) for k in keys}
  m["compiled_peak_bytes"] = m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"]
  m["xla_peak_bytes"] = int(getattr(analysis, "peak_memory_in_bytes", 0)) or None
  return m


# XLA:CPU has no bf16 dot: it upcasts operands to f32 and then hoists the convert of each whole stacked
# [L,in,out] frozen kernel out of the layer loop, i.e. an f32 copy of the base (4 * N_mm bytes) that GPU/TPU,
# with native bf16 dots, never make. Without loop-invariant code motion the copy is one layer at a time; fp32
# step time is unchanged (SmolLM2-135M LoRA RM step, 4 pairs x 256 tokens: CPU time 0.98-1.00x of XLA's default
# passes, within noise).
# XLA:CPU's YNNPACK dot fusions ran the step's [2048,576]x[576,1536] fp32 matmuls at 85 GFLOP/s on one AVX2
# core, XLA's own dot emitter at 100; the whole LoRA RM step (4 x 256 tokens) takes 0.93-0.95x the CPU time
# without them. An empty fusion type turns them off.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion",
                        "xla_cpu_experimental_ynn_fusion_type": ""}


def default_compiler_options() -> dict | None:
  """What every train step compiles with, training and benchmarks alike: CPU_COMPILER_OPTIONS on XLA:CPU."""
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def compile_step(jitted, *args, compiler_options=None) -> tuple[Callable, dict]:
  """AOT-compiles `jitted` for these (abstract or concrete) arguments with `compiler_options` (default:
  default_compiler_options()): (compiled, {compile_s, compiled_memory_bytes}), the memory being the compiler's
  own peak estimate."""
  t0 = time.perf_counter()
  options = default_compiler_options() if compiler_options is None else compiler_options
  compiled = jitted.lower(*args).compile(compiler_options=options)
  perf = {"compile_s": time.perf_counter() - t0,
          "compiled_memory_bytes": memory_bytes(compiled.memory_analysis())["compiled_peak_bytes"]}
  log.info("step compiled in %.1fs; compiler's peak memory estimate %.1f MiB", perf["compile_s"],
           (perf["compiled_memory_bytes"] or 0) / 2**20)
  return compiled, perf


def compile_by_length(jitted, model_batch: Callable, state, frozen, first_host_batch) -> tuple[Callable, dict]:
  """step_fn(state, frozen, host_batch) for `run`: `jitted` compiled once per sequence length (length buckets
  give a few), and the perf (compile time, compiled memory) of the first, full-length compile."""
  first = model_batch(first_host_batch)
  compiled = {}
  compiled[first["input_ids"].shape[-1]], perf = compile_step(jitted, state, frozen, first)

  def step_fn(s, f, host_batch):
    b = model_batch(host_batch)
    t = b["input_ids"].shape[-1]
    if t not in compiled:
      compiled[t] = compile_step(jitted, s, f, b)[0]
    return compiled[t](s, f, b)

  return step_fn, perf


def array_step(loss_fn: Callable, optimizer, state, state_sh, frozen, frozen_sh, arrays: dict, keys, mesh,
               batch_size: int, num_microbatches: int = 1) -> tuple[Callable, dict, dict]:
  """For stages trained on encoded arrays (RM, SFT): (step_fn for `run`, perf, batch shardings of `keys`). The
  jitted step over `loss_fn` is compiled per sequence length; perf adds trainable and total parameter counts."""
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in arrays.items() if k in keys}
  model_batch = lambda b: sharding.global_batch({k: b[k] for k in keys if k in b}, mesh)
  step = jit_step(loss_fn, optimizer, state_sh, frozen_sh, batch_sh, mesh, num_microbatches)
  first = {k: v[: batch_size // jax.process_count()] for k, v in arrays.items()}
  step_fn, perf = compile_by_length(step, model_batch, state, frozen, first)
  n_trainable = models.count_params(state["trainable"])
  perf.update(trainable_params=n_trainable, total_params=models.count_params(frozen) + n_trainable)
  return step_fn, perf, batch_sh


def check_batch_sizes(config, mesh) -> None:
  """data.batch_size and data.eval_batch_size must divide over the data x fsdp devices, and the batch over them
  times num_microbatches (where the stage has that field): one line otherwise."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for field in ("batch_size", "eval_batch_size"):
    if config.data[field] % shards:
      raise ConfigError(f"config: field 'data.{field}': {config.data[field]} is not divisible by "
                        f"data x fsdp = {shards} devices")
  m = config.get("num_microbatches", 1)
  if m < 1 or config.data.batch_size % (shards * m):
    raise ConfigError(f"config: field 'num_microbatches': {m} must be >= 1 and divide data.batch_size "
                      f"({config.data.batch_size}) over data x fsdp = {shards} devices")


def itstime(step: int, every: int, total_steps: int, *, first: bool = False, last: bool = True) -> bool:
  """Whether `step` (1-based, just finished) is a multiple of `every` (0 = never), or the first / last step
  when asked; big_vision's utils.itstime, the one cadence rule for logging, eval and checkpoints."""
  return (every > 0 and step % every == 0) or (last and step == total_steps) or (first and step == 1)


@dataclasses.dataclass
class _Pending:
  """A step's device metrics, read on the host one step later so reading never stalls the device."""
  step: int
  metrics: dict
  tokens: int
  log: bool
  t_done: float | None = None  # When the step was known to be done: at creation if step_fn blocked on it.


def _done_now(step_metrics: dict) -> float | None:
  """perf_counter() if every metric is already computed (a synchronous step_fn, e.g. RL's), else None."""
  ready = all(v.is_ready() for v in step_metrics.values() if hasattr(v, "is_ready"))
  return time.perf_counter() if ready else None


def _finite_or_raise(step: int, values: dict, ckpt) -> None:
  bad = {k: values[k] for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])}
  if bad:
    raise TrainingError(f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; stopped, "
                        f"the last good checkpoint is step {ckpt.latest_step()}")


def run(config, workdir, *, state: dict, frozen, step_fn: Callable, batches, evaluate: Callable | None = None,
        schedule: Callable | None = None, perf: dict | None = None, info: dict | None = None,
        progress_keys: tuple[str, ...] = ("accuracy",), tokens_fn: Callable | None = None,
        stop_after: int | None = None) -> tuple[dict, dict]:
  """Trains `state` to config.steps in `workdir`, resuming from its latest checkpoint; returns (state, eval).

  step_fn(state, frozen, host_batch) -> (state, device metrics with "loss"); batches: an iterator of host batches
  with get_state()/set_state(); evaluate(state, frozen) -> host metrics. Cadence (config.log_every, eval_every,
  checkpoint_every) goes through `itstime`. Writes run.json (first start), metrics.jsonl + tb/ ("train/*",
  "eval/*"), a progress line, Orbax checkpoints (state + data position), eval.json and summary.json at the end.
  `stop_after` ends the run early at that step with a checkpoint, as a pre-emption would. A non-finite loss or
  gradient norm raises TrainingError naming the step, before any checkpoint of the broken state is written.
  """
  workdir, perf, info, t_start = pathlib.Path(workdir), dict(perf or {}), dict(info or {}), time.perf_counter()
  tokens_fn = tokens_fn or (lambda b: int(np.sum(b["attention_mask"])) * jax.process_count())
  ckpt = checkpoint.Checkpointer(workdir / runs.CHECKPOINTS, max_to_keep=config.keep_checkpoints)
  wall_before = 0.0  # Earlier legs of a resumed run, each up to its last checkpoint.
  if ckpt.latest_step() is not None:
    step, state, extra = ckpt.restore(checkpoint.abstract_like(state))
    batches.set_state(extra["data"])
    wall_before = float(extra.get("wall_s", 0.0))
    log.info("resumed from step %d", step)
  else:
    runs.write(workdir, config, info)
  total = config.steps
  start = int(state["step"])
  writer = metric_writers.MetricsWriter(workdir, resume_step=start)
  progress = metric_writers.Progress(total, start_step=start, time_fn=time.perf_counter)
  eval_metrics, step_times, tokens, pending = {}, [], 0, None
  last_log = (start, time.perf_counter())

  def flush(p: _Pending):
    """Checks step p.step's loss is finite (every step) and logs it (log steps); blocks until it is done."""
    nonlocal last_log
    if not p.log:
      _finite_or_raise(p.step, {k: float(v) for k, v in p.metrics.items() if k in ("loss", "grad_norm")}, ckpt)
      return
    values = {k: float(v) for k, v in p.metrics.items()}
    _finite_or_raise(p.step, values, ckpt)
    now = p.t_done if p.t_done is not None else time.perf_counter()
    dt = now - last_log[1]
    step_times.append(dt / (p.step - last_log[0]))
    values.update(step_time_s=step_times[-1], tokens_per_s=p.tokens / dt)
    if schedule is not None:
      values["lr"] = float(schedule(p.step - 1))
    writer.write(p.step, {f"train/{k}": v for k, v in values.items()})
    progress.update(p.step, loss=values["loss"], tokens=p.tokens, now=now,
                    **{k: values[k] for k in progress_keys if k in values})
    last_log = (p.step, now)

  try:
    for step in range(start + 1, total + 1):
      batch = next(batches)
      tokens += tokens_fn(batch)
      try:
        state, step_metrics = step_fn(state, frozen, batch)
      except TrainingError as e:  # A step that found its own input broken (e.g. RL's non-finite reward).
        raise TrainingError(f"{e}; stopped, the last good checkpoint is step {ckpt.latest_step()}") from None
      if pending is not None:
        flush(pending)
      pending = _Pending(step, step_metrics, tokens, itstime(step, config.log_every, total), _done_now(step_metrics))
      if pending.log:
        tokens = 0
      save = itstime(step, config.checkpoint_every, total) or step == stop_after
      evaluating = evaluate is not None and itstime(step, config.eval_every, total)
      if save or evaluating:  # Nothing broken is evaluated or saved.
        flush(pending)
        pending = None
      if evaluating:
        eval_metrics = evaluate(state, frozen)
        writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        log.info("eval step %d: %s", step, json.dumps(eval_metrics))
      if save:
        ckpt.save(step, state, {"data": batches.get_state(), "wall_s": wall_before + time.perf_counter() - t_start})
      if last_log[0] == step and (save or evaluating):
        last_log = (step, time.perf_counter())  # Step times exclude eval and checkpoint writes.
      if step == stop_after:
        break
    if pending is not None:
      flush(pending)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  if jax.process_index() == 0 and stop_after is None and int(state["step"]) > start:
    perf["median_step_time_s"] = float(np.median(step_times)) if step_times else None
    perf["wall_s"] = wall_before + time.perf_counter() - t_start  # All legs (each up to its last checkpoint).
    if eval_metrics:
      (workdir / "eval.json").write_text(json.dumps(eval_metrics, indent=1))
    (workdir / "summary.json").write_text(json.dumps({"eval": eval_metrics, **perf, **info}, indent=1))
  return state, eval_metrics


def place(tree, mesh) -> tuple[Any, Any]:
  """(tree on `mesh` under the partition rules, its shardings)."""
  shardings = sharding.shardings(tree, mesh)
  return jax.device_put(tree, shardings), shardings
