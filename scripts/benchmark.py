"""Benchmark one RM train step, full vs LoRA: params, step time, tokens/s, compiled / measured peak memory.

  python scripts/benchmark.py --phase rm --model 7b --modes full,lora --abstract --out rows.jsonl
  python scripts/benchmark.py --phase rm --model smollm2-135m --batch 4 --seq 128 --steps 5 --out rows.jsonl
  python scripts/benchmark.py --phase rm --model /path/to/hf_folder_or.gguf --dtype float32

--model is a preset (tiny, smollm2-135m, 1b, 2b, 7b; random weights) or a real model path. --batch counts
pairs: the step sees 2 x batch sequences. --abstract compiles from shapes only (nothing is allocated), so
memory for 7B comes out on a CPU. Rows are appended to --out as JSON lines and printed as a markdown table.
Timed runs of several modes run each mode in a fresh process, so peak_bytes_in_use is per mode.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

RL_MESSAGE = "RL phase needs perl_jax.rl (not yet implemented)"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--phase", choices=("rm", "rl"), default="rm")
  p.add_argument("--model", default="smollm2-135m", help="preset name or path to an HF folder / .gguf")
  p.add_argument("--modes", default="full,lora")
  p.add_argument("--batch", type=int, help="pairs per step (default: 8, 2 for tiny)")
  p.add_argument("--seq", type=int, help="tokens per sequence (default: 1024, 32 for tiny)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="dtype policy")
  p.add_argument("--remat", choices=("none", "full", "dots"), help="default: full from 1B params, else none")
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--targets", choices=("attention", "attention_mlp"), default="attention")
  p.add_argument("--abstract", action="store_true", help="compile from ShapeDtypeStructs only; no timing")
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  p.add_argument("--out", help="append one JSON line per run to this file")
  p.add_argument("--cpu-hoist", action="store_true",
                 help="compile with XLA:CPU's default passes (adds an f32 copy of the frozen bf16 weights)")
  p.add_argument("--against", choices=("torch",), help="time the fp32 LoRA step beside PyTorch + PEFT on the "
                 "same weights and batch, interleaved, and print ours/torch (needs requirements-test.txt)")
  p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run all modes in this process")
  return p.parse_args(argv)


def _isolated(argv, modes) -> list[dict]:
  """Runs each mode in a child process (fresh allocator peak) and collects its rows."""
  rows = []
  for mode in modes:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as tmp:
      child = [*argv, "--modes", mode, "--out", tmp.name, "--no-isolate"]
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child], stdout=subprocess.DEVNULL)
      if proc.returncode:
        sys.exit(proc.returncode)
      rows += [json.loads(line) for line in tmp.read().splitlines() if line]
  return rows


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


def run(args) -> list[dict]:
  import jax.numpy as jnp
  from perl_jax import benchmark, lora, models
  targets = {"attention": lora.ATTENTION, "attention_mlp": lora.ATTENTION_MLP}[args.targets]
  lora_cfg = lora.LoraConfig(rank=args.rank, alpha=args.alpha, targets=targets)
  base = None
  if args.model in benchmark.PRESETS:
    name, cfg = args.model, benchmark.preset(args.model)
    total = benchmark.count_from_shapes(models.param_shapes(cfg))
  else:
    name = os.path.basename(os.path.normpath(args.model))
    cfg, base = models.load_pretrained(args.model, param_dtype=jnp.float32)
    total = models.count_params(base)
  pairs, seq, remat = benchmark.default_shape(name, total)
  cfg = dataclasses.replace(cfg, remat=args.remat or remat)
  rows = []
  for mode in args.modes.split(","):
    row = benchmark.measure(cfg, mode, name=name, pairs=args.batch or pairs, seq=args.seq or seq,
                            dtype=args.dtype, lora_cfg=lora_cfg, abstract=args.abstract, steps=args.steps,
                            base_params=base, cpu_no_hoist=not args.cpu_hoist)
    rows.append(row)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  return rows


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.phase == "rl":
    print(RL_MESSAGE, file=sys.stderr)
    return 2
  if args.against:
    from perl_jax import bench_torch, lora
    targets = {"attention": lora.ATTENTION, "attention_mlp": lora.ATTENTION_MLP}[args.targets]
    return bench_torch.cli(model=args.model, pairs=args.batch, seq=args.seq, rank=args.rank, alpha=args.alpha,
                           targets=targets, steps=args.steps, out=args.out)
  modes = args.modes.split(",")
  if args.isolate and not args.abstract and len(modes) > 1:
    rows = _isolated(_strip(argv, ("--modes", "--out")), modes)
    if args.out:
      with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
  else:
    rows = run(args)
  from perl_jax import benchmark
  print(benchmark.markdown(rows))
  print(f"\nmemory: compiled_peak = argument + output + temp - alias (memory_analysis); FLOPs: "
        f"{'; '.join(sorted({r['mode'] + ': ' + r['flop_formula'] for r in rows}))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
