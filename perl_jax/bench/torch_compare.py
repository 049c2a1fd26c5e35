"""The same reward-model step in PyTorch + transformers + PEFT, timed beside ours (`scripts/benchmark.py --against
torch`). Test extras only: torch, transformers' PyTorch models and peft are imported lazily, inside functions.

Same work on both sides: the same weights (ours converted with `loading.hf_state_dict` into an HF
`LlamaForSequenceClassification`), the same batch (pairs x 2 sequences x T tokens, no padding), LoRA rank r on
the same kernels (PEFT, A Kaiming-uniform, B = 0, α/r), the scalar head trained, Bradley-Terry loss, backward
and one AdamW update. The PyTorch side runs in its own (spawned) process and times itself there.

Each side's calls run back to back (one untimed call first), which is what training sees. Alternating the two
sides step by step (A B A B ...) was the old method: it spreads load changes on a shared machine over both, but on
the 2-core CPU here our step right after a torch step ran 1-3 s slower than back to back, with torch in the same
process or in its own (whose threads sit idle in between), so the alternating ratio is reported second, not as the
headline.
"""
import dataclasses
import functools
import multiprocessing
import os
import re
import statistics
import time

import jax
import numpy as np
from flax import traverse_util

from perl_jax import lora, models, reward, trained, trainer
from perl_jax.bench import rm_step
from perl_jax.models import ModelConfig
from perl_jax.models import loading

EXTRAS_ERROR = "error: --against torch needs the test extras: pip install -r requirements-test.txt"
_HF_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class MissingExtras(ImportError):
  """torch, transformers' PyTorch models or peft is not installed."""


def _imports():
  try:
    import peft
    import torch
    import transformers
  except ImportError as e:
    raise MissingExtras(EXTRAS_ERROR) from e
  return torch, transformers, peft


def hf_config(cfg: ModelConfig, transformers):
  """A transformers LlamaConfig for a Llama-family ModelConfig (what the presets and SmolLM2 are)."""
  if cfg.family != "llama" or cfg.rope.kind != "default":
    raise ValueError(f"--against torch supports plain Llama configs, got family={cfg.family} rope={cfg.rope.kind}")
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta,
      tie_word_embeddings=cfg.tie_embeddings, num_labels=1, pad_token_id=0, max_position_embeddings=8192)


def peft_targets(lora_cfg: lora.LoraConfig, cfg: ModelConfig) -> list[str]:
  """The HF module names (q_proj, ...) of the kernels our LoRA regexes select."""
  flat = traverse_util.flatten_dict(models.param_shapes(cfg), sep="/", is_leaf=lambda _, x: isinstance(x, tuple))
  paths = [p for p in flat if any(re.fullmatch(t, p) for t in lora_cfg.targets)]
  return sorted({p.split("/")[-2] for p in paths} & _HF_TARGETS)


def torch_model(cfg: ModelConfig, params, lora_cfg: lora.LoraConfig, head_kernel, seed: int = 0):
  """HF LlamaForSequenceClassification holding `params` and our head kernel [D,1] (fp32), wrapped in a PEFT LoRA
  (SEQ_CLS: head trained). With B = 0 on both sides, the first step's loss is ours (BT ignores the head bias)."""
  torch, transformers, peft = _imports()
  torch.manual_seed(seed)
  model = transformers.LlamaForSequenceClassification(hf_config(cfg, transformers))
  state = {k: torch.from_numpy(np.array(v)) for k, v in loading.hf_state_dict(cfg, params).items()
           if k != "lm_head.weight"}
  state["score.weight"] = torch.from_numpy(np.array(head_kernel, np.float32).T)
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or missing:
    raise ValueError(f"weights do not fit the HF model: missing {missing}, unexpected {unexpected}")
  pcfg = peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
                         target_modules=peft_targets(lora_cfg, cfg), task_type="SEQ_CLS")
  return peft.get_peft_model(model, pcfg).float()


def torch_step_fn(model, ids_Px2xT, lr: float = 1e-5):
  """A closure running one Bradley-Terry + AdamW step of `model` on the pairwise batch; returns the loss."""
  torch, _, _ = _imports()
  pairs, _, t = ids_Px2xT.shape
  ids = torch.from_numpy(np.asarray(ids_Px2xT, np.int64).reshape(2 * pairs, t))
  mask = torch.ones_like(ids)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
  model.train()

  def step():
    r = model(input_ids=ids, attention_mask=mask).logits[:, 0].reshape(pairs, 2)
    loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step


def torch_phase_fns(model, ids_Px2xT) -> dict:
  """{"fwd": scores without autograd, "fwd_bwd": Bradley-Terry loss and its backward (no optimizer)}."""
  torch, _, _ = _imports()
  pairs, _, t = ids_Px2xT.shape
  ids = torch.from_numpy(np.asarray(ids_Px2xT, np.int64).reshape(2 * pairs, t))
  mask = torch.ones_like(ids)

  def fwd():
    with torch.no_grad():
      return model(input_ids=ids, attention_mask=mask).logits

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    r = model(input_ids=ids, attention_mask=mask).logits[:, 0].reshape(pairs, 2)
    loss = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).mean()
    loss.backward()
    return loss

  return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def our_phase_fns(ours: "rm_step.Prepared") -> dict:
  """Ours, compiled like the step: {"fwd": scores, "fwd_bwd": the loss's gradient w.r.t. the trainable params}."""
  cfg, rcfg, batch = ours.model_cfg, ours.rcfg, ours.batch
  ids_BxT, mask_BxT = (batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "attention_mask"))
  opts = trainer.default_compiler_options()
  fwd = jax.jit(lambda tr, base: trained.scores(cfg, rcfg, tr, base, ids_BxT, mask_BxT))
  grad = jax.jit(jax.grad(lambda tr, base: reward.loss_fn(cfg, rcfg, tr, base, batch)[0]))
  args = (ours.state["trainable"], ours.base)
  fwd, grad = (f.lower(*args).compile(compiler_options=opts) for f in (fwd, grad))
  return {"fwd": lambda: jax.block_until_ready(fwd(ours.state["trainable"], ours.base)),
          "fwd_bwd": lambda: jax.block_until_ready(grad(ours.state["trainable"], ours.base))}


class Seconds(float):
  """What a function returns when it timed itself (the torch worker, in its own process)."""


def interleaved(fns: dict, steps: int) -> dict:
  """{name: [seconds per call]}; calls alternate across names (the callers warm up first). A call is timed here
  unless it returns Seconds."""
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      out = fn()
      times[name].append(out if isinstance(out, Seconds) else time.perf_counter() - t0)
  return times


def back_to_back(fns: dict, steps: int) -> dict:
  """{name: [seconds per call]}: each function once untimed, then `steps` timed calls in a row, name by name."""
  times = {}
  for name, fn in fns.items():
    fn()
    times[name] = interleaved({name: fn}, steps)[name]
  return times


def _torch_worker(conn, cfg, params, lora_cfg, head, ids, threads):
  """The PyTorch side in its own process: builds the model, then answers each name sent ("step", "fwd",
  "fwd_bwd") with ("ok", (seconds it took here, the loss for "step")), until None; an exception is answered
  ("error", its one-line text) and ends the worker."""
  try:
    torch, _, _ = _imports()
    torch.set_num_threads(threads)
    model = torch_model(cfg, params, lora_cfg, head)
    fns = {"step": torch_step_fn(model, ids), **torch_phase_fns(model, ids)}
    conn.send(("ok", torch.__version__))
    while (name := conn.recv()) is not None:
      t0 = time.perf_counter()
      out = fns[name]()
      conn.send(("ok", (time.perf_counter() - t0, out if name == "step" else None)))
  except Exception as e:  # Sent to the parent, which raises it there.
    conn.send(("error", f"{type(e).__name__}: {e}"))


class TorchWorker:
  """Handle on _torch_worker: `worker.call(name)` -> (Seconds, loss or None); the worker's exceptions are raised
  here as RuntimeError. A context manager; exit stops it. Spawned, so a script that makes one needs the
  `if __name__ == "__main__":` guard."""

  def __init__(self, cfg, params, lora_cfg, head, ids, threads):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_torch_worker, args=(child, cfg, params, lora_cfg, head, ids, threads),
                            daemon=True)
    self.proc.start()
    child.close()
    self.version = self._answer()

  def _answer(self):
    try:
      status, payload = self.conn.recv()
    except EOFError:
      self.proc.join(5)
      raise RuntimeError(f"the torch worker process died (exit code {self.proc.exitcode})") from None
    if status == "error":
      raise RuntimeError(f"torch worker: {payload}")
    return payload

  def call(self, name: str):
    self.conn.send(name)
    seconds, loss = self._answer()
    return Seconds(seconds), loss

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    try:
      self.conn.send(None)
    except OSError:
      pass
    self.proc.join(timeout=30)
    if self.proc.is_alive():
      self.proc.kill()


def against_torch(cfg: ModelConfig, *, name: str, pairs: int, seq: int, lora_cfg: lora.LoraConfig,
                  steps: int = 3, base_params=None, threads: int | None = None) -> dict:
  """Our fp32 LoRA RM step vs the PyTorch + PEFT one on the same weights and batch: medians and their ratio."""
  _imports()
  threads = threads or len(os.sched_getaffinity(0))
  if base_params is None:
    base_params = models.init_params(cfg, jax.random.key(0))
  ours = rm_step.prepare(cfg, "lora", name=name, pairs=pairs, seq=seq, dtype="float32", lora_cfg=lora_cfg,
                           base_params=base_params)
  head = jax.device_get(ours.state["trainable"]["head"]["kernel"])
  with TorchWorker(cfg, jax.device_get(base_params), lora_cfg, head, ours.host_batch["input_ids"],
                   threads) as worker:
    first = {"torch": worker.call("step")[1]}
    ours.step()
    first["ours"] = float(ours.metrics["loss"])
    fns = {"ours": ours.step, "torch": lambda: worker.call("step")[0]}
    alternating = interleaved(fns, steps)
    fns.update({f"ours_{phase}": fn for phase, fn in our_phase_fns(ours).items()})
    fns.update({f"torch_{phase}": functools.partial(lambda p: worker.call(p)[0], phase)
                for phase in ("fwd", "fwd_bwd")})
    times = back_to_back(fns, steps)
    torch_version = worker.version
  med = {k: statistics.median(v) for k, v in times.items()}
  phases = {p: dict(ours_s=med[f"ours_{p}"], torch_s=med[f"torch_{p}"], ratio=med[f"ours_{p}"] / med[f"torch_{p}"])
            for p in ("fwd", "fwd_bwd")}
  return dict(model=name, pairs=pairs, sequences=2 * pairs, seq=seq, dtype="float32", attention=cfg.attention,
              remat=cfg.remat, compiled_peak_bytes=ours.row["compiled_peak_bytes"], lora_rank=lora_cfg.rank,
              peft_targets=peft_targets(lora_cfg, cfg), threads_torch=threads,
              xla_flags=os.environ.get("XLA_FLAGS", ""), compiler_options=ours.row["compiler_options"],
              compile_s=ours.row["compile_s"], first_loss=first, step_times_s=times, ours_s=med["ours"], torch_s=med["torch"],
              ratio=med["ours"] / med["torch"], phases=phases, alternating_step_times_s=alternating,
              alternating_ratio=statistics.median(alternating["ours"]) / statistics.median(alternating["torch"]),
              torch_version=torch_version, jax_version=jax.__version__)


def ratio_line(row: dict) -> str:
  """'ours 9.81 s/step | torch+peft 12.02 s/step | ours/torch 0.82x (...) | forward only 0.86x, forward+backward
  1.15x | steps alternating ours/torch 0.90x' (the same batch without the optimizer: scores alone, and the loss's
  gradient; then the steps timed A B A B)."""
  return (f"ours {row['ours_s']:.3f} s/step | torch+peft {row['torch_s']:.3f} s/step | ours/torch "
          f"{row['ratio']:.2f}x ({row['model']}, {row['pairs']} pairs x {row['seq']} tokens, fp32, LoRA r="
          f"{row['lora_rank']} on {','.join(row['peft_targets'])}, attention {row.get('attention', 'auto')}, "
          f"remat {row.get('remat', 'none')}, medians of {len(row['step_times_s']['ours'])} "
          f"back-to-back steps, torch threads {row['threads_torch']}; first-step loss ours "
          f"{row['first_loss']['ours']:.6f} torch {row['first_loss']['torch']:.6f}) | forward only "
          f"{row['phases']['fwd']['ratio']:.2f}x, forward+backward {row['phases']['fwd_bwd']['ratio']:.2f}x | "
          f"steps alternating ours/torch {row['alternating_ratio']:.2f}x")


def resolve_model(model: str):
  """(name, ModelConfig, base params or None) for a preset name or a model path (fp32)."""
  if model in rm_step.PRESETS:
    return model, rm_step.preset(model), None
  cfg, base = models.load_pretrained(model, param_dtype=np.float32)
  return os.path.basename(os.path.normpath(model)), cfg, base


def cli(*, model: str, pairs: int | None, seq: int | None, rank: int, alpha: float, targets, steps: int,
        out: str | None = None, attention: str | None = None, remat: str | None = None) -> int:
  """`scripts/benchmark.py --against torch`: prints one ratio line (and appends the row to `out`); exit code."""
  import json
  import sys
  try:
    _imports()
  except MissingExtras as e:
    print(str(e), file=sys.stderr)
    return 2
  name, cfg, base = resolve_model(model)
  cfg = dataclasses.replace(cfg, attention=attention or cfg.attention, remat=remat or cfg.remat)
  d_pairs, d_seq, _ = rm_step.default_shape(name, models.count_params(models.param_shapes(cfg)))
  row = against_torch(cfg, name=name, pairs=pairs or d_pairs, seq=seq or d_seq, steps=steps, base_params=base,
                      lora_cfg=lora.LoraConfig(rank=rank, alpha=alpha, targets=targets))
  if out:
    with open(out, "a") as f:
      f.write(json.dumps({"phase": "rm_against_torch", **row}) + "\n")
  print(ratio_line(row))
  return 0
