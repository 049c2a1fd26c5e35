"""Collects benchmark rows (JSON lines from scripts/benchmark.py --out) into PREFIX.json, PREFIX.md, PREFIX.png.

  python scripts/plot_benchmark.py rows.jsonl [more.jsonl ...] --prefix experiments/results/benchmark_rm \
      --note "how the rows were produced"
"""
import argparse
import json
import pathlib

from perl_jax import benchmark

NOTES = f"""Memory: compiled peak = argument + output + temp - alias bytes of
`jax.jit(reward.train_step, donate state).lower(...).compile().memory_analysis()` (state, frozen base and batch
are arguments; the donated state's outputs alias its inputs). On CPU it is compiled with
{benchmark.CPU_COMPILER_OPTIONS} (see perl_jax/benchmark.py: XLA:CPU would otherwise hoist an f32 copy of every
frozen bf16 kernel out of the layer loop, which GPU/TPU never do). "peak in use" is
device.memory_stats()["peak_bytes_in_use"] (accelerators only).

Dtype policy, same for both modes: bfloat16 = bf16 compute, fp32 master weights + fp32 AdamW moments for what is
trained (full: backbone + head; LoRA: A, B + head), frozen LoRA base stored in bf16; float32 = fp32 everywhere.
Batch: `pairs` preference pairs = 2 x pairs sequences of T tokens (Bradley-Terry RM), no padding.
FLOPs: full 6*N_mm*tokens + 12*L*T^2*heads*head_dim*seqs; LoRA 4*N_mm*tokens + 6*N_lora*tokens + same attention
term (no weight gradients for the frozen base); remat=full adds one forward. Speedup ceiling = ratio of these
hardware counts. Targets: LoRA/full compiled peak <= 0.35 at >= 1B params, <= 0.5 at 135M. Paper (PERL, RM):
LoRA uses {benchmark.PAPER['rm']['memory'][0]:.0%}-{benchmark.PAPER['rm']['memory'][1]:.0%} of full memory \
and is {benchmark.PAPER['rm']['speedup'][0]}-{benchmark.PAPER['rm']['speedup'][1]}x faster."""


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("rows", nargs="+", help="JSON-lines files from scripts/benchmark.py --out")
  p.add_argument("--prefix", default="experiments/results/benchmark_rm")
  p.add_argument("--note", action="append", default=[], help="a line of the commands block in the markdown")
  p.add_argument("--finding", action="append", default=[], help="a paragraph for the markdown's findings")
  args = p.parse_args()
  rows = [json.loads(line) for f in args.rows for line in pathlib.Path(f).read_text().splitlines() if line.strip()]
  prefix = pathlib.Path(args.prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  comps = benchmark.compare(rows)
  prefix.with_suffix(".json").write_text(json.dumps({"rows": rows, "comparisons": comps}, indent=1))
  extra = "\n".join(f"    {n}" for n in args.note)
  md = f"# PERL reward-model benchmark: full vs LoRA\n\n{benchmark.markdown(rows)}\n\n{NOTES}\n"
  if args.finding:
    md += "\n## Findings\n\n" + "\n\n".join(args.finding) + "\n"
  if extra:
    md += f"\nProduced with:\n\n{extra}\n"
  prefix.with_suffix(".md").write_text(md)
  benchmark.plot(rows, str(prefix.with_suffix(".png")))
  print(md)


if __name__ == "__main__":
  main()
