"""Learning curves of finished or running runs: an eval metric against steps and against training wall-clock,
one line per run, a baseline as a horizontal line; also prints the points as one JSON object.

  python scripts/plot_curves.py --run LoRA=runs/tm4_lora --run full=runs/tm4_full --metric roc_auc \
      --baseline 0.743 --baseline_label "TF-IDF + LR" --out experiments/results/rm_tm4_curves.png
Wall-clock is the sum of logged step times (train/step_time_s × steps since the previous log line): training
time only, without eval or checkpoint writes, so resumed runs and runs beside other jobs stay comparable.
"""
import json
import pathlib

from absl import app, flags

_RUN = flags.DEFINE_multi_string("run", [], "LABEL=RUN_FOLDER (repeatable).")
_METRIC = flags.DEFINE_string("metric", "roc_auc", "Eval metric (eval/<metric> in metrics.jsonl).")
_BASELINE = flags.DEFINE_float("baseline", None, "A horizontal reference line (e.g. the bag-of-words baseline).")
_BASELINE_LABEL = flags.DEFINE_string("baseline_label", "baseline", "Its legend label.")
_TITLE = flags.DEFINE_string("title", "", "Figure title.")
_OUT = flags.DEFINE_string("out", None, "PNG path.")
flags.mark_flags_as_required(["out"])


def curve(run_dir, metric: str) -> list[dict]:
  """[{step, wall_s, value}] of eval/<metric>; wall_s = Σ train/step_time_s × (step − previous logged step)."""
  rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
  wall, last_step, at_step, points = 0.0, 0, {}, []
  for r in rows:
    if "train/step_time_s" in r and r["step"] > last_step:
      wall += r["train/step_time_s"] * (r["step"] - last_step)
      last_step = r["step"]
      at_step[r["step"]] = wall
    if f"eval/{metric}" in r:
      points.append({"step": r["step"], "wall_s": at_step.get(r["step"], wall), "value": r[f"eval/{metric}"]})
  return points


def main(_):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = dict(item.split("=", 1) for item in _RUN.value)
  curves = {label: curve(path, _METRIC.value) for label, path in runs.items()}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, x, xlabel in ((axes[0], "step", "step"), (axes[1], "wall_s", "training wall-clock (min, 2 CPU cores)")):
    for label, pts in curves.items():
      ax.plot([p[x] / (60 if x == "wall_s" else 1) for p in pts], [p["value"] for p in pts], "o-", label=label)
    if _BASELINE.value is not None:
      ax.axhline(_BASELINE.value, color="gray", ls="--", label=_BASELINE_LABEL.value)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"eval {_METRIC.value}")
  axes[0].legend()
  if _TITLE.value:
    fig.suptitle(_TITLE.value)
  fig.tight_layout()
  pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(_OUT.value, dpi=120)
  print(json.dumps({"metric": _METRIC.value, "baseline": _BASELINE.value, "curves": curves}))


if __name__ == "__main__":
  app.run(main)
