"""The device mesh, the shardings of the train state and batch, global batches.

The mesh has two axes, `data` (outer) and `fsdp` (inner), sized from
`config.mesh` (one size may be -1: all remaining devices). The batch is split
over both axes. The train state is replicated over `data`; over `fsdp` every
array with at least `fsdp_min_size` elements is split along its largest
dimension divisible by the `fsdp` size (others stay replicated), so Adam's
moments follow their parameters.
"""

from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp')


def make_mesh(mesh_shape: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh.

  Args:
    mesh_shape: `config.mesh`, axis name -> size; exactly the axes 'data' and
      'fsdp', at most one of them -1 (the remaining devices).
    devices: the devices to use; all of `jax.devices()` when None.

  Returns:
    The mesh.

  Raises:
    ValueError: for unknown axes or sizes that do not multiply to the number
      of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = set(mesh_shape.keys())
  if names != set(MESH_AXES):
    raise ValueError(f'config.mesh must have exactly the axes {MESH_AXES}, got '
                     f'{sorted(names)}')
  sizes = [int(mesh_shape[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh sizes must be positive with at most one -1, '
                     f'got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: '
                       f'{len(devices)} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs '
                     f'{int(np.prod(sizes))} devices, there are {len(devices)}')
  device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  return Mesh(device_grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding.

  Args:
    mesh: the mesh.

  Returns:
    A NamedSharding with an empty partition spec.
  """
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of batch arrays: leading dimension over ('data', 'fsdp').

  Args:
    mesh: the mesh.

  Returns:
    A NamedSharding splitting dimension 0 over all mesh axes.
  """
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def _leaf_sharding(shape: Sequence[int], mesh: Mesh,
                   fsdp_min_size: int) -> NamedSharding:
  """The sharding of one state array (see the module docstring)."""
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
    return replicated(mesh)
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  dim = max(candidates, key=lambda d: (shape[d], -d))
  spec = [None] * len(shape)
  spec[dim] = 'fsdp'
  return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(abstract_state: object, mesh: Mesh,
                    fsdp_min_size: int) -> object:
  """Shardings for every array of the train state.

  Args:
    abstract_state: the state as a tree of `jax.ShapeDtypeStruct`.
    mesh: the mesh.
    fsdp_min_size: arrays smaller than this stay replicated over 'fsdp'.

  Returns:
    A tree of NamedSharding with the structure of `abstract_state`.
  """
  return jax.tree.map(lambda x: _leaf_sharding(x.shape, mesh, fsdp_min_size),
                      abstract_state)


def global_batch(local_batch: Mapping[str, np.ndarray],
                 sharding: NamedSharding,
                 local_batch_size: int) -> Dict[str, jax.Array]:
  """Builds global batch arrays from this process's share.

  Args:
    local_batch: this process's examples, name -> array [local_batch_size, ...].
    sharding: `batch_sharding(mesh)`.
    local_batch_size: the expected leading dimension.

  Returns:
    name -> global array [local_batch_size * process_count, ...] sharded over
    the mesh.

  Raises:
    ValueError: naming an array whose leading dimension is wrong.
  """
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] != local_batch_size:
      raise ValueError(
          f'batch array {name!r} has shape {value.shape}; every batch array '
          f'must lead with this process\'s batch size {local_batch_size}')
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
