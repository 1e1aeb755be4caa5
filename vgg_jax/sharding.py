"""One explicit device mesh for training and evaluation.

A single ``data`` axis spans every device of every process. Batches are split
over it; parameters and optimiser state are replicated, or (``shard_params``)
split over it along their largest divisible dimension, FSDP-style, so a
VGG's 400 MB FC-6 and its momentum need not fit on each chip.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, P())


def param_sharding(leaf: Any, mesh: Mesh, shard: bool) -> NamedSharding:
  """Sharding for one parameter-like array.

  Args:
    leaf: an array or ``jax.ShapeDtypeStruct``.
    mesh: the mesh.
    shard: split the largest dimension divisible by the device count over the
      data axis (replicate arrays with none, e.g. small biases).
  """
  n = mesh.shape[DATA_AXIS]
  shape = getattr(leaf, 'shape', ())
  if not shard or n == 1 or not shape:
    return replicated(mesh)
  order = np.argsort(shape)[::-1]
  for dim in order:
    if shape[dim] % n == 0 and shape[dim] >= n:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def tree_shardings(tree: Any, mesh: Mesh, shard: bool) -> Any:
  """``param_sharding`` for every leaf of a tree."""
  return jax.tree.map(lambda x: param_sharding(x, mesh, shard), tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-process host batches into global arrays split over data.

  Args:
    local: this process's part of the batch; all processes pass equal sizes.
    mesh: the mesh.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
