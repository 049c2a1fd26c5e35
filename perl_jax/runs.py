"""A run folder: run.json (config + data info), checkpoints/, metrics.jsonl, tb/, eval.json, summary.json.

Every stage (reward model, SFT, RL) writes the same layout, so a later stage loads an earlier one through here:
read its config back, load the model and tokenizer it was trained on, restore its trained state.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from perl_jax import checkpoint, models, sharding

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


def write(workdir, config: ml_collections.ConfigDict, info: dict | None = None) -> None:
  """WORKDIR/run.json = {"config": ..., "data": info}, written by process 0 when a run first starts."""
  if jax.process_index() != 0:
    return
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / RUN_FILE).write_text(json.dumps({"config": config.to_dict(), "data": dict(info or {})}, indent=1))


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained with, from WORKDIR/run.json; a ConfigError names the file otherwise."""
  path = pathlib.Path(workdir) / RUN_FILE
  if not path.is_file():
    raise models.ConfigError(f"{path}: no such file (not a run folder?)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text())["config"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise models.ConfigError(f"{path}: not a run file ({e})") from None


def model_path(model_config: ml_collections.ConfigDict) -> str:
  """config.model.path, or the embedded SmolLM2 GGUF when empty."""
  return model_config.path or str(models.default_model_path())


def require_run_folder(path, field: str) -> None:
  """A one-line ConfigError unless `path` holds a run (its run.json); `field` is the config field that named it."""
  if not (pathlib.Path(path) / RUN_FILE).is_file():
    raise models.ConfigError(f"{path}: not a run folder (no {RUN_FILE}); config field '{field}'")


def same_path(a, b) -> bool:
  """Whether two paths name the same file or folder (relative parts and symlinks resolved)."""
  return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()


def load_model(model_config: ml_collections.ConfigDict):
  """(model config, frozen base params, tokenizer) from config.model."""
  path = model_path(model_config)
  cfg, params = models.load_pretrained(path, param_dtype=jnp.dtype(model_config.param_dtype),
                                       dtype=model_config.dtype, remat=model_config.remat,
                                       attention=model_config.get("attention", "auto"))
  return cfg, params, models.load_tokenizer(path)


def restore(workdir, abstract_state, *, step: int | None = None) -> tuple[int, dict]:
  """(step, state) of checkpoint `step` (default latest) in WORKDIR/checkpoints, placed as `abstract_state`'s
  leaves say (ShapeDtypeStructs with shardings); a ConfigError if there is none."""
  ckpt_dir = pathlib.Path(workdir) / CHECKPOINTS
  if not ckpt_dir.is_dir():
    raise models.ConfigError(f"{ckpt_dir}: no such folder (no checkpoint saved yet)")
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    if ckpt.latest_step() is None:
      raise models.ConfigError(f"{ckpt_dir}: no checkpoint")
    restored_step, state, _ = ckpt.restore(abstract_state, step)
  except FileNotFoundError as e:
    raise models.ConfigError(str(e)) from None
  finally:
    ckpt.close()
  return restored_step, state


def latest_step(workdir) -> int | None:
  """The step of WORKDIR's latest checkpoint, or None when it has none (a fresh run)."""
  ckpt_dir = pathlib.Path(workdir) / CHECKPOINTS
  if not ckpt_dir.is_dir():
    return None
  ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def sharded_abstract(make_state, base, mesh):
  """ShapeDtypeStructs of make_state(base) carrying their shardings on `mesh`: a restore target."""
  abstract = jax.eval_shape(make_state, base)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      sharding.shardings(abstract, mesh))
