"""Data-parallel training over all devices of all processes, with synchronized BN.

Layout: a one-axis `jax.sharding.Mesh` named ``'data'`` over every device
(those of all hosts once `jax.distributed` is initialised). The global batch
of B examples is cut into D equal contiguous blocks of B / D, one per device;
parameters, ``batch_stats``, optimizer state and the training set that the
batches index into are replicated.

Mechanism: `jax.shard_map` over ``'data'`` (the successor of ``pmap``, in which
Flax's BatchNorm ``axis_name`` is documented) around `steps.train_step`, given
``axis_name='data'``; not SPMD ``jax.jit`` with NamedShardings. Under SPMD jit
every reduction over the sharded batch is global, so per-device statistics
would have to be coaxed out of the compiler; in shard_map the step sees one
device's block and both modes (``config.bn.stats``) are explicit:

* ``'global'``: the model's BN layers get ``axis_name='data'``
  (`bn_axis_name`) and average sums and counts over devices (``lax.psum``),
  so they normalise with the statistics of the whole global batch
  (synchronized BN). With a mask, those are the statistics of the real
  examples only, whatever their number per device.
* ``'per_device'``: ``axis_name=None``; each device normalises its own block
  (as ghost BN does), and the new running averages, which then differ between
  devices, are averaged over them (``lax.pmean``).

The loss is the global mean over real examples, ``psum(sum of losses) /
psum(count)``. Its gradient with respect to the replicated parameters is
replicated as well: shard_map's ``check_vma`` types the parameters as
device-invariant, and the transpose of their implicit broadcast to each
device is a ``psum``, so ``jax.grad`` returns the sum over devices of each
device's term, gradient paths through the BN statistics of other devices
included. No separate gradient ``pmean`` is needed (one would be a no-op on an
invariant value); metrics are reduced the same way as the loss.

On one device both modes are the same, and the step is jitted as it is, with
``axis_name=None``: the whole batch, no collectives.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from d2l_lenet import steps

DATA = 'data'
BN_STATS = ('global', 'per_device')


def initialize_distributed(distributed: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run as ``config.distributed`` says, before JAX starts.

  ``coordinator_address``: '' runs one process (nothing to do); 'host:port'
  of process 0, with ``num_processes`` (0: from the environment) and
  ``process_id`` (-1: from the environment); 'auto' lets
  `jax.distributed.initialize` find all three in the cluster environment
  (SLURM, Open MPI, Kubernetes, Cloud TPU). Must run before any JAX
  computation; does nothing if `jax.distributed` is already initialised.
  """
  address = distributed.coordinator_address
  if not address or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
    coordinator_address=None if address == 'auto' else address,
    num_processes=distributed.num_processes or None,
    process_id=None if distributed.process_id < 0 else distributed.process_id,
  )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A one-axis ``'data'`` mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: placement by the shardings given here, as in classic jit.
  return jax.make_mesh(
    (len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def describe(mesh: Mesh) -> str:
  """E.g. ``'cpu:0'`` for one device, ``'8 cpu devices in 2 processes'`` for more."""
  devices = list(mesh.devices.flat)
  if len(devices) == 1:
    return str(devices[0])
  processes = len({d.process_index for d in devices})
  where = f' in {processes} processes' if processes > 1 else ''
  return f'{len(devices)} {devices[0].platform} devices{where}'


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of arrays held whole by every device of ``mesh``."""
  return NamedSharding(mesh, P())


def replicate(mesh: Mesh, tree: Any) -> Any:
  """``tree`` (of arrays equal on every process) copied onto every device of ``mesh``."""

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda index: x[index])

  return jax.tree.map(put, tree)


def shard(mesh: Mesh, tree: Any, axis: int = 0) -> Any:
  """Global arrays cut along ``axis`` into one block per device of ``mesh``.

  Every process passes the same whole ``tree`` (of arrays) and keeps the
  blocks of its own devices. ``axis`` must be divisible by the number of
  devices: for evaluation batches, `steps.pad_and_batch` with ``num_shards=
  mesh.size`` and ``axis=1``.
  """
  sharding = NamedSharding(mesh, P(*[None] * axis, DATA))

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def bn_axis_name(mesh: Mesh, bn_stats: str) -> str | None:
  """The axis over which the BN layers average their statistics (`settings.build_model`).

  ``'data'`` for global statistics on several devices; None otherwise (each
  device's block on its own, or one device, where the collectives are skipped).
  """
  return DATA if bn_stats == 'global' and mesh.size > 1 else None


def make_train_step(mesh: Mesh, bn_stats: str = 'global'):
  """`steps.train_step` over ``mesh``, jitted with the state donated: ``(state, batch)``.

  ``state`` is replicated (`replicate`), its model built for ``mesh`` and
  ``bn_stats`` (`bn_axis_name`); ``batch`` holds global arrays of B examples
  ('image', 'label', optional 'mask'), B divisible by the devices (`shard`).
  Returns the new state and the metrics, replicated scalars.
  """
  return _on_mesh(steps.train_step, mesh, bn_stats, batch_specs=(P(DATA),))


def make_train_steps(mesh: Mesh, bn_stats: str = 'global'):
  """`steps.train_steps` over ``mesh``, jitted with the state donated.

  Takes ``(state, images, labels, indices)``: the state and the training set
  replicated, row s of ``indices`` (S, B) step s's global batch, its columns
  cut into one block per device. Returns the final state and per-step metrics
  of shape (S,).
  """
  return _on_mesh(steps.train_steps, mesh, bn_stats, batch_specs=(P(), P(), P(None, DATA)))


def _on_mesh(step, mesh: Mesh, bn_stats: str, batch_specs: tuple[P, ...]):
  """``step(state, *batch, axis_name, average_batch_stats)`` jitted for ``mesh``."""
  if mesh.size == 1:
    # The whole batch on one device: no collectives to bind an axis to.
    return jax.jit(step, donate_argnums=0)
  step = functools.partial(step, axis_name=DATA, average_batch_stats=bn_stats == 'per_device')
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), *batch_specs), out_specs=P())
  return jax.jit(sharded, donate_argnums=0)
