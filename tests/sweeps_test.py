"""Sweeps: a two-point grid runs end to end on a tiny model, re-runs skip finished points, shards split the grid
without overlap or gap, an unknown key stops everything before anything runs, and the report equals the points'
own summary.json files."""
import csv
import json
import os
import subprocess
import sys

import pytest

from perl_jax import sweeps
from perl_jax.models import ConfigError
from tests.conftest import ROOT
from tests.helpers import head_lines, make_tiny_hf_folder


def _cli(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
                        timeout=600)


def _sweep_file(tmp_path, axes):
  path = tmp_path / "sweep.py"
  path.write_text(f"""import ml_collections
def get_config():
  c = ml_collections.ConfigDict()
  c.script = "scripts/train_reward.py"
  c.config = "experiments/rm/smollm2.py:tm4_lora"
  c.axes = {axes!r}
  c.metrics = ("roc_auc", "accuracy")
  return c
""")
  return path


def test_grid_names_and_shards_cover_every_point_once(tmp_path):
  sweep = sweeps.load(ROOT / "experiments/sweeps/rm_ranks.py")
  points = sweeps.expand(sweep)
  assert len(points) == 2 * 5 * 2 and len({p.name for p in points}) == len(points)
  assert points[0].name == "tm4_lora,rank=1,alpha=2,seed=0,shuffle_seed=0" and points[-1].overrides["mode"] == "full"
  assert all(p.overrides["probe_cache"] for p in points)
  for n in (1, 3, 7):
    shards = [sweeps.select(points, shard=f"{i}/{n}") for i in range(n)]
    indices = sorted(p.index for s in shards for p in s)
    assert indices == list(range(len(points)))
  assert [p.name for p in sweeps.select(points, only="3")] == [points[3].name]
  with pytest.raises(ConfigError, match="--shard 3/3"):
    sweeps.select(points, shard="3/3")


def test_group_averages_over_every_seed_key_by_hand():
  row = lambda rank, seed, auc: {"point": "", "base": "b", "set.lora.rank": rank, "set.seed": seed,
                                 "set.data.shuffle_seed": seed, "roc_auc": auc}
  groups = sweeps.group([row(1, 0, 0.6), row(1, 1, 0.7), row(4, 0, 0.5), row(4, 1, None)], ["roc_auc"])
  assert [(g["set.lora.rank"], g["seeds"]) for g in groups] == [("1", 2), ("4", 2)]
  assert groups[0]["roc_auc"] == pytest.approx(0.65) and groups[0]["roc_auc.std"] == pytest.approx(0.05)
  assert groups[1]["roc_auc"] == 0.5 and groups[1]["roc_auc.std"] == 0.0


def test_fixed_overrides_reach_every_point_but_not_names_and_set_wins():
  sweep = sweeps.load(ROOT / "experiments/sweeps/rm_recipe_dev.py")
  points = sweeps.expand(sweep, {"steps": 3})
  assert [p.name for p in points] == ["lr=0.0005", "lr=0.002", "lr=0.002,balance_classes=True",
                                      "lr=0.0005,head_init=probe", "lr=0.0001,head_init=probe",
                                      "lr=0.0005,head_init=probe,targets=attention_mlp",
                                      "lr=0.0005,head_init=probe,init_from=runs_sft_tm4_dev"]
  for p in points:
    assert p.overrides["data.dev_fraction"] == 0.15 and p.overrides["steps"] == 3   # --set beats `fixed`
  assert [p.overrides["head_init"] for p in points] == ["random"] * 3 + ["probe"] * 4  # The axis beats `fixed`.


def test_flags_sweep_runs_benchmark_points_and_checks_flag_names(tmp_path):
  """args "flags": overrides become --KEY=VALUE of scripts/benchmark.py, rows land in POINT/rows.jsonl (the done
  marker), and a key the script has no flag for is one line before anything runs."""
  sweep = sweeps.load(ROOT / "experiments/sweeps/benchmark_grid.py")
  points = sweeps.expand(sweep)
  assert len(points) == 8 and points[0].name == "phase=rm,model=smollm2-135m"
  cmd = sweeps.command(sweep, points[-1], tmp_path)
  assert cmd[2:] == ["--abstract=True", "--modes=full,lora", "--phase=rl", "--model=7b",
                     f"--out={tmp_path / 'phase=rl,model=7b' / 'rows.jsonl'}"]
  path = tmp_path / "grid.py"
  path.write_text((ROOT / "experiments/sweeps/benchmark_grid.py").read_text().replace(
      '("smollm2-135m", "1b", "2b", "7b")', '("tiny",)'))
  result = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(tmp_path / "w"), "--only", "1")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "w" / "phase=rl,model=tiny" / "rows.jsonl").read_text().splitlines()]
  assert [(r["phase"], r["model"], r["mode"], r["abstract"]) for r in rows] == [
      ("rl", "tiny", "full", True), ("rl", "tiny", "lora", True)]
  assert rows[1]["compiled_peak_bytes"] < rows[0]["compiled_peak_bytes"]
  again = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(tmp_path / "w"), "--only", "1")
  assert "done, skipped" in again.stdout
  assert _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(tmp_path / "w"), "--only", "0").returncode == 0
  plotted = _cli("scripts/plot_benchmark.py", *sorted(str(f) for f in (tmp_path / "w").glob("*/rows.jsonl")),
                 "--prefix", str(tmp_path / "grid"))
  assert plotted.returncode == 0, plotted.stderr[-2000:]
  out = json.loads((tmp_path / "grid.json").read_text())
  rm_rows = [json.loads(line) for line in (tmp_path / "w" / "phase=rm,model=tiny" / "rows.jsonl").read_text().splitlines()]
  ratio = lambda rs: rs[1]["compiled_peak_bytes"] / rs[0]["compiled_peak_bytes"]  # lora / full
  assert out["comparisons"][0]["memory_ratio"] == pytest.approx(ratio(rm_rows))
  assert out["rl_comparisons"][0]["memory_ratio"] == pytest.approx(ratio(rows))
  assert (tmp_path / "grid.png").stat().st_size > 0 and "RL update step" in (tmp_path / "grid.md").read_text()
  path.write_text(path.read_text().replace('{"phase": "rm"}', '{"phsae": "rm"}'))
  bad = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(tmp_path / "w2"))
  assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "'phsae'" in bad.stderr
  assert not (tmp_path / "w2").exists()


def test_unknown_override_key_is_one_line_before_anything_runs(tmp_path):
  path = _sweep_file(tmp_path, [[{"lora.rank": 1}, {"lora.rnak": 2}]])
  result = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(tmp_path / "w"))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "unknown override key 'lora.rnak'" in lines[0]
  assert not (tmp_path / "w").exists()


def test_two_point_sweep_runs_skips_when_done_and_reports_its_summaries(tmp_path):
  make_tiny_hf_folder(tmp_path / "model")
  head_lines(ROOT / "experiments/data/taskmaster4/reward.jsonl.gz", tmp_path / "tm4.jsonl", 48)
  path = _sweep_file(tmp_path, [[{"lora.rank": 1, "lora.alpha": 2.0}, {"lora.rank": 2, "lora.alpha": 4.0}]])
  common = ["--set", f"model.path={tmp_path / 'model'}", "--set", f"data.path={tmp_path / 'tm4.jsonl'}",
            "--set", "data.max_len=48", "--set", "data.min_prompt_tokens=8", "--set", "data.batch_size=8",
            "--set", "data.eval_batch_size=8", "--set", "data.eval_fraction=0.25", "--set", "steps=2",
            "--set", "eval_every=2", "--set", "checkpoint_every=2", "--set", "optim.warmup_steps=1"]
  wd = tmp_path / "sweep"
  first = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(wd), *common)
  assert first.returncode == 0, first.stderr[-3000:]
  names = ["rank=1,alpha=2", "rank=2,alpha=4"]
  assert all((wd / n / "summary.json").is_file() for n in names)
  mtimes = [(wd / n / "summary.json").stat().st_mtime_ns for n in names]

  again = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(wd), *common)
  assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
  assert [(wd / n / "summary.json").stat().st_mtime_ns for n in names] == mtimes
  dry = _cli("scripts/ablate.py", "--sweep", str(path), "--workdir", str(wd), "--dry-run", *common)
  assert [l.split()[1:3] for l in dry.stdout.splitlines()] == [["done", n] for n in names]

  report = _cli("scripts/report.py", "--workdir", str(wd))
  assert report.returncode == 0, report.stderr[-3000:]
  rows = {r["point"]: r for r in csv.DictReader(open(wd / "results.csv"))}
  for n in names:
    summary = json.loads((wd / n / "summary.json").read_text())
    for key in ("roc_auc", "loss", "balanced_accuracy"):
      assert float(rows[n][f"eval.{key}"]) == pytest.approx(summary["eval"][key], rel=1e-12, nan_ok=True)
    assert int(rows[n]["trainable_params"]) == summary["trainable_params"]
    lead = "roc_auc" if summary["eval"]["roc_auc"] == summary["eval"]["roc_auc"] else "accuracy"  # NaN: 1 class.
    assert f"| {lead} | {summary['eval'][lead]:.3f} | 1 |" in report.stdout  # One seed: the value, no "± 0.000".
  assert (wd / "metric_vs_rank.png").is_file()

  # Two shards' folders, each holding one finished point, report as the one folder did.
  shard = tmp_path / "shard"
  shard.mkdir()
  (shard / "sweep.json").write_text((wd / "sweep.json").read_text())
  (wd / names[1]).rename(shard / names[1])
  merged = _cli("scripts/report.py", "--workdir", f"{wd},{shard}", "--out", str(tmp_path / "merged"))
  assert merged.returncode == 0, merged.stderr[-3000:]
  assert (tmp_path / "merged/results.csv").read_text() == (wd / "results.csv").read_text()
  # The same point name with other overrides in a second folder is a one-line error naming both files.
  spec = json.loads((shard / "sweep.json").read_text())
  spec["points"][1]["overrides"]["lora.alpha"] = 8.0
  (shard / "sweep.json").write_text(json.dumps(spec))
  clash = _cli("scripts/report.py", "--workdir", f"{wd},{shard}", "--out", str(tmp_path / "clash"))
  lines = clash.stderr.strip().splitlines()
  assert clash.returncode == 2 and len(lines) == 1
  assert str(shard / "sweep.json") in lines[0] and str(wd / "sweep.json") in lines[0] and names[1] in lines[0]


def test_a_name_label_names_the_point_and_is_not_passed():
  """An override dict's "_name" stands for its keys in the folder name (an arm of long paths) and is no override."""
  points = sweeps.expand(sweeps.load(ROOT / "experiments/sweeps/rl_ensemble.py"))
  assert [p.name for p in points[:4]] == ["seed=0,single", "seed=0,ensemble_mean", "seed=0,ensemble_mean_minus_std",
                                          "seed=0,warm_exact"]
  assert all("_name" not in p.overrides for p in points)
  assert points[1].overrides["reward_workdir"] == "runs/rm_ensemble/member[0-3]"
  assert points[1].overrides["rl.reward_ensemble"] == "mean" and "rl.reward_ensemble" not in points[0].overrides
