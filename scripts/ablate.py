"""Run an ablation sweep: every point of a grid is an ordinary run in its own sub-folder of --workdir.

  python scripts/ablate.py --sweep experiments/sweeps/rm_ranks.py --workdir runs/rm_ranks [--dry-run]
      [--only INDEX|NAME] [--shard I/N] [--set steps=50 ...]
Finished points (their summary.json exists) are skipped; a killed point resumes from its checkpoint. --shard I/N
runs points I, I+N, I+2N, ... so N hosts split a sweep with no coordinator. Then: scripts/report.py --workdir DIR.
"""
import json
import pathlib
import shlex
import subprocess
import sys

from absl import flags

from perl_jax import cli, sweeps

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (experiments/sweeps/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder: one sub-folder per point, sweep.json.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print each point (name, overrides, done or not); run nothing.")
_ONLY = flags.DEFINE_string("only", None, "Run one point, by index or name.")
_SHARD = flags.DEFINE_string("shard", None, "I/N: run every N-th point starting at I (0-based).")
_SET = flags.DEFINE_multi_string("set", [], "key=value added to every point (e.g. --set steps=50), not to names.")
flags.mark_flags_as_required(["sweep", "workdir"])


def main(_):
  sweep, points, chosen = cli.run_or_exit(_points, info=False)
  workdir = pathlib.Path(_WORKDIR.value)
  if _DRY_RUN.value:
    for p in chosen:
      state = "done" if sweeps.is_done(sweep, p, workdir) else "todo"
      print(f"{p.index:3d} {state} {p.name}  {shlex.join(sweeps.command(sweep, p, workdir)[1:])}")
    return
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "sweep.json").write_text(json.dumps(
      {"sweep_file": _SWEEP.value, "sweep": sweep.to_dict(),
       "points": [{"index": p.index, "name": p.name, "config": p.config, "overrides": p.overrides}
                  for p in points]}, indent=1))
  failed = []
  for p in chosen:
    if sweeps.is_done(sweep, p, workdir):
      print(f"[{p.index}] {p.name}: done, skipped", flush=True)
      continue
    cmd = sweeps.command(sweep, p, workdir)
    print(f"[{p.index}] {p.name}: {shlex.join(cmd[1:])}", flush=True)
    (workdir / p.name).mkdir(exist_ok=True)  # A flags-only script writes its output file into it.
    if subprocess.run(cmd).returncode:
      failed.append(p.name)
  if failed:
    print(f"error: {len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


def _points():
  """(sweep, every point, the points to run); a ConfigError names the sweep field."""
  sweep = sweeps.load(_SWEEP.value)
  points = sweeps.expand(sweep, sweeps.parse_sets(_SET.value))
  sweeps.validate(points, sweep)
  return sweep, points, sweeps.select(points, _ONLY.value, _SHARD.value)


if __name__ == "__main__":
  cli.app_run(main)
