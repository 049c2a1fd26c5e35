"""Collects benchmark rows (JSON lines from scripts/benchmark.py --out) into PREFIX.json, PREFIX.md, PREFIX.png.
RM rows (--phase rm) and RL rows (--phase rl) may be mixed: each gets its table, and the plot shows LoRA/full
memory vs model size for both.

  python scripts/plot_benchmark.py rows.jsonl [more.jsonl ...] --prefix experiments/results/benchmark_rm \
      --note "how the rows were produced"
"""
import json
import pathlib

from absl import app, flags

from perl_jax.bench import rm_step
from perl_jax.bench import rl_step

_PREFIX = flags.DEFINE_string("prefix", "experiments/results/benchmark_rm", "Output path without suffix.")
_NOTE = flags.DEFINE_multi_string("note", [], "A line of the commands block in the markdown (repeatable).")
_FINDING = flags.DEFINE_multi_string("finding", [], "A paragraph for the markdown's findings (repeatable).")

NOTES = f"""Memory: compiled peak = argument + output + temp - alias bytes of
`jax.jit(reward.train_step, donate state).lower(...).compile().memory_analysis()` (state, frozen base and batch
are arguments; the donated state's outputs alias its inputs). On CPU it is compiled with
{rm_step.CPU_COMPILER_OPTIONS} (see perl_jax/bench/rm_step.py: XLA:CPU would otherwise hoist an f32 copy of every
frozen bf16 kernel out of the layer loop, which GPU/TPU never do). "peak in use" is
device.memory_stats()["peak_bytes_in_use"] (accelerators only).

Dtype policy, same for both modes: bfloat16 = bf16 compute, fp32 master weights + fp32 AdamW moments for what is
trained (full: backbone + head; LoRA: A, B + head), frozen LoRA base stored in bf16; float32 = fp32 everywhere.
Batch: `pairs` preference pairs = 2 x pairs sequences of T tokens (Bradley-Terry RM), no padding.
FLOPs: full 6*N_mm*tokens + 12*L*T^2*heads*head_dim*seqs; LoRA 4*N_mm*tokens + 6*N_lora*tokens + same attention
term (no weight gradients for the frozen base); remat=full adds one forward. Speedup ceiling = ratio of these
hardware counts. Targets: LoRA/full compiled peak <= 0.35 at >= 1B params, <= 0.5 at 135M. Paper (PERL, RM):
LoRA uses {rm_step.PAPER['rm']['memory'][0]:.0%}-{rm_step.PAPER['rm']['memory'][1]:.0%} of full memory \
and is {rm_step.PAPER['rm']['speedup'][0]}-{rm_step.PAPER['rm']['speedup'][1]}x faster."""


def _plot_series(ax, comps: list[dict], field: str) -> None:
  """One line of `field` vs total parameters per (dtype, shape, remat, abstract|measured), points annotated."""
  series = sorted({(c["dtype"], c["pairs"], c["seq"], c["remat"], c["abstract"]) for c in comps})
  for dtype, pairs, seq, remat, abstract in series:
    pts = sorted((c["total_params"], c[field], c["model"]) for c in comps if c[field] is not None and (
        c["dtype"], c["pairs"], c["seq"], c["remat"], c["abstract"]) == (dtype, pairs, seq, remat, abstract))
    if not pts:
      continue
    how = "compiled, abstract" if abstract else "measured on CPU"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if dtype == "bfloat16" else "s",
            ls="-" if len(pts) > 1 else "none", label=f"RM step {dtype} {pairs}x{seq} remat={remat} ({how})")
    for size, value, name in pts:
      ax.annotate(f"{name} {value:.2f}", (size, value), textcoords="offset points", xytext=(4, 4), fontsize=7)


def rl_points(rl_rows: list[dict]) -> list[tuple]:
  """(backbone params, LoRA/full compiled peak, model, series label) per RL comparison (rl.benchmark.compare)."""
  size = {r["model"]: r["backbone_params"] for r in rl_rows}
  return [(size[c["model"]], c["memory_ratio"], c["model"],
           f"RL update {c['dtype']} {c['batch']}x({c['prompt_len']}+{c['new_tokens']})")
          for c in rl_step.compare(rl_rows)]


def plot(rows: list[dict], path: str, rl_rows: list[dict] = ()) -> None:
  """Memory ratio (and, when any row was timed, speed-up) vs model size, one series per (dtype, shape, remat,
  abstract|measured), the paper's ranges as shaded bands, the project targets dashed, the FLOP ceilings dotted;
  RL update rows add their memory ratio (triangles) and the paper's RL band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  comps = rm_step.compare(rows)
  timed = any(c["speedup"] for c in comps)
  fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(13, 5.2) if timed else (7.5, 5.2), squeeze=False)
  ax_m = axes[0, 0]
  panels = [(ax_m, "memory_ratio", "memory")] + ([(axes[0, 1], "speedup", "speedup")] if timed else [])
  for ax, field, paper_key in panels:
    band = rm_step.PAPER["rm"][paper_key]
    ax.axhspan(*band, color="tab:green", alpha=0.15, label=f"paper RM range {band[0]}-{band[1]}")
    _plot_series(ax, comps, field)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters")
    ax.grid(alpha=0.3)
  points = rl_points(list(rl_rows))
  if points:
    band = rm_step.PAPER["rl"]["memory"]
    ax_m.axhspan(*band, color="tab:orange", alpha=0.15, label=f"paper RL range {band[0]}-{band[1]}")
    for label in dict.fromkeys(p[3] for p in points):
      pts = sorted(p for p in points if p[3] == label)
      ax_m.plot([p[0] for p in pts], [p[1] for p in pts], marker="^", label=f"{label} (compiled)")
      for size, value, name, _ in pts:
        ax_m.annotate(f"{name} {value:.2f}", (size, value), textcoords="offset points", xytext=(4, -10), fontsize=7)
  ax_m.plot([1e8, 1e9], [0.5, 0.5], "k--", lw=1, label="RM target <= 0.5 (135M), <= 0.35 (>= 1B)")
  ax_m.plot([1e9, 1e10], [0.35, 0.35], "k--", lw=1)
  ax_m.set_ylim(0, 1.05)
  ax_m.set_ylabel("LoRA / full compiled peak memory")
  if timed:
    ax_s = axes[0, 1]
    ax_s.axhline(1.5, color="k", ls=":", lw=1, label="FLOP ceiling 1.5x (1.33x with remat)")
    ax_s.axhline(4 / 3, color="k", ls=":", lw=1)
    ax_s.set_xlim(ax_m.get_xlim())
    ax_s.set_ylabel("speed-up (full step time / LoRA step time)")
  for ax in axes[0]:
    ax.legend(fontsize=7, loc="upper right")
  fig.suptitle("PERL: LoRA vs full fine-tuning" + (" (RM train step, RL update step)" if points else " (RM train step)"))
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  """Positional arguments: the JSON-lines files from scripts/benchmark.py --out."""
  if len(argv) < 2:
    raise app.UsageError("give at least one rows .jsonl file")
  every = [json.loads(line) for f in argv[1:] for line in pathlib.Path(f).read_text().splitlines() if line.strip()]
  rows = [r for r in every if r.get("phase", "rm") == "rm"]
  rl_rows = [r for r in every if r.get("phase") == "rl"]
  prefix = pathlib.Path(_PREFIX.value)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  comps = rm_step.compare(rows)
  prefix.with_suffix(".json").write_text(json.dumps(
      {"rows": rows, "comparisons": comps, "rl_rows": rl_rows, "rl_comparisons": rl_step.compare(rl_rows)},
      indent=1))
  extra = "\n".join(f"    {n}" for n in _NOTE.value)
  title = "PERL benchmark: full vs LoRA, RM step and RL update" if rl_rows else "PERL reward-model benchmark: full vs LoRA"
  md = f"# {title}\n\n{rm_step.markdown(rows)}\n\n{NOTES}\n"
  if rl_rows:
    md += f"\n## RL update step (every role resident)\n\n{rl_step.markdown(rl_rows)}\n"
  if _FINDING.value:
    md += "\n## Findings\n\n" + "\n\n".join(_FINDING.value) + "\n"
  if extra:
    md += f"\nProduced with:\n\n{extra}\n"
  prefix.with_suffix(".md").write_text(md)
  plot(rows, str(prefix.with_suffix(".png")), rl_rows)
  print(md)


if __name__ == "__main__":
  app.run(main)
