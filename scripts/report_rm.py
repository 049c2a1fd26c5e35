"""Markdown table of reward-model runs (LoRA vs full) from their workdirs' summary.json and run.json.

  python scripts/report_rm.py runs/tm4_lora runs/tm4_full runs/hh_lora runs/hh_full [--out experiments/results/rm_smollm2.md]
"""
import argparse
import json
import pathlib


def row(workdir: pathlib.Path) -> dict:
  summary = json.loads((workdir / "summary.json").read_text())
  config = json.loads((workdir / "run.json").read_text())["config"]
  ev = summary["eval"]
  binary = "roc_auc" in ev
  metric = (f"bal. acc {ev['balanced_accuracy']:.3f}, ROC-AUC {ev['roc_auc']:.3f}" if binary
            else f"pair acc {ev['accuracy']:.3f}, margin {ev['mean_margin']:.2f}")
  mode = f"LoRA r={config['lora']['rank']}" if config["mode"] == "lora" else "full"
  d = config["data"]
  return {"run": workdir.name, "data": d["format"], "mode": mode, "metric": metric,
          "eval loss": f"{ev['loss']:.3f}", "eval n": summary["eval_examples"],
          "trainable": f"{summary['trainable_params']:,} ({100 * summary['trainable_params'] / summary['total_params']:.2f}%)",
          "steps × batch × T": f"{config['steps']} × {d['batch_size']} × {d['max_len']}",
          "step time (s)": f"{summary['median_step_time_s']:.2f}",
          "compiled peak (MiB)": f"{summary['compiled_memory_bytes'] / 2**20:,.0f}"}


def table(rows: list[dict]) -> str:
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdirs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", type=pathlib.Path)
  args = p.parse_args()
  text = table([row(w) for w in args.workdirs])
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
