"""Benchmark one RM or RL train step, full vs LoRA: params, step time, tokens/s, compiled / measured peak memory.

  python scripts/benchmark.py --phase rm --model 7b --modes full,lora --abstract --out rows.jsonl
  python scripts/benchmark.py --phase rm --model smollm2-135m --batch 4 --seq 128 --steps 5 --out rows.jsonl
  python scripts/benchmark.py --phase rm --model /path/to/hf_folder_or.gguf --dtype float32
  python scripts/benchmark.py --phase rm --model smollm2-135m --batch 4 --seq 256 --rank 8 --against torch
  python scripts/benchmark.py --phase rl --model 7b --abstract --out rl_rows.jsonl
  python scripts/benchmark.py --phase rl --model smollm2-135m --batch 4 --prompt_len 128 --new_tokens 32 --steps 3

--model is a preset (tiny, smollm2-135m, 1b, 2b, 7b; random weights) or a real model path. --batch counts
pairs: the step sees 2 x batch sequences. --abstract compiles from shapes only (nothing is allocated), so
memory for 7B comes out on a CPU. Rows are appended to --out as JSON lines and printed as a markdown table.
Timed runs of several modes run each mode in a fresh process, so peak_bytes_in_use is per mode.
--phase rl: one RL step (REINFORCE) with every role resident; --batch counts prompts of --prompt_len tokens, each
with --new_tokens sampled; timed runs time rollout + update. --against torch (RM, test extras): the fp32 LoRA step
beside transformers + PEFT on the same weights and batch, interleaved; prints ours/torch for the step, for the
forward pass alone and for forward+backward (no optimizer), so a gap can be placed.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FlagValues()  # this script's own flags: tests load it by path and call main() repeatedly
_PHASE = flags.DEFINE_enum("phase", "rm", ["rm", "rl"], "Training phase to rm_step.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Preset name or path to an HF folder / .gguf.", flag_values=FLAGS)
_MODES = flags.DEFINE_string("modes", "full,lora", "Comma-separated modes: full, lora.", flag_values=FLAGS)
_QUANT = flags.DEFINE_string("quant", "none", "Comma-separated frozen-base storage for the LoRA rows: none, int8, nf4, "
                             "nf4dq (nf4 with double-quantized block scales: model.quant_double) (one LoRA row each; "
                             "full rows are always 'none').", flag_values=FLAGS)
flags.register_validator("quant", lambda v: set(v.split(",")) <= {"none", "int8", "nf4", "nf4dq"},
                         "--quant: comma-separated none, int8, nf4, nf4dq", flag_values=FLAGS)
_QUANT_BLOCK = flags.DEFINE_integer("quant_block", 64, "nf4 block size (input rows per absmax).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", None, "Pairs per step (default: 8, 2 for tiny).", flag_values=FLAGS)
_MICRO = flags.DEFINE_integer("microbatches", 1, "RM: each step's pairs in N equal microbatches, gradient accumulated "
                              "(num_microbatches of the RM config).", lower_bound=1, flag_values=FLAGS)
_SEQ = flags.DEFINE_integer("seq", None, "Tokens per sequence (default: 1024, 32 for tiny).", flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Dtype policy.", flag_values=FLAGS)
_REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "dots", "auto"], "Default: full from 1B params, else none.",
                           flag_values=FLAGS)
_ATTENTION = flags.DEFINE_enum("attention", None, ["auto", "xla", "cudnn", "chunked", "einsum",
                                                     "recompute", "causal", "chunked_map"],
                               "Attention kernel (ModelConfig.attention). Default: the model's ('auto').",
                               flag_values=FLAGS)
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank.", flag_values=FLAGS)
_ALPHA = flags.DEFINE_float("alpha", 16.0, "LoRA alpha.", flag_values=FLAGS)
_TARGETS = flags.DEFINE_enum("targets", "attention", ["attention", "attention_mlp"], "LoRA targets.", flag_values=FLAGS)
_ABSTRACT = flags.DEFINE_bool("abstract", False, "Compile from ShapeDtypeStructs only; no timing.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per run to this file.", flag_values=FLAGS)
_CPU_HOIST = flags.DEFINE_bool("cpu-hoist", False, "Compile with XLA:CPU's default passes (adds an f32 copy of "
                               "the frozen bf16 weights).", flag_values=FLAGS)
_NO_ISOLATE = flags.DEFINE_bool("no-isolate", False, "Run all modes in this process.", flag_values=FLAGS)
_AGAINST = flags.DEFINE_enum("against", None, ["torch"], "Time the fp32 LoRA RM step beside PyTorch + PEFT on the "
                             "same weights and batch, interleaved; print ours/torch (needs requirements-test.txt).",
                             flag_values=FLAGS)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "RL: prompt tokens (default 256, 16 for tiny).",
                                   flag_values=FLAGS)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", None, "RL: sampled tokens per prompt (default 256, 8 for tiny).",
                                   flag_values=FLAGS)


def _no_positional(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def parse(argv):
  """Sets the flags from `argv` (flags only, no program name), every other flag back to its default."""
  FLAGS.unparse_flags()
  _no_positional(FLAGS([sys.argv[0], *argv]))


def _units(modes, quants) -> list[tuple[str, str]]:
  """(mode, quant) per row: full once, on its float base; LoRA once per --quant entry."""
  return [(m, q) for m in modes for q in (quants if m == "lora" else ["none"])]


def _isolated(argv, units, out=None) -> list[dict]:
  """Runs each (mode, quant) in a child process (fresh allocator peak) and collects its rows, appending each one's
  rows to `out` as soon as its child ends (a time limit that kills a later mode keeps the earlier ones)."""
  rows = []
  for mode, q in units:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as tmp:
      child = [*argv, "--modes", mode, "--quant", q, "--out", tmp.name, "--no-isolate"]
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child], stdout=subprocess.DEVNULL)
      if proc.returncode:
        sys.exit(proc.returncode)
      new = [json.loads(line) for line in tmp.read().splitlines() if line]
    _append_rows(out, new)
    rows += new
  return rows


def _append_rows(out, rows):
  """Appends rows to the JSONL file `out` (None: nowhere)."""
  if out:
    with open(out, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


def _strip(argv, names):
  """argv without the given flags and their values."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in names:
      skip = True
    elif not any(a.startswith(n + "=") for n in names):
      out.append(a)
  return out


def run() -> list[dict]:
  """Measures every mode of --modes in this process; appends each row to --out."""
  import jax.numpy as jnp
  from perl_jax import lora, models
  from perl_jax.bench import rm_step
  targets = {"attention": lora.ATTENTION, "attention_mlp": lora.ATTENTION_MLP}[_TARGETS.value]
  lora_cfg = lora.LoraConfig(rank=_RANK.value, alpha=_ALPHA.value, targets=targets)
  base = None
  if _MODEL.value in rm_step.PRESETS:
    name, cfg = _MODEL.value, rm_step.preset(_MODEL.value)
    total = models.count_params(models.param_shapes(cfg))
  else:
    name = os.path.basename(os.path.normpath(_MODEL.value))
    cfg, base = models.load_pretrained(_MODEL.value, param_dtype=jnp.float32)
    total = models.count_params(base)
  pairs, seq, remat = rm_step.default_shape(name, total)
  cfg = dataclasses.replace(cfg, remat=_REMAT.value or remat, attention=_ATTENTION.value or cfg.attention)
  rows = []
  for mode, q in _units(_MODES.value.split(","), _QUANT.value.split(",")):
    qkw = dict(quant_kind=q.removesuffix("dq"), quant_block=_QUANT_BLOCK.value, quant_double=q.endswith("dq"))
    if _PHASE.value == "rl":
      from perl_jax.bench import rl_step
      tiny = name == "tiny"
      row = rl_step.measure(cfg, mode, name=name, batch=_BATCH.value or (2 if tiny else 8),
                                 prompt_len=_PROMPT_LEN.value or (16 if tiny else 256),
                                 new_tokens=_NEW_TOKENS.value or (8 if tiny else 256), dtype=_DTYPE.value,
                                 lora_cfg=lora_cfg, abstract=_ABSTRACT.value, steps=_STEPS.value,
                                 cpu_no_hoist=not _CPU_HOIST.value, **qkw)
      row["remat"] = cfg.remat
    else:
      row = rm_step.measure(cfg, mode, name=name, pairs=_BATCH.value or pairs, seq=_SEQ.value or seq,
                              dtype=_DTYPE.value, lora_cfg=lora_cfg, abstract=_ABSTRACT.value, steps=_STEPS.value,
                              base_params=base, cpu_no_hoist=not _CPU_HOIST.value, microbatches=_MICRO.value,
                              **qkw)
    rows.append(row)
    _append_rows(_OUT.value, [row])
  return rows


def main(argv=None) -> int:
  """Benchmarks, prints the table, returns the exit code. `argv`: flags to parse (tests); None: app.run has
  parsed sys.argv."""
  if argv is None:
    argv = sys.argv[1:]
  else:
    parse(argv)
  if _AGAINST.value:
    from perl_jax import lora
    from perl_jax.bench import torch_compare
    targets = {"attention": lora.ATTENTION, "attention_mlp": lora.ATTENTION_MLP}[_TARGETS.value]
    return torch_compare.cli(model=_MODEL.value, pairs=_BATCH.value, seq=_SEQ.value, rank=_RANK.value,
                           alpha=_ALPHA.value, targets=targets, steps=_STEPS.value, out=_OUT.value,
                           attention=_ATTENTION.value, remat=_REMAT.value)
  units = _units(_MODES.value.split(","), _QUANT.value.split(","))
  if not _NO_ISOLATE.value and not _ABSTRACT.value and len(units) > 1:
    rows = _isolated(_strip(argv, ("--modes", "--quant", "--out")), units, _OUT.value)
  else:
    rows = run()
  if _PHASE.value == "rl":
    from perl_jax.bench import rl_step
    print(rl_step.markdown(rows))
    return 0
  from perl_jax.bench import rm_step
  print(rm_step.markdown(rows))
  print(f"\nmemory: compiled_peak = argument + output + temp - alias (memory_analysis); FLOPs: "
        f"{'; '.join(sorted({r['mode'] + ': ' + r['flop_formula'] for r in rows}))}")
  return 0


def _app_main(argv) -> int:
  """app.run's entry: it parsed the global FLAGS, which hold this script's Flag objects (see below)."""
  _no_positional(argv)
  FLAGS.mark_as_parsed()
  return main()


if __name__ == "__main__":
  flags.FLAGS.append_flag_values(FLAGS)  # so that app.run parses them too and --help lists them
  for name in FLAGS:
    flags.declare_key_flag(name)
  app.run(_app_main)
