"""Markdown table of reward-model runs (LoRA vs full) from their workdirs' summary.json and run.json.

  python scripts/report_rm.py runs/tm4_lora runs/tm4_full runs/hh_lora runs/hh_full [--out experiments/results/rm_smollm2.md]
"""
import json
import pathlib

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Also write the table to this markdown file.")


def row(workdir: pathlib.Path) -> dict:
  """One table row (column -> text) from a run folder's summary.json and run.json."""
  summary = json.loads((workdir / "summary.json").read_text())
  config = json.loads((workdir / "run.json").read_text())["config"]
  ev = summary["eval"]
  binary = "roc_auc" in ev
  metric = (f"bal. acc {ev['balanced_accuracy']:.3f}, ROC-AUC {ev['roc_auc']:.3f}" if binary
            else f"pair acc {ev['accuracy']:.3f}, margin {ev['mean_margin']:.2f}")
  mode = f"LoRA r={config['lora']['rank']}" if config["mode"] == "lora" else "full"
  d, n_train = config["data"], summary["trainable_params"]
  return {"run": workdir.name, "data": d["format"], "mode": mode, "metric": metric,
          "eval loss": f"{ev['loss']:.3f}", "eval n": summary["eval_examples"],
          "trainable": f"{n_train:,} ({100 * n_train / summary['total_params']:.2f}%)",
          "steps × batch × T": f"{config['steps']} × {d['batch_size']} × {d['max_len']}",
          "step time (s)": f"{summary['median_step_time_s']:.2f}",
          "compiled peak (MiB)": f"{summary['compiled_memory_bytes'] / 2**20:,.0f}"}


def table(rows: list[dict]) -> str:
  """Markdown table with the first row's keys as columns."""
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  """Positional arguments: the run folders (workdirs), one table row each."""
  if len(argv) < 2:
    raise app.UsageError("give at least one run folder")
  text = table([row(pathlib.Path(w)) for w in argv[1:]])
  print(text)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(text + "\n")


if __name__ == "__main__":
  app.run(main)
