"""Pure functions of training and evaluation; `d2l_lenet.parallel` runs them on a device mesh.

Data flow: the whole data set lives on the device; each epoch draws a
permutation there (`shuffled_batches`, from ``fold_in(key(seed), epoch)``, so
a resumed run shuffles as an uninterrupted one would), cuts it into full
batches (the ``len(train) % batch_size`` left-over examples sit out that
epoch) and runs them through `train_step` inside a ``lax.scan``
(`train_steps`). The test set is cut into padded batches with a mask of the
real examples (`pad_and_batch`) and summed over by `evaluate`.

One step serves one device and many: called plainly (``axis_name=None``) it
sees the whole batch; inside ``jax.shard_map`` over a mesh axis it sees one
device's block, and its sums over the batch (loss, accuracy) add up the
blocks of all devices over ``axis_name``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from jax import lax

from d2l_lenet import divisors, nnx_apply
from jaxbn import precise

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the running statistics of the BN layers."""

  batch_stats: Any


def create_train_state(
  rng: jax.Array, model: nn.Module | Callable[..., nnx.Module], learning_rate: float
) -> TrainState:
  """Initializes ``model`` and ``optax.sgd(learning_rate)``.

  ``model`` is a linen module (initialised on (1, 28, 28, 1) images) or the
  constructor of an NNX module, called as ``model(rngs=nnx.Rngs(rng))`` (e.g.
  ``functools.partial(models.NNXLeNet, norm=...)``), which then trains through
  `d2l_lenet.nnx_apply.as_apply`: the same state, step and checkpoints as linen's.
  """
  if isinstance(model, nn.Module):
    # One compiled program without LLVM's optimisations: it runs once, so
    # optimising its random-number code costs more than it saves; the values
    # are the same either way.
    init = jax.jit(functools.partial(model.init, train=False))
    example = jnp.zeros((1, 28, 28, 1), jnp.float32)
    init = init.lower(rng, example).compile({'xla_backend_optimization_level': 0})
    apply_fn, variables = model.apply, init(rng, example)
  else:
    apply_fn, variables = nnx_apply.as_apply(model(rngs=nnx.Rngs(rng)))
  state = TrainState.create(
    apply_fn=apply_fn,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    tx=optax.sgd(learning_rate),
  )
  # An int32 array, as a restored checkpoint has it: one compiled step serves both.
  return state.replace(step=jnp.zeros((), jnp.int32))


def precise_batch_stats(
  model: nn.Module | Callable[..., nnx.Module],
  params: Any,
  batch_stats: Any,
  images: jax.Array,
  batch_size: int,
) -> Any:
  """`jaxbn.precise`'s statistics for a train state's ``params`` and ``batch_stats``.

  ``model`` as `create_train_state` takes it (a linen module called with
  ``train=True``, or ``make_model(rngs=...)``); ``params`` and
  ``batch_stats`` and the result are nested dicts, as in the train state.
  """
  if isinstance(model, nn.Module):
    return precise.precise_batch_stats(
      model.apply, params, batch_stats, images, batch_size, train=True
    )
  nnx_model = nnx_apply.as_module(model, {'params': params, 'batch_stats': batch_stats})
  precise.precise_batch_stats_nnx(nnx_model, images, batch_size)
  return nnx.to_pure_dict(nnx.state(nnx_model, nnx.BatchStat))


def train_step(
  state: TrainState,
  batch: Batch,
  axis_name: str | None = None,
  average_batch_stats: bool = False,
) -> tuple[TrainState, Metrics]:
  """One SGD step on ``batch``; the BN layers normalise with batch statistics.

  Args:
    state: the train state (replicated, inside ``shard_map``).
    batch: 'image' (B, 28, 28, 1) float32, 'label' (B,) int32 and optionally
      'mask' (B,) bool, True for the real examples: padding (any finite
      values) enters neither the loss nor the BN statistics.
    axis_name: the mesh axis that the global batch is split over, when this
      runs inside ``shard_map`` on one device's block; None for the whole
      batch. The loss is then ``psum(sum of losses) / psum(count)``.
    average_batch_stats: average the new running averages over
      ``axis_name``: BN layers that normalise each device's block on their
      own (``config.bn.stats='per_device'``) update them differently.

  Returns:
    The new state and the mean cross-entropy ``loss`` and ``accuracy`` over
    the real examples (of all devices), both computed before the update (as
    D2L does).
  """
  mask = batch.get('mask')
  count = jnp.float32(batch['label'].size) if mask is None else jnp.sum(mask, dtype=jnp.float32)
  if axis_name is not None:
    count = lax.psum(count, axis_name)

  def mean(per_example):
    total = jnp.sum(per_example if mask is None else jnp.where(mask, per_example, 0.0))
    return total / count if axis_name is None else lax.psum(total, axis_name) / count

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mask=mask,
      mutable=['batch_stats'],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return mean(losses), (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if average_batch_stats:
    # The mean of the devices' running averages is the running average of
    # their mean statistics (the update is linear); integer counters are equal.
    batch_stats = jax.tree.map(
      lambda v: lax.pmean(v, axis_name) if jnp.issubdtype(v.dtype, jnp.floating) else v,
      batch_stats,
    )
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32))
  return state, {'loss': loss, 'accuracy': accuracy}


def train_steps(
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  batch_indices: jax.Array,
  axis_name: str | None = None,
  average_batch_stats: bool = False,
) -> tuple[TrainState, Metrics]:
  """`train_step` over each row of ``batch_indices`` (S, B) in a ``lax.scan``.

  ``images`` and ``labels`` are the whole training set on the device; inside
  ``shard_map``, ``batch_indices`` holds this device's columns of each global
  batch. The other arguments are `train_step`'s. Returns the final state and
  per-step metrics of shape (S,).
  """

  def body(state, idx):
    batch = {'image': images[idx], 'label': labels[idx]}
    return train_step(state, batch, axis_name, average_batch_stats)

  if batch_indices.shape[0] == 1:
    # One step needs no loop. (Inside loops XLA:CPU hands convolutions that are
    # not NHWC/HWIO, as backward passes have, to a naive loop emitter, since
    # its ConvCanonicalization pass visits the entry computation only. On CPU
    # models.LeNet's banded forms have no convolution ops; conv_impl='standard'
    # does.)
    state, metrics = body(state, batch_indices[0])
    return state, jax.tree.map(lambda m: m[None], metrics)
  return lax.scan(body, state, batch_indices)


def steps_per_dispatch(steps_per_epoch: int, wanted: int) -> int:
  """The steps per `train_steps` call: the largest divisor of ``steps_per_epoch`` up to ``wanted``.

  A divisor, so that one compiled call serves the whole epoch; ``wanted`` 0
  means the whole epoch in one call.
  """
  if wanted <= 0 or wanted >= steps_per_epoch:
    return steps_per_epoch
  return divisors.largest_divisor(steps_per_epoch, wanted)


def eval_step(state: TrainState, batch: Batch) -> Metrics:
  """Sums over ``batch`` (which may carry a boolean 'mask' of real examples).

  Uses the running averages of the BN layers (inference mode). Returns
  ``loss_sum``, ``correct`` and ``count``, to be added over batches.
  """
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  mask = batch.get('mask', jnp.ones_like(batch['label'], bool))
  correct = (jnp.argmax(logits, -1) == batch['label']) & mask
  return {
    'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
    'correct': jnp.sum(correct),
    'count': jnp.sum(mask),
  }


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
  """Mean ``loss`` and ``accuracy`` over the examples where ``mask`` is True.

  Inputs are batched: images (S, B, 28, 28, 1), labels and mask (S, B); see
  `pad_and_batch`. The batches run in a ``lax.scan``; under ``jax.jit`` with
  the B axis sharded (`d2l_lenet.parallel.shard`), XLA splits each over the devices.
  """

  def body(totals, batch):
    image, label, m = batch
    sums = eval_step(state, {'image': image, 'label': label, 'mask': m})
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  totals, _ = lax.scan(body, jax.tree.map(jnp.asarray, zeros), (images, labels, mask))
  count = jnp.maximum(totals['count'], 1)
  return {'loss': totals['loss_sum'] / count, 'accuracy': totals['correct'] / count}


def shuffled_batches(rng: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """A random (num_examples // batch_size, batch_size) int32 array of distinct indices."""
  num_batches = num_examples // batch_size
  perm = jax.random.permutation(rng, num_examples)[: num_batches * batch_size]
  return perm.reshape(num_batches, batch_size).astype(jnp.int32)


def pad_and_batch(
  images: np.ndarray, labels: np.ndarray, batch_size: int, num_shards: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All examples as (S, B, ...) batches, zero-padded, and a (S, B) mask of the real ones.

  B is ``batch_size`` (at most the number of examples) rounded up to a
  multiple of ``num_shards``, so that each of that many devices can take an
  equal block of every batch. One compiled evaluation then serves any
  number of examples.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  n = len(labels)
  batch_size = -(-min(batch_size, n) // num_shards) * num_shards
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  mask = np.arange(num_batches * batch_size) < n
  images = np.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
  labels = np.pad(labels, (0, pad))
  shape = (num_batches, batch_size)
  return images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape)
