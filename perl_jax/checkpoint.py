"""Atomic, sharding-aware training checkpoints on top of Orbax.

One checkpoint step holds two items:
  state: a pytree of arrays (trainable/LoRA params, optax state, RNG key data, ...), written with `StandardSave`
    so every process writes only its own shards and restore can reshard onto any target mesh.
  extra: a JSON-able dict, in training the data-iterator position ({"data": BatchIterator.get_state()}), written
    with `JsonSave` (Orbax writes it from the primary process only).

Atomicity comes from Orbax: a step is written under `<workdir>/<step>.orbax-checkpoint-tmp` and only renamed to
`<workdir>/<step>` after every item is complete, so a crash mid-save leaves a `*-tmp` directory that
`latest_step`/`restore` never see. Old steps are pruned (`max_to_keep`) only after the new step has been
committed, and leftover tmp directories are deleted by the next `Checkpointer` opened on the workdir (before its
first save). All file I/O goes through Orbax, which coordinates processes, so this module is multi-host safe
without any custom writes. When to save is the caller's decision: every `save` of a new step writes.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "key_to_data", "data_to_key", "abstract_like"]

_STATE = "state"
_EXTRA = "extra"


def key_to_data(key: jax.Array) -> jax.Array:
  """Raw uint32 data of a PRNG key; legacy raw keys pass through unchanged."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def data_to_key(data: jax.Array, impl: str | None = None) -> jax.Array:
  """Inverse of `key_to_data`: wraps raw key data into a typed key."""
  return jax.random.wrap_key_data(data, impl=impl)


def abstract_like(tree: Any) -> Any:
  """Abstract restore target for `tree`: jax.Array leaves become ShapeDtypeStructs carrying their shape, dtype
  and sharding; other leaves (ShapeDtypeStructs, numpy arrays) are kept as given."""
  return jax.tree.map(lambda x: ocp.utils.to_shape_dtype_struct(x) if isinstance(x, jax.Array) else x, tree)


def _stored_shape(leaf: Any) -> tuple[int, ...] | None:
  """Shape a target leaf has on disk (typed PRNG keys are stored as key data)."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return jax.eval_shape(jax.random.key_data, leaf).shape
  return getattr(leaf, "shape", None)


def _target_problems(saved: dict, wanted: dict) -> list[str]:
  """Differences between checkpoint and target {path tuple: shape}: missing/extra paths, shape mismatches."""
  name = "/".join
  problems = [f"missing in target: {name(k)}" for k in sorted(saved.keys() - wanted.keys())]
  problems += [f"not in checkpoint: {name(k)}" for k in sorted(wanted.keys() - saved.keys())]
  problems += [f"shape of {name(k)}: checkpoint {tuple(saved[k])} vs target {tuple(wanted[k])}"
               for k in sorted(saved.keys() & wanted.keys())
               if None not in (saved[k], wanted[k]) and tuple(saved[k]) != tuple(wanted[k])]
  return problems


class Checkpointer:
  """Saves/restores (step, state, extra) in `workdir` via `ocp.CheckpointManager`.

  Args:
    workdir: checkpoint root directory (created if missing); one subdirectory per committed step.
    max_to_keep: number of most recent steps kept; older ones are deleted after a newer step is committed.
      None keeps all.
    async_save: if True, `save` returns once arrays are copied off-device and writing continues in the
      background; call `wait` before relying on the files. Default is synchronous.
  """

  def __init__(self, workdir: str | os.PathLike, max_to_keep: int | None = 3, async_save: bool = False):
    self.workdir = os.path.abspath(os.fspath(workdir))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()}
    self._mgr = ocp.CheckpointManager(self.workdir, options=options, item_handlers=handlers)

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
    """Saves `state` (pytree of arrays) and `extra` (JSON dict) as `step`.

    Must be called on every process. Returns whether a checkpoint was written: False when `step` is not newer
    than the latest step; `force=True` skips that check but never overwrites (an existing step raises
    `StepAlreadyExistsError`, a ValueError). Values are not validated, so NaN/Inf states are saved as-is.
    """
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(dict(extra or {}))})
    try:
      return self._mgr.save(int(step), args=args, force=force)
    except Exception:
      self._mgr.reload()
      raise

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restores (step, state, extra); `step=None` means the latest.

    `abstract_state` fixes the pytree structure (e.g. optax namedtuples), dtypes and shardings of the result:
    leaves may be ShapeDtypeStructs (with `.sharding` to place shards on a mesh, which may differ from the one
    used at save time) or concrete arrays, whose sharding is reused. Raises FileNotFoundError if there is no
    such step and ValueError if the target's structure or shapes do not match the checkpoint.
    """
    self.wait()
    step = self._existing_step(step)
    target = abstract_like(abstract_state)
    self._check_target(step, target)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()})
    try:
      restored = self._mgr.restore(step, args=args)
    except ValueError as e:
      raise ValueError(f"Checkpoint step {step} in {self.workdir} does not match the restore target "
                       f"(structure/shape mismatch): {e}") from e
    return step, restored[_STATE], dict(restored[_EXTRA] or {})

  def restore_subtree(self, key: str, shardings_fn, step: int | None = None, like: Any = None) -> tuple[int, Any]:
    """(step, state[key]) of checkpoint `step` (default latest), read alone: shapes and dtypes come from the
    checkpoint's metadata, placement from shardings_fn(abstract subtree) -> a tree of shardings. For reading a
    run's trained params without rebuilding its optimizer (the rest of the state is never read). With `like`
    (a tree of arrays or ShapeDtypeStructs), paths and shapes must match it, as in `restore`."""
    self.wait()
    step = self._existing_step(step)
    meta = self._mgr.item_metadata(step)[_STATE]
    tree = getattr(meta, "tree", meta)[key]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    if like is not None:
      self._raise_on_mismatch(step, abstract, like, f" ({key})")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          shardings_fn(abstract))
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                                               dtype=t.dtype), target)
    reader = ocp.CheckpointManager(self.workdir, item_handlers={_STATE: ocp.PyTreeCheckpointHandler(),
                                                                _EXTRA: ocp.JsonCheckpointHandler()})
    try:
      restored = reader.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(item={key: target}, restore_args={key: restore_args}, partial_restore=True),
          _EXTRA: ocp.args.JsonRestore()}))
    finally:
      reader.close()
    return step, restored[_STATE][key]

  def _existing_step(self, step: int | None) -> int:
    """`step`, or the latest one if None; FileNotFoundError if it is not a committed step."""
    if step is None:
      step = self._mgr.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint found in {self.workdir}.")
    step = int(step)
    if step not in self._mgr.all_steps():
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.workdir}; "
                              f"available steps: {sorted(self._mgr.all_steps())}.")
    return step

  def _check_target(self, step: int, target: Any) -> None:
    """Compares target paths/shapes with the saved metadata before reading any data, so mismatches fail fast
    with the offending paths named."""
    meta = self._mgr.item_metadata(step)[_STATE]
    if meta is not None:
      self._raise_on_mismatch(step, meta.tree, target)

  def _raise_on_mismatch(self, step: int, saved_tree: Any, target: Any, what: str = "") -> None:
    """A ValueError listing every missing / extra path and shape mismatch between a checkpoint's (sub)tree and a
    restore target."""
    saved = {k: getattr(v, "shape", None) for k, v in ocp.tree.to_flat_dict(saved_tree).items()}
    wanted = {k: _stored_shape(v) for k, v in ocp.tree.to_flat_dict(target).items()}
    problems = _target_problems(saved, wanted)
    if problems:
      raise ValueError(f"Checkpoint step {step} in {self.workdir} does not match the restore target{what}:\n  "
                       + "\n  ".join(problems))

  def latest_step(self) -> int | None:
    """Latest committed step, or None if the workdir holds no checkpoint."""
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    """All committed steps, ascending."""
    return sorted(self._mgr.all_steps())

  def wait(self) -> None:
    """Blocks until any in-flight (async) save has been committed.

    A failed background save re-raises here; the step list is then re-read from disk so it only lists
    committed steps.
    """
    try:
      self._mgr.wait_until_finished()
    except Exception:
      self._mgr.reload()
      raise

  def close(self) -> None:
    """Waits for pending saves and releases Orbax resources."""
    self._mgr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
