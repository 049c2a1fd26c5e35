"""Report an over-optimisation sweep (experiments/sweeps/rl_ensemble.py): each reward arm's proxy and judge reward
against KL, seeds pooled per prompt, and every arm against a reference arm under the judge.

  python scripts/report_overopt.py --workdir runs/rl_ensemble [--reference single] --out experiments/results/ensembles
Reads sweep.json (scripts/ablate.py) and, per finished point, metrics.jsonl (the eval/* rows of every held-out eval:
KL, proxy and judge reward differences from the anchor) and the last eval_texts_STEP.jsonl (per prompt: proxy and
judge rewards of the policy and the anchor, KL). A point's arm is its name without the seed ("seed=1,single" ->
"single"). Every arm is evaluated on the same held-out prompts, so seeds are pooled per prompt (a prompt's figure is
its mean over seeds) and intervals are 95% paired bootstraps over prompts (win rates: Wilson, n = prompts); the
proxy is each arm's own reward, so only the judge compares arms. Writes OUT/overopt.md, OUT/overopt.json and
OUT/overopt.png (proxy and judge reward difference against KL at each eval, seed means: Gao et al.'s curve).
A second, independent judge where every point has one: scripts/judge_texts.py's bag-of-words judge.json (run it on
the sweep first); its per-prompt scores at the same last eval step give the bow_* figures, pooled and compared the
same way.
"""
import json
import pathlib
import re

import numpy as np
from absl import flags

from perl_jax import cli, stats
from perl_jax.errors import ConfigError
from perl_jax.rl import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder written by scripts/ablate.py.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: --workdir).")
_REFERENCE = flags.DEFINE_string("reference", "single", "The arm every other arm is compared with under the judge.")
flags.mark_flags_as_required(["workdir"])


def _jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_points(workdir: pathlib.Path) -> list[dict]:
  """Per finished point: arm, seed, the eval curve [(step, kl, reward_diff, judge_reward_diff)], and the last eval's
  per-prompt arrays (proxy / judge after and before, KL; means over samples)."""
  points = []
  for p in json.loads((workdir / "sweep.json").read_text())["points"]:
    folder = workdir / p["name"]
    texts = evaluate.read_texts(folder)
    if not (folder / "summary.json").is_file() or not texts:
      continue
    rows = texts[max(texts)]
    if "judge_after" not in rows[0]:
      raise ConfigError(f"{folder}: its evals have no judge rewards (train_rl's config field 'judge_workdir')")
    mean = lambda key: np.array([np.mean(r[key]) for r in rows])
    curve = [(r["step"], r["eval/kl"], r["eval/reward_diff"], r.get("eval/judge_reward_diff", np.nan))
             for r in _jsonl(folder / "metrics.jsonl") if "eval/kl" in r]
    points.append({"name": p["name"], "arm": re.sub(r"(^|,)seed=\d+", "", p["name"]).strip(",") or "base",
                   "seed": p["overrides"].get("seed", 0), "prompts": [r["prompt"] for r in rows], "curve": curve,
                   **{k: mean(k) for k in ("reward_after", "reward_before", "judge_after", "judge_before", "kl")},
                   **_bow_judge(folder, max(texts), len(rows))})
  if any("bow_after" not in p for p in points):  # The second judge only where every point has it.
    points = [{k: v for k, v in p.items() if not k.startswith("bow_")} for p in points]
  return points


def _bow_judge(folder: pathlib.Path, step: int, n: int) -> dict:
  """judge_texts.py's per-prompt bag-of-words judge scores (means over samples) at eval `step`, if it was run."""
  path = folder / "judge.json"
  per_prompt = json.loads(path.read_text())["eval"].get(str(step), {}).get("per_prompt") if path.is_file() else None
  if not per_prompt:
    return {}
  if len(per_prompt["judge_after"]) != n:
    raise ConfigError(f"{path}: {len(per_prompt['judge_after'])} prompts at step {step}, its eval texts have {n}; "
                      "rerun scripts/judge_texts.py")
  return {f"bow_{k}": np.array([np.mean(x) for x in per_prompt[f"judge_{k}"]]) for k in ("after", "before")}


def _stack(points: list[dict], key: str) -> np.ndarray:
  """[N prompts, S seeds] of one per-prompt array."""
  return np.stack([p[key] for p in points], axis=1)


def _by_arm(points: list[dict]) -> dict:
  arms: dict = {}
  for p in sorted(points, key=lambda p: p["seed"]):
    arms.setdefault(p["arm"], []).append(p)
  for arm, ps in arms.items():
    if len({tuple(p["prompts"]) for p in ps}) != 1:
      raise ConfigError(f"arm {arm}: its seeds were evaluated on different prompts")
  return arms


def arm_rows(points: list[dict], reference: str) -> list[dict]:
  """Per arm: proxy and judge difference from the anchor, KL, and (arms besides the reference, on the seeds both
  have) the judge reward of its policy minus the reference arm's, per prompt, with its win rate."""
  arms = _by_arm(points)
  out = []
  for arm, ps in arms.items():
    row = {"arm": arm, "seeds": [p["seed"] for p in ps], "num_prompts": len(ps[0]["prompts"]),
           **evaluate.paired_stats("", _stack(ps, "reward_after"), _stack(ps, "reward_before")),
           **evaluate.paired_stats("judge_", _stack(ps, "judge_after"), _stack(ps, "judge_before"))}
    row["kl"], row["kl_lo"], row["kl_hi"] = stats.paired_bootstrap_ci(_stack(ps, "kl"))
    bow = "bow_after" in ps[0]
    if bow:
      row.update(evaluate.paired_stats("bow_", _stack(ps, "bow_after"), _stack(ps, "bow_before")))
    ref = {p["seed"]: p for p in arms.get(reference, [])}
    seeds = [p["seed"] for p in ps if p["seed"] in ref]
    if arm != reference and seeds:
      if ref[seeds[0]]["prompts"] != ps[0]["prompts"]:
        raise ConfigError(f"arms {arm} and {reference} were evaluated on different prompts")
      mine, theirs = [p for p in ps if p["seed"] in ref], [ref[s] for s in seeds]
      for judge, prefix in (("judge_after", "vs_reference_"), ("bow_after", "bow_vs_reference_"))[:1 + bow]:
        vs = evaluate.paired_stats("", _stack(mine, judge), _stack(theirs, judge))
        row.update({f"{prefix}{k}": v for k, v in vs.items() if k.startswith(("reward_diff", "win_rate"))})
      row["vs_reference_seeds"] = seeds
    out.append(row)
  return out


def _ci(r: dict, key: str) -> str:
  return f"{r[key]:+.3f} [{r[key + '_lo']:+.3f}, {r[key + '_hi']:+.3f}]" if key in r else "–"


def markdown(rows: list[dict], reference: str) -> str:
  bow = any("bow_reward_diff" in r for r in rows)
  bow_head = f" bag-of-words judge: difference | bag-of-words vs {reference} |" if bow else ""
  lines = [f"| arm | seeds | proxy: difference | judge: difference | KL | judge vs {reference} | win rate vs "
           f"{reference} (judge) |" + bow_head,
           "|---|---|---|---|---|---|---|" + ("---|---|" if bow else "")]
  for r in rows:
    win = (f"{r['vs_reference_win_rate']:.2f} [{r['vs_reference_win_rate_lo']:.2f}, "
           f"{r['vs_reference_win_rate_hi']:.2f}]" if "vs_reference_win_rate" in r else "–")
    lines.append(f"| {r['arm']} | {','.join(map(str, r['seeds']))} | {_ci(r, 'reward_diff')} | "
                 f"{_ci(r, 'judge_reward_diff')} | {r['kl']:.2f} [{r['kl_lo']:.2f}, {r['kl_hi']:.2f}] | "
                 f"{_ci(r, 'vs_reference_reward_diff')} | {win} |"
                 + (f" {_ci(r, 'bow_reward_diff')} | {_ci(r, 'bow_vs_reference_reward_diff')} |" if bow else ""))
  return "\n".join(lines) + "\n"


def curves(points: list[dict]) -> dict:
  """Per arm: [(step, KL, proxy difference, judge difference)] at each eval step, means over the arm's seeds."""
  out = {}
  for arm, ps in _by_arm(points).items():
    steps = sorted(set.intersection(*[{c[0] for c in p["curve"]} for p in ps]))
    out[arm] = [(s, *np.mean([[c[1:] for c in p["curve"] if c[0] == s][0] for p in ps], axis=0).tolist())
                for s in steps]
  return out


def plot(arm_curves: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  for arm, pts in arm_curves.items():
    kl = [p[1] for p in pts]
    for ax, i in zip(axes, (2, 3)):
      ax.plot(kl, [p[i] for p in pts], marker="o", label=arm)
  for ax, what in zip(axes, ("proxy (its own reward)", "judge (held-out RM)")):
    ax.set(xlabel="KL(π ‖ π_SFT) per response", ylabel="reward − anchor's", title=what)
    ax.axhline(0, color="grey", lw=0.5)
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _run() -> dict:
  workdir = pathlib.Path(_WORKDIR.value)
  out = pathlib.Path(_OUT.value or workdir)
  points = load_points(workdir)
  if not points:
    raise ConfigError(f"{workdir}: no finished point with eval texts")
  rows, arm_curves = arm_rows(points, _REFERENCE.value), curves(points)
  out.mkdir(parents=True, exist_ok=True)
  (out / "overopt.md").write_text(markdown(rows, _REFERENCE.value))
  (out / "overopt.json").write_text(json.dumps({"arms": rows, "curves": arm_curves}, indent=1))
  plot(arm_curves, out / "overopt.png")
  return {"arms": len(rows), "out": str(out)}


def main(_):
  print(json.dumps(cli.run_or_exit(_run)))


if __name__ == "__main__":
  cli.app_run(main)
