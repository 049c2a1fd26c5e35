"""Report an RL quality sweep (experiments/sweeps/rl_quality.py): LoRA vs full per estimator, seeds pooled.

  python scripts/report_rl.py --workdir runs/rl_quality/arms --out experiments/results/rl_quality
Reads sweep.json (scripts/ablate.py) and, per finished point, summary.json, eval_texts_STEP.jsonl (per-prompt RM
rewards and KL of train_rl's held-out eval), judge.json (scripts/judge_texts.py, optional) and metrics.jsonl.
Every arm is evaluated on the same held-out prompts against the same anchor samples, so seeds are pooled per prompt:
a prompt's figure is the mean over its seeds, and intervals are 95% paired bootstraps over prompts (win rates:
Wilson, n = prompts). Those intervals hold the seeds fixed; the per-seed figures beside them show the seed spread.
"LoRA − full" pairs the two modes' policies on each prompt (same estimator, same seeds): the difference of their
rewards, with its interval, and LoRA's win rate over full. Writes OUT/rl_quality.md, OUT/rl_quality.json and
OUT/curves.png (train reward and KL against steps; held-out RM and judge reward differences against KL).
"""
import json
import pathlib

import numpy as np
from absl import flags

from perl_jax import cli, stats
from perl_jax.errors import ConfigError
from perl_jax.rl import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder written by scripts/ablate.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: --workdir).")
flags.mark_flags_as_required(["workdir"])

ESTIMATORS = {"paper": "REINFORCE + value (paper)", "reinforce": "REINFORCE + value (paper)", "rloo": "RLOO",
              "grpo": "GRPO", "ppo": "PPO"}


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_points(workdir: pathlib.Path) -> list[dict]:
  """One dict per finished point: arm (config name + lr), mode, estimator, seed, summary, per-prompt eval arrays
  (RM after / before, KL; judge after / before when judge.json exists, each [N]: mean over samples), metrics."""
  spec = json.loads((workdir / "sweep.json").read_text())
  points = []
  for p in spec["points"]:
    folder = workdir / p["name"]
    texts = evaluate.read_texts(folder)
    if not (folder / "summary.json").is_file() or not texts:
      continue
    last_step = max(texts)
    config = p["overrides"].get("config", p["config"]).rsplit(":", 1)[-1]
    parts = config.split("_")
    rows = texts[last_step]
    mean = lambda key, src=rows: np.array([np.mean(r[key]) for r in src])
    point = {"name": p["name"], "config": config, "mode": parts[1], "estimator": (parts + ["paper"])[2],
             "lr": p["overrides"].get("optim.lr"), "seed": p["overrides"].get("seed", 0),
             "summary": json.loads((folder / "summary.json").read_text()), "prompts": [r["prompt"] for r in rows],
             "rm_after": mean("reward_after"), "rm_before": mean("reward_before"), "kl": mean("kl"),
             "metrics": _jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []}
    point["arm"] = f"{config} lr={point['lr']}"
    if (folder / "judge.json").exists():
      judge = json.loads((folder / "judge.json").read_text())
      last = judge["eval"][str(last_step)]["per_prompt"]
      point["judge_after"] = np.mean(last["judge_after"], axis=1)
      point["judge_before"] = np.mean(last["judge_before"], axis=1)
    points.append(point)
  return points


def _stack(points: list[dict], key: str) -> np.ndarray | None:
  """[N prompts, S seeds] of one per-prompt array, or None when a point lacks it."""
  if any(key not in p for p in points):
    return None
  return np.stack([p[key] for p in points], axis=1)


def arm_rows(points: list[dict]) -> list[dict]:
  """Per arm: seeds pooled per prompt (RM and judge difference and win rate vs the anchor, KL), per-seed figures,
  median step time and the update's compiled peak."""
  arms: dict = {}
  for p in points:
    arms.setdefault(p["arm"], []).append(p)
  out = []
  for arm, ps in arms.items():
    ps = sorted(ps, key=lambda p: p["seed"])
    if len({tuple(p["prompts"]) for p in ps}) != 1:
      raise ConfigError(f"arm {arm}: its seeds were evaluated on different prompts")
    row = {"arm": arm, "config": ps[0]["config"], "mode": ps[0]["mode"], "estimator": ps[0]["estimator"],
           "seeds": [p["seed"] for p in ps], "num_prompts": len(ps[0]["prompts"]),
           **evaluate.paired_stats("", _stack(ps, "rm_after"), _stack(ps, "rm_before"))}
    row["kl"], row["kl_lo"], row["kl_hi"] = stats.paired_bootstrap_ci(_stack(ps, "kl"))
    row["reward_diff_per_seed"] = [float(np.mean(p["rm_after"] - p["rm_before"])) for p in ps]
    if _stack(ps, "judge_after") is not None:
      row.update(evaluate.paired_stats("judge_", _stack(ps, "judge_after"), _stack(ps, "judge_before")))
      row["judge_reward_diff_per_seed"] = [float(np.mean(p["judge_after"] - p["judge_before"])) for p in ps]
    row["finished_after"] = float(np.mean([p["summary"]["eval"].get("finished_fraction_after", np.nan) for p in ps]))
    row["step_time_s"] = float(np.median([p["summary"]["median_step_time_s"] for p in ps]))
    row["compiled_memory_bytes"] = ps[0]["summary"].get("compiled_memory_bytes")
    row["trainable_params"] = ps[0]["summary"].get("trainable_params")
    out.append(row)
  return out


def lora_vs_full(points: list[dict]) -> list[dict]:
  """Per estimator with both modes: LoRA's policy against full tuning's on the same prompts and seeds (RM, judge)."""
  out = []
  for est in dict.fromkeys(p["estimator"] for p in points):
    lora = {p["seed"]: p for p in points if p["estimator"] == est and p["mode"] == "lora"}
    full = {p["seed"]: p for p in points if p["estimator"] == est and p["mode"] == "full"}
    seeds = sorted(set(lora) & set(full))
    if not seeds:
      continue
    a, b = [lora[s] for s in seeds], [full[s] for s in seeds]
    row = {"estimator": est, "seeds": seeds, **evaluate.paired_stats("", _stack(a, "rm_after"), _stack(b, "rm_after"))}
    if _stack(a, "judge_after") is not None and _stack(b, "judge_after") is not None:
      row.update(evaluate.paired_stats("judge_", _stack(a, "judge_after"), _stack(b, "judge_after")))
    out.append(row)
  return out


def _ci(r: dict, key: str, sign: str = "+") -> str:
  if key not in r:
    return "–"
  return f"{r[key]:{sign}.3f} [{r[key + '_lo']:{sign}.3f}, {r[key + '_hi']:{sign}.3f}]"


def markdown(arms: list[dict], pairs: list[dict]) -> str:
  head = ["arm", "seeds", "RM: difference vs anchor [95% CI]", "RM: win rate", "judge: difference [95% CI]",
          "judge: win rate", "KL [95% CI]", "finished", "per seed: RM / judge difference", "s / step",
          "update compiled peak (GiB)", "trainable"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in arms:
    per_seed = ", ".join(f"{a:+.2f}" for a in r["reward_diff_per_seed"])
    if "judge_reward_diff_per_seed" in r:
      per_seed += " / " + ", ".join(f"{a:+.2f}" for a in r["judge_reward_diff_per_seed"])
    mem = r["compiled_memory_bytes"]
    lines.append("| " + " | ".join([
        f"{'LoRA' if r['mode'] == 'lora' else 'full'}, {ESTIMATORS.get(r['estimator'], r['estimator'])} "
        f"(`{r['config']}`)", str(len(r["seeds"])), _ci(r, "reward_diff"), _ci(r, "win_rate", ""),
        _ci(r, "judge_reward_diff"), _ci(r, "judge_win_rate", ""), _ci(r, "kl", ""), f"{r['finished_after']:.2f}",
        per_seed, f"{r['step_time_s']:.1f}", f"{mem / 2**30:.2f}" if mem else "–",
        f"{r['trainable_params']:,}" if r["trainable_params"] else "–"]) + " |")
  lines += ["", "| estimator | seeds | RM: LoRA − full [95% CI] | RM: LoRA's win rate over full | judge: LoRA − full "
            "[95% CI] | judge: LoRA's win rate over full |", "|---|---|---|---|---|---|"]
  for r in pairs:
    lines.append(f"| {ESTIMATORS.get(r['estimator'], r['estimator'])} | {len(r['seeds'])} | {_ci(r, 'reward_diff')} | "
                 f"{_ci(r, 'win_rate', '')} | {_ci(r, 'judge_reward_diff')} | {_ci(r, 'judge_win_rate', '')} |")
  return "\n".join(lines)


def plot(points: list[dict], path: pathlib.Path) -> None:
  """2 × 2. Top: the RM reward and KL of each step's training samples against steps (a step's prompts differ
  from the next's). Bottom: each point's held-out eval, reward difference vs the anchor against KL (95% bootstrap
  intervals), under the RM it trained against (left) and under the judge (right): Gao et al.'s over-optimisation
  view, one marker per arm and seed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  colors = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(p["arm"] for p in points))}
  first_seed = min(q["seed"] for q in points)
  for p in points:
    m = [line for line in p["metrics"] if "train/reward_mean" in line]
    kw = dict(color=colors[p["arm"]], ls="-" if p["seed"] == first_seed else "--", lw=1.2)
    label = f"{p['config']} seed {p['seed']}"
    axes[0][0].plot([line["step"] for line in m], [line["train/reward_mean"] for line in m], label=label, **kw)
    axes[0][1].plot([line["step"] for line in m], [line["train/kl_ref"] for line in m], **kw)
    kl = float(np.mean(p["kl"]))
    for ax, key in ((axes[1][0], "rm"), (axes[1][1], "judge")):
      if f"{key}_after" not in p:
        continue
      d, lo, hi = stats.paired_bootstrap_ci(p[f"{key}_after"] - p[f"{key}_before"])
      ax.errorbar([kl], [d], yerr=[[d - lo], [hi - d]], color=colors[p["arm"]], capsize=3,
                  marker="o" if p["seed"] == first_seed else "s", label=label)
  titles = [("RM reward of the training samples", "RL step"), ("KL to the anchor (training samples)", "RL step"),
            ("held-out: RM reward − anchor's", "KL to the anchor (held-out)"),
            ("held-out: judge score − anchor's", "KL to the anchor (held-out)")]
  for ax, (title, xlabel) in zip(axes.ravel(), titles):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
  top = max(float(np.mean(p["kl"])) for p in points)
  for ax in axes[1]:
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0.0, max(2.0, 1.6 * top))
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _run():
  workdir = pathlib.Path(_WORKDIR.value)
  if not (workdir / "sweep.json").is_file():
    raise ConfigError(f"{workdir / 'sweep.json'}: no such file (run scripts/ablate.py first)")
  points = load_points(workdir)
  if not points:
    raise ConfigError(f"{workdir}: no finished point with eval texts yet")
  out = pathlib.Path(_OUT.value or workdir)
  out.mkdir(parents=True, exist_ok=True)
  arms, pairs = arm_rows(points), lora_vs_full(points)
  text = markdown(arms, pairs)
  (out / "rl_quality.md").write_text(text + "\n")
  (out / "rl_quality.json").write_text(json.dumps({"arms": arms, "lora_vs_full": pairs}, indent=1))
  plot(points, out / "curves.png")
  print(text)


def main(_):
  cli.run_or_exit(_run, info=False)


if __name__ == "__main__":
  cli.app_run(main)
