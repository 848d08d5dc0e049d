"""Data-parallel training over all devices of all processes, with synchronized BN.

Layout: a one-axis `jax.sharding.Mesh` named ``'data'`` over every device
(those of all hosts once `jax.distributed` is initialised). The global batch
of B examples is cut into D equal contiguous blocks of B / D, one per device;
parameters, ``batch_stats``, optimizer state and the training set that the
batches index into are replicated.

Mechanism: `jax.shard_map` over ``'data'`` (the successor of ``pmap``, in which
Flax's BatchNorm ``axis_name`` is documented), not SPMD ``jax.jit`` with
NamedShardings. Under SPMD jit every reduction over the sharded batch is global,
so per-device statistics would have to be coaxed out of the compiler; in
shard_map the function sees one device's block and both modes are explicit:

* ``bn_stats='global'``: the BN layers get ``axis_name='data'`` and average
  sums and counts over devices (``lax.psum``), so they normalise with the
  statistics of the whole global batch (synchronized BN). With a mask, those
  are the statistics of the real examples only, whatever their number per
  device.
* ``bn_stats='per_device'``: ``axis_name=None``; each device normalises its
  own block (as ghost BN does), and the new running averages, which then
  differ between devices, are averaged over them (``lax.pmean``).

The loss is the global mean over real examples, ``psum(sum of losses) /
psum(count)``. Its gradient with respect to the replicated parameters is
replicated as well: shard_map's ``check_vma`` types the parameters as
device-invariant, and the transpose of their implicit broadcast to each
device is a ``psum``, so ``jax.grad`` returns the sum over devices of each
device's term, gradient paths through the BN statistics of other devices
included. No separate gradient ``pmean`` is needed (one would be a no-op on an
invariant value); metrics are reduced the same way as the loss.

On one device both modes are the same. `make_train_steps`, which the trainer
runs, is then `training.train_steps` itself; `make_train_step` computes the
same as `training.train_step`, up to float32 rounding (XLA fuses it
differently).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import training

DATA = 'data'
BN_STATS = ('global', 'per_device')

Batch = dict[str, jax.Array]


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


def shard_batch(mesh: Mesh, batch: Any, axis: int = 0) -> Any:
  """Global arrays cut along ``axis`` into one block per device of ``mesh``.

  Every process passes the same whole ``batch`` (a pytree of arrays) and
  keeps the blocks of its own devices. ``axis`` must be divisible by the
  number of devices.
  """
  spec = P(*[None] * axis, DATA)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  return jax.tree.map(put, batch)


def shard_eval_batches(mesh: Mesh, images, labels, mask):
  """`training.pad_and_batch` output (S, B, ...) padded to B divisible by the devices and sharded.

  The added examples are zeros with ``mask`` False, so `training.evaluate`
  ignores them; under ``jax.jit`` XLA partitions it over the blocks.
  """
  pad = -labels.shape[1] % mesh.size
  widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
  padded = tuple(np.pad(np.asarray(x), widths(x)) for x in (images, labels, mask))
  return shard_batch(mesh, padded, axis=1)


def sync_model(apply_fn: Any, mesh: Mesh, bn_stats: str) -> nn.Module:
  """The model of ``apply_fn`` (a `TrainState`'s) with its BN layers set for ``bn_stats``.

  The model (e.g. `models.LeNet`) needs an ``axis_name`` attribute passed to
  its BN layers; all its other attributes are kept. On one device both modes
  are the same, and the layers skip the collectives.
  """
  if bn_stats not in BN_STATS:
    raise ValueError(f'bn_stats={bn_stats!r} is not one of {BN_STATS}.')
  model = getattr(apply_fn, '__self__', None)
  if not isinstance(model, nn.Module) or not hasattr(model, 'norm'):
    raise TypeError(
      f'apply_fn={apply_fn!r} must be the apply of a module with a norm attribute '
      'for its BN layers, such as models.LeNet.'
    )
  if model.norm is None:
    return model
  axis_name = DATA if bn_stats == 'global' and mesh.size > 1 else None
  return model.clone(norm=functools.partial(model.norm, axis_name=axis_name))


def device_train_step(
  model: nn.Module, state: training.TrainState, batch: Batch
) -> tuple[training.TrainState, training.Metrics]:
  """One SGD step as seen by one device inside ``shard_map`` over ``'data'``.

  ``batch`` is this device's block: 'image' (b, 28, 28, 1), 'label' (b,) and
  optionally 'mask' (b,) bool, True for real examples (padding may hold
  anything finite). ``model`` is `sync_model`'s; ``state.apply_fn`` is not
  used. Returns the new (replicated) state and the global mean ``loss`` and
  ``accuracy`` over the real examples of all devices, before the update.
  """
  mask = batch.get('mask')
  synced = model.norm is not None and model.norm.keywords.get('axis_name') is not None
  if mask is not None and synced and model.norm.func is nn.BatchNorm:
    raise ValueError(
      "norm='flax' with a mask and global statistics: flax.linen.BatchNorm averages "
      'per-device means, which is wrong when devices hold different numbers of real '
      "examples (flax issue 2417). Use norm='jaxbn'."
    )
  real = jnp.ones(batch['label'].shape, bool) if mask is None else mask
  count = lax.psum(jnp.sum(real, dtype=jnp.float32), DATA)

  def global_mean(per_example):
    return lax.psum(jnp.sum(jnp.where(real, per_example, 0.0)), DATA) / count

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mask=mask,
      mutable=['batch_stats'],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return global_mean(losses), (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if not synced:
    # Per-device running averages: their mean is the running average of the
    # mean statistics (the update is linear). Counts are equal on every device.
    batch_stats = jax.tree.map(
      lambda v: lax.pmean(v, DATA) if jnp.issubdtype(v.dtype, jnp.floating) else v, batch_stats
    )
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = global_mean(jnp.argmax(logits, -1) == batch['label'])
  return state, {'loss': loss, 'accuracy': accuracy}


def make_train_step(apply_fn: Any, mesh: Mesh, bn_stats: str = 'global'):
  """``jit(step)(state, batch) -> (state, metrics)`` over ``mesh``: `device_train_step` per block.

  ``apply_fn`` is the state's (see `sync_model`). ``batch`` holds global arrays
  of B examples ('image', 'label', optional 'mask'), B divisible by the
  devices (see `shard_batch`); ``state`` is replicated (`replicate`).
  Metrics are replicated scalars.
  """
  model = sync_model(apply_fn, mesh, bn_stats)
  step = jax.shard_map(
    lambda state, batch: device_train_step(model, state, batch),
    mesh=mesh,
    in_specs=(P(), P(DATA)),
    out_specs=P(),
  )
  return jax.jit(step)


def make_train_steps(apply_fn: Any, mesh: Mesh, bn_stats: str = 'global'):
  """The data-parallel `training.train_steps`: ``(state, images, labels, indices (S, B))``.

  ``images`` and ``labels`` (the training set) are replicated; row s of
  ``indices`` is step s's global batch, its columns cut into one block per
  device. Returns the jitted function (``state`` donated) giving the final
  state and per-step metrics of shape (S,). On one device it is
  `training.train_steps` itself (which `device_train_step` equals there).
  """
  model = sync_model(apply_fn, mesh, bn_stats)  # (on one device: only checks the arguments)
  if mesh.size == 1:
    return jax.jit(training.train_steps, donate_argnums=0)

  def steps(state, images, labels, indices):
    def body(state, idx):
      return device_train_step(model, state, {'image': images[idx], 'label': labels[idx]})

    if indices.shape[0] == 1:
      # As in training.train_steps: XLA:CPU runs a step inside a loop slower.
      state, metrics = body(state, indices[0])
      return state, jax.tree.map(lambda m: m[None], metrics)
    return lax.scan(body, state, indices)

  sharded = jax.shard_map(steps, mesh=mesh, in_specs=(P(), P(), P(), P(None, DATA)), out_specs=P())
  return jax.jit(sharded, donate_argnums=0)
