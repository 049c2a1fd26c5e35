"""Device mesh (data, fsdp, tensor), regex partition rules over param paths, batch sharding, multi-host init."""
import re
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# A quantized kernel (perl_jax.models.quant) is split like the float kernel it stands for: its codes [L,in,out]
# (4-bit: packed [L,in/2,out]) and block scales / mins [L,in/block,out] on the same axes, int8's per-channel scales
# [L,out] on the output's, nf4's double-quantized absmax scales [L,in/block] on the input's.
_KERNEL_ARRAYS = r"(/codes_LxIxO|/packed_LxHxO|/absmax_LxBxO|/absmax_codes_LxBxO|/scale_LxBxO|/min_LxBxO)?$"

# First matching regex wins; searched anywhere in the path so optimizer states (".../mu/layers/...") match.
# Kernels are [L,in,out]; LoRA a [L,in,r] follows its kernel's input, b [L,r,out] its output.
RULES: tuple[tuple[str, P], ...] = (
    (r"embed/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/kernel" + _KERNEL_ARRAYS, P(None, "fsdp", "tensor")),
    (r"layers/(attn/o|mlp/down)_proj/kernel" + _KERNEL_ARRAYS, P(None, "tensor", "fsdp")),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/kernel/scale_LxO$", P(None, "tensor")),
    (r"layers/(attn/o|mlp/down)_proj/kernel/scale_LxO$", P(None, "fsdp")),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/kernel/absmax_scale_LxB$", P(None, "fsdp")),
    (r"layers/(attn/o|mlp/down)_proj/kernel/absmax_scale_LxB$", P(None, "tensor")),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/bias$", P(None, "tensor")),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/a$", P(None, "fsdp", None)),
    (r"layers/(attn/(q|k|v)|mlp/(gate|up))_proj/b$", P(None, None, "tensor")),
    (r"layers/(attn/o|mlp/down)_proj/a$", P(None, "tensor", None)),
    (r"layers/(attn/o|mlp/down)_proj/b$", P(None, None, "fsdp")),
    (r".*", P()),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with GSPMD (Auto) axes; data = -1 takes the devices left over."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1:
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} != {len(devices)} devices")
  grid = np.asarray(devices).reshape(data, fsdp, tensor)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (tiny configs, odd head counts) instead of failing."""
  parts = list(spec) + [None] * (len(shape) - len(spec))
  if len(parts) > len(shape):
    return P()
  fitted = []
  for dim, axis in zip(shape, parts):
    names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axis if names and dim % size == 0 else None)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _rule_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  """The first matching rule's spec for `name`; under a "members" key (an ensemble's stacked members,
  perl_jax.ensemble) the leading member axis is replicated and the rest split as one member's leaf."""
  if re.search(r"(^|/)members/", name):
    inner = _rule_spec(re.sub(r"(^|/)members/", r"\1", name, count=1), shape[1:], mesh, rules)
    return _fit(P(None, *inner), shape, mesh)
  for pattern, s in rules:
    if re.search(pattern, name):
      return _fit(s, shape, mesh)
  return P()


def partition_specs(tree, mesh: Mesh, rules=RULES):
  """A PartitionSpec per leaf from the first rule whose regex matches its path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _rule_spec(_path_str(path), tuple(getattr(leaf, "shape", ())), mesh, rules), tree)


def shardings(tree, mesh: Mesh, rules=RULES):
  """NamedShardings for a pytree (of arrays or ShapeDtypeStructs) by the partition rules."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def gathered_shardings(tree, mesh: Mesh, rules=RULES):
  """The rules' shardings with the fsdp axis dropped: each leaf whole over fsdp (still split over tensor). The
  sampler constrains its params to these once, before the prefill, so its decode loop does not all-gather every
  layer's FSDP shards again at every token."""
  def drop(axis):
    if isinstance(axis, tuple):
      return tuple(a for a in axis if a != "fsdp") or None
    return None if axis == "fsdp" else axis
  return shardings(tree, mesh, tuple((pattern, P(*map(drop, spec))) for pattern, spec in rules))


def shard(tree, mesh: Mesh, rules=RULES):
  """Places a pytree on the mesh according to the rules."""
  return jax.device_put(tree, shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Per-host numpy batches -> one global jax.Array per field, batch axis sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def initialize_distributed(enabled: bool, coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host job. On TPU VMs / SLURM, no arguments are needed: JAX discovers the peers."""
  if not enabled:
    return
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def describe(tree, mesh: Mesh, rules=RULES) -> str:
  """One line per leaf: path, shape, spec; for reading what the rules did."""
  specs = traverse_util.flatten_dict(partition_specs(tree, mesh, rules), sep="/",
                                     is_leaf=lambda _, x: isinstance(x, P))
  leaves = traverse_util.flatten_dict(tree, sep="/")
  return "\n".join(f"{p:50s} {str(tuple(leaves[p].shape)):22s} {specs[p]}" for p in sorted(leaves))
