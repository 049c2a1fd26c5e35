"""Collect a sweep's points into results.csv, a markdown table (mean ± std over seeds) and plots.

  python scripts/report.py --workdir runs/rm_ranks[,OTHER_DIR,...] [--out experiments/results/rm_ranks]
Reads WORKDIR/sweep.json (written by scripts/ablate.py) and each finished point's summary.json. Several folders
(the shards of one sweep run on different hosts, or an archive of earlier points) are merged: a point finished in
more than one is taken from the first that has it, and the same point name with other overrides is an error. Writes
OUT/results.csv (one row per point), OUT/results.md (points grouped over seeds) and, where the grid has them,
OUT/metric_vs_rank.png (LoRA ranks, full tuning as a horizontal line) and OUT/curves.png (train/* metrics
against steps per point, e.g. RL reward and KL).
"""
import csv
import json
import pathlib
import sys

from absl import app, flags

from perl_jax import sweeps

_WORKDIR = flags.DEFINE_list("workdir", None, "Sweep folder(s) written by scripts/ablate.py, merged in this order.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: the first sweep folder).")
_CURVES = flags.DEFINE_list("curves", None, "train/* metrics to plot against steps (default: sweep.curves).")
flags.mark_flags_as_required(["workdir"])

COLUMNS = ("trainable_params", "total_params", "median_step_time_s", "compiled_memory_bytes", "wall_s")


def load(workdir: pathlib.Path):
  spec = json.loads((workdir / "sweep.json").read_text())
  points = [sweeps.Point(p["index"], p["name"], p["config"], p["overrides"]) for p in spec["points"]]
  return spec["sweep"], points


def collect(workdirs: list[pathlib.Path]) -> tuple[dict, list[dict], dict]:
  """(sweep spec of the first folder, one row per point finished in any folder, point name -> its folder)."""
  sweep, known, rows, folders = None, {}, {}, {}
  for w in workdirs:
    spec, pts = load(w)
    sweep = sweep if sweep is not None else spec
    for p in pts:
      q, origin = known.setdefault(p.name, (p, w))
      if (q.config, q.overrides) != (p.config, p.overrides):
        raise ValueError(f"{w / 'sweep.json'}: point {p.name!r} is {p.config} {p.overrides}, but in "
                         f"{origin / 'sweep.json'} it is {q.config} {q.overrides}")
    for r in sweeps.collect(pts, w):
      if r["point"] not in rows:
        rows[r["point"]], folders[r["point"]] = r, w
  order = list(known)
  return sweep, sorted(rows.values(), key=lambda r: order.index(r["point"])), folders


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def _fmt(v, std=None, digits=3) -> str:
  if v is None:
    return "–"
  if std is None:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
  return f"{v:.{digits}f} ± {std:.{digits}f}"


def lead_metric(group: dict, metrics) -> str | None:
  """The first of `metrics` this group has an eval value for."""
  return next((m for m in metrics if group.get(f"eval.{m}") is not None), None)


def markdown(groups: list[dict], metrics) -> str:
  """One line per grouped arm: its settings, the lead metric mean ± std (n seeds), params, speed and memory."""
  settings = list(dict.fromkeys(k for g in groups for k in g if k.startswith("set.") or k == "base"))
  settings = [k for k in settings if len({str(g.get(k)) for g in groups}) > 1] or settings[:1]  # Varying only.
  head = [*(k.removeprefix("set.") for k in settings), "eval metric", "mean ± std", "seeds", "trainable", "trainable %",
          "step time (s)", "compiled peak (MiB)", "wall (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    tp, total = g.get("trainable_params"), g.get("total_params")
    mem = g.get("compiled_memory_bytes")
    metric = lead_metric(g, metrics)
    mean, std = g.get(f"eval.{metric}"), g.get(f"eval.{metric}.std")
    value = _fmt(mean, std) if g["seeds"] > 1 or mean is None else f"{mean:.3f}"  # One seed: no "± 0.000".
    cells = [str(g.get(k, "")) for k in settings] + [
        metric or "–", value, str(g["seeds"]), _fmt(tp),
        _fmt(100 * tp / total if tp and total else None), _fmt(g.get("median_step_time_s")),
        _fmt(mem / 2**20 if mem else None), _fmt(g.get("wall_s"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_rank(groups: list[dict], metrics, path: pathlib.Path) -> bool:
  """Lead metric vs LoRA rank per base config, full tuning as a dashed line of the same colour."""
  ranked = [g for g in groups if "set.lora.rank" in g and g.get("set.mode", "lora") != "full"]
  if not ranked:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for i, base in enumerate(sorted({g["base"] for g in groups})):
    color = f"C{i}"
    metric = lead_metric(next(g for g in groups if g["base"] == base), metrics)
    pts = sorted((int(g["set.lora.rank"]), g.get(f"eval.{metric}"), g.get(f"eval.{metric}.std"))
                 for g in ranked if g["base"] == base and g.get(f"eval.{metric}") is not None)
    if pts:
      ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", color=color,
                  label=f"{base.rsplit(':', 1)[-1]} LoRA")
    for g in groups:
      if g["base"] == base and g.get("set.mode") == "full" and g.get(f"eval.{metric}") is not None:
        ax.axhline(g[f"eval.{metric}"], color=color, ls="--", label=f"{base.rsplit(':', 1)[-1]} full")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("LoRA rank")
  ax.set_ylabel("eval " + " / ".join(metrics))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_curves(folders: dict, rows: list[dict], keys: list[str], path: pathlib.Path) -> bool:
  """Each key of metrics.jsonl (e.g. train/reward, train/kl) against steps, one line per point."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.3), squeeze=False)
  drawn = False
  for r in rows:
    lines = [json.loads(l) for l in (folders[r["point"]] / r["point"] / "metrics.jsonl").read_text().splitlines()]
    for ax, key in zip(axes[0], keys):
      xy = [(l["step"], l[key]) for l in lines if key in l]
      if xy:
        ax.plot(*zip(*xy), label=r["point"])
        ax.set_title(key, fontsize=9)
        drawn = True
  if drawn:
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def main(_):
  workdirs = [pathlib.Path(w) for w in _WORKDIR.value]
  for w in workdirs:
    if not (w / "sweep.json").is_file():
      print(f"error: {w / 'sweep.json'}: no such file (run scripts/ablate.py first)", file=sys.stderr)
      sys.exit(2)
  try:
    sweep, rows, folders = collect(workdirs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = pathlib.Path(_OUT.value or workdirs[0])
  out.mkdir(parents=True, exist_ok=True)
  if not rows:
    print(f"error: {','.join(map(str, workdirs))}: no finished point yet", file=sys.stderr)
    sys.exit(2)
  metrics = list(sweep.get("metrics", ["loss"]))
  metric_keys = sorted({k for r in rows for k in r if k.startswith("eval.")} | set(COLUMNS))
  groups = sweeps.group(rows, metric_keys)
  write_csv(rows, out / "results.csv")
  text = markdown(groups, metrics)
  (out / "results.md").write_text(text + "\n")
  print(text)
  plot_rank(groups, metrics, out / "metric_vs_rank.png")
  curves = _CURVES.value or list(sweep.get("curves", []))
  if curves:
    plot_curves(folders, rows, curves, out / "curves.png")


if __name__ == "__main__":
  app.run(main)
