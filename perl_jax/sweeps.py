"""Ablation sweeps: a grid of ordinary runs, one sub-folder each, and the collection of their results.

A sweep file (experiments/sweeps/*.py) defines `get_config()` returning an ml_collections ConfigDict:
  script   the stage each point runs, e.g. "scripts/train_reward.py"
  config   the base config, "experiments/rm/smollm2.py:tm4_lora"
  axes     a list of axes; each axis a list of override dicts {"lora.rank": 4, ...}; the grid is their product.
           The key "config" in an override swaps the base config (e.g. another data set or mode); the key "_name"
           names that override dict in the point's folder name instead of its keys and values (an arm whose
           values are long paths), and is not passed to the stage.
  fixed    (optional) a list of override dicts every point gets, not part of its name (a shared budget, a dev
           split, ...; a point's own axis value for the same key wins); a list because ConfigDict fields cannot
           hold dotted keys directly
  metrics  eval metrics the report leads with, the first one a point has ("roc_auc", then "accuracy", ...)
  done     the file whose presence marks a finished point (default "summary.json")
  args     "config" (default): overrides become --config.KEY=VALUE of a config-driven stage; "flags": they become
           --KEY=VALUE of a flags-only script (e.g. scripts/benchmark.py, whose module-level FLAGS names the
           allowed keys), and --OUT_FLAG=POINT_FOLDER/DONE is added (out_flag, default "out")
A point's folder is named after its overrides ("config=hh_lora,rank=4,seed=1"), and its command is printed, so
any point can be rerun alone; a killed point resumes through the stage's own checkpoint resume.
"""
import dataclasses
import itertools
import json
import math
import pathlib
import re
import runpy
import sys

import ml_collections
import numpy as np

from perl_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Point:
  index: int
  name: str
  config: str            # base config "file.py:arg"
  overrides: dict        # dotted config key -> value


def load(path) -> ml_collections.ConfigDict:
  """The sweep ConfigDict of a sweep file; a ConfigError names the file if it has no get_config()."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"{path}: no such sweep file")
  module = runpy.run_path(str(path))
  if "get_config" not in module:
    raise ConfigError(f"{path}: a sweep file defines get_config()")
  sweep = module["get_config"]()
  for field in ("script", "config", "axes"):
    if field not in sweep:
      raise ConfigError(f"{path}: field '{field}' is missing")
  return sweep


def _value_name(value) -> str:
  text = f"{value:g}" if isinstance(value, float) else str(value)
  if isinstance(value, str) and ":" in text:
    text = text.rsplit(":", 1)[1]  # "experiments/rm/smollm2.py:hh_lora" -> "hh_lora"
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def point_name(overrides: dict) -> str:
  """Folder name from overrides: the last component of each key, '=' its value, ',' between them; a swapped
  base config appears as its argument alone ("hh_lora,rank=4,seed=1"), and so does a "_name" label."""
  parts = [_value_name(v) if k == "config" or k.startswith("_name") else f"{k.rsplit('.', 1)[-1]}={_value_name(v)}"
           for k, v in overrides.items()]
  return ",".join(parts) or "base"


def expand(sweep: ml_collections.ConfigDict, common: dict | None = None) -> list[Point]:
  """Every point of the grid (product of the axes, in order): the sweep's `fixed` overrides, then the point's own
  (an axis value beats `fixed`), then the `common` ones (--set, beating both); only the axis values make its
  name. Errors if two points share a folder name."""
  fixed = {k: v for part in (sweep.get("fixed", None) or []) for k, v in dict(part).items()}
  points = []
  for i, combo in enumerate(itertools.product(*[list(axis) for axis in sweep.axes])):
    overrides, named = {}, {}
    for j, part in enumerate(map(dict, combo)):
      label = part.pop("_name", None)
      overrides.update(part)
      named.update({f"_name{j}": label} if label is not None else part)
    name = point_name(named)
    base = overrides.pop("config", sweep.config)
    points.append(Point(i, name, base, {**fixed, **overrides, **dict(common or {})}))
  names = [p.name for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ConfigError(f"sweep: points share folder names {dupes}: make the override keys distinct")
  return points


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of 'file.py[:arg]', as config_flags would build it."""
  file, _, arg = spec.partition(":")
  if not pathlib.Path(file).is_file():
    raise ConfigError(f"sweep: field 'config': {file}: no such config file")
  module = runpy.run_path(file)
  return module["get_config"](arg) if arg else module["get_config"]()


def _script_flags(script: str) -> set:
  """The flag names a flags-only script defines in its module-level absl FlagValues `FLAGS`."""
  if not pathlib.Path(script).is_file():
    raise ConfigError(f"sweep: field 'script': {script}: no such file")
  module = runpy.run_path(script, run_name="sweep_flags_check")
  if "FLAGS" not in module:
    raise ConfigError(f"sweep: field 'args': {script} defines no module-level FLAGS to check override keys against")
  return set(module["FLAGS"])


def validate(points: list[Point], sweep: ml_collections.ConfigDict | None = None) -> None:
  """Every override key must name an existing field of its base config (or, args "flags", a flag of the
  script): one line naming the key otherwise."""
  if sweep is not None and sweep.get("args", "config") == "flags":
    known = _script_flags(sweep.script)
    for p in points:
      for key in p.overrides:
        if key not in known:
          raise ConfigError(f"sweep: unknown override key '{key}' (point {p.name}; {sweep.script} has no --{key})")
    return
  cache = {}
  for p in points:
    cfg = cache.setdefault(p.config, load_config(p.config))
    for key in p.overrides:
      node = cfg
      for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          raise ConfigError(f"sweep: unknown override key '{key}' (point {p.name}; base {p.config})")
        node = node[part]


def select(points: list[Point], only: str | None = None, shard: str | None = None) -> list[Point]:
  """--only INDEX|NAME picks one point; --shard I/N keeps every N-th point starting at I (0-based)."""
  if only is not None:
    chosen = [p for p in points if str(p.index) == only or p.name == only]
    if not chosen:
      raise ConfigError(f"--only {only}: no such point (0..{len(points) - 1} or a point name)")
    points = chosen
  if shard is not None:
    m = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
      raise ConfigError(f"--shard {shard}: expected I/N with 0 <= I < N")
    i, n = int(m.group(1)), int(m.group(2))
    points = [p for p in points if p.index % n == i]
  return points


def command(sweep, point: Point, workdir) -> list[str]:
  """The point's own command line: the stage script, its base config, its folder and its overrides (args
  "flags": the script, --KEY=VALUE per override and --OUT_FLAG=FOLDER/DONE)."""
  folder = pathlib.Path(workdir) / point.name
  if sweep.get("args", "config") == "flags":
    return [sys.executable, sweep.script, *(f"--{k}={v}" for k, v in point.overrides.items()),
            f"--{sweep.get('out_flag', 'out')}={folder / sweep.get('done', 'summary.json')}"]
  args = [sys.executable, sweep.script, f"--config={point.config}", f"--workdir={folder}"]
  return args + [f"--config.{k}={v}" for k, v in point.overrides.items()]


def is_done(sweep, point: Point, workdir) -> bool:
  return (pathlib.Path(workdir) / point.name / sweep.get("done", "summary.json")).is_file()


# ---------------------------------------------------------------- collecting results


def _flat(prefix: str, d: dict) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(f"{prefix}{k}.", v))
    elif isinstance(v, (int, float, str, bool)) or v is None:
      out[f"{prefix}{k}"] = v
  return out


def collect(points: list[Point], workdir) -> list[dict]:
  """One row per finished point: its name, overrides, base config and every scalar of its summary.json."""
  rows = []
  for p in points:
    folder = pathlib.Path(workdir) / p.name
    if not (folder / "summary.json").is_file():
      continue
    summary = json.loads((folder / "summary.json").read_text())
    rows.append({"point": p.name, "base": p.config, **{f"set.{k}": v for k, v in p.overrides.items()},
                 **_flat("", summary)})
  return rows


def is_seed(key: str) -> bool:
  """Override keys that name a seed (seed, data.shuffle_seed, data.seed): the report averages over them."""
  return key.rsplit(".", 1)[-1].endswith("seed")


def group(rows: list[dict], metric_keys: list[str]) -> list[dict]:
  """Rows that differ only in seeds (is_seed) become one: mean and std (ddof=0) of each metric, n seeds."""
  groups: dict = {}
  for r in rows:
    key = tuple((k, str(v)) for k, v in r.items() if k.startswith("set.") and not is_seed(k)) + (("base", r["base"]),)
    groups.setdefault(key, []).append(r)
  out = []
  for key, members in groups.items():
    g = dict(key)
    g["seeds"] = len(members)
    for m in metric_keys:
      vals = [r[m] for r in members if isinstance(r.get(m), (int, float)) and r.get(m) is not None
              and math.isfinite(r[m])]
      g[m] = float(np.mean(vals)) if vals else None
      g[f"{m}.std"] = float(np.std(vals)) if vals else None
    out.append(g)
  return out


def parse_sets(items) -> dict:
  """--set key=value items -> {key: value}, values parsed as JSON where they parse (numbers, true/false)."""
  out = {}
  for item in items or ():
    key, eq, text = item.partition("=")
    if not eq:
      raise ConfigError(f"--set {item}: expected key=value")
    try:
      out[key] = json.loads(text)
    except json.JSONDecodeError:
      out[key] = text
  return out
