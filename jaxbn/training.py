"""Training LeNet-BN: pure, jit-compiled steps and the epoch functions built on them.

Data flow: the whole data set lives on the device; each epoch draws a
permutation there (from ``fold_in(key(seed), epoch)``, so a resumed run
shuffles as an uninterrupted one would), cuts it into full batches (the
``len(train) % batch_size`` left-over examples sit out that epoch) and runs
them through `train_step`, one step per dispatch or several inside a
``lax.scan`` (`train_steps`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from jaxbn import models

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the running statistics of the BN layers."""

  batch_stats: Any


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """Initializes the model of ``config`` and ``optax.sgd(config.learning_rate)``."""
  options = {}
  if config.norm == 'jaxbn':
    options = dict(
      virtual_batch_size=config.bn_virtual_batch_size or None,
      renorm_clip=(config.bn_renorm_rmax, config.bn_renorm_dmax) if config.bn_renorm_rmax else None,
      renorm_warmup_steps=config.bn_renorm_warmup_steps,
    )
  norm = models.norm_layer(
    config.norm, momentum=config.bn_momentum, epsilon=config.bn_epsilon, **options
  )
  model = models.LeNet(norm=norm)
  # One compiled call (op by op, initialisation compiled ~125 small programs),
  # without LLVM's optimisations: it runs once, and its random-number code
  # otherwise took 1.3 s of a 1.6 s compilation. Same values either way.
  init = jax.jit(functools.partial(model.init, train=False))
  example = jnp.zeros((1, 28, 28, 1), jnp.float32)
  init = init.lower(rng, example).compile({'xla_backend_optimization_level': 0})
  variables = init(rng, example)
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables.get('batch_stats', {}),
    tx=optax.sgd(config.learning_rate),
  )
  # An int32 array, as a restored checkpoint has it: one compiled step serves both.
  return state.replace(step=jnp.zeros((), jnp.int32))


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, Metrics]:
  """One SGD step on ``batch``: {'image': (B, 28, 28, 1) float32, 'label': (B,) int32}.

  The BN layers normalise with this batch's statistics and update their
  running averages. Returns the new state and the batch's mean cross-entropy
  ``loss`` and ``accuracy``, both computed before the update (as D2L does).
  """

  def loss_fn(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  return state, {'loss': loss, 'accuracy': accuracy}


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
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


def shuffled_batches(rng: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """A random (num_examples // batch_size, batch_size) int32 array of distinct indices."""
  num_batches = num_examples // batch_size
  perm = jax.random.permutation(rng, num_examples)[: num_batches * batch_size]
  return perm.reshape(num_batches, batch_size).astype(jnp.int32)


def train_steps(
  state: TrainState, images: jax.Array, labels: jax.Array, batch_indices: jax.Array
) -> tuple[TrainState, Metrics]:
  """`train_step` over each row of ``batch_indices`` (S, B) in a ``lax.scan``.

  ``images`` and ``labels`` are the whole training set on the device. Returns
  the final state and per-step metrics of shape (S,).
  """

  def body(state, idx):
    return train_step(state, {'image': images[idx], 'label': labels[idx]})

  if batch_indices.shape[0] == 1:
    # One step needs no loop. (Inside loops XLA:CPU hands convolutions that are
    # not NHWC/HWIO, as backward passes have, to a naive loop emitter, since
    # its ConvCanonicalization pass visits the entry computation only.
    # models.LeNet has no convolution ops, so its steps run as fast in a scan.)
    state, metrics = body(state, batch_indices[0])
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(body, state, batch_indices)


def evaluate(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
  """Mean ``loss`` and ``accuracy`` over the examples where ``mask`` is True.

  Inputs are batched: images (S, B, 28, 28, 1), labels and mask (S, B); see
  `pad_and_batch`. The batches run in a ``lax.scan``.
  """

  def body(totals, batch):
    image, label, m = batch
    sums = eval_step(state, {'image': image, 'label': label, 'mask': m})
    return jax.tree.map(jnp.add, totals, sums), None

  zeros = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  totals, _ = jax.lax.scan(body, jax.tree.map(jnp.asarray, zeros), (images, labels, mask))
  count = jnp.maximum(totals['count'], 1)
  return {'loss': totals['loss_sum'] / count, 'accuracy': totals['correct'] / count}


def pad_and_batch(images, labels, batch_size: int):
  """Pads to a multiple of ``batch_size`` and reshapes to (S, B, ...) with a mask.

  One compiled evaluation then serves any number of examples.
  """
  n = len(labels)
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  mask = jnp.arange(num_batches * batch_size) < n
  images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
  labels = jnp.pad(labels, (0, pad))
  shape = (num_batches, batch_size)
  return (
    images.reshape(shape + images.shape[1:]),
    labels.reshape(shape),
    mask.reshape(shape),
  )
