"""Deep MLPs with and without BN and residual connections: the depth experiment of issue #25.

`DeepMLP` maps (N, 28, 28, 1) images to (N, num_classes) logits: flatten,
a stem ``Dense(width)``, ``depth`` blocks of width ``width``, a head. The
blocks run in one ``nn.scan``, so compile time does not grow with depth;
their variables are stacked along a leading axis of length ``depth``
(``params['blocks']['Dense_0']['kernel']`` is (depth, width, width)).

* plain block: ``x = relu(BN(Dense(x)))`` (BN left out when ``norm=False``);
* residual block, pre-activation (He et al. 2016): ``x = x + Dense(relu(BN(x)))``.

Every Dense kernel is He-normal (variance 2 / fan_in), the initialisation
that keeps the scale of a plain ReLU net's activations from block to block;
biases start at zero. `init_scales` measures activation and gradient scales
per block at initialisation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from jaxbn.linen import BatchNorm

MOMENTUM = 0.9  # D2L's momentum of the running averages
EPSILON = 1e-5


class Block(nn.Module):
  """One block on (N, width) activations; returns ``(x, None)`` as ``nn.scan`` wants.

  Sows its output into ``intermediates['block_out']``.
  """

  width: int
  norm: bool
  residual: bool
  train: bool

  def bn(self, x: jax.Array) -> jax.Array:
    if not self.norm:
      return x
    return BatchNorm(use_running_average=not self.train, momentum=MOMENTUM, epsilon=EPSILON)(x)

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    dense = nn.Dense(self.width, kernel_init=nn.initializers.he_normal())
    if self.residual:
      x = x + dense(nn.relu(self.bn(x)))
    else:
      x = nn.relu(self.bn(dense(x)))
    self.sow('intermediates', 'block_out', x)
    return x, None


class DeepMLP(nn.Module):
  """A ``depth``-block MLP on (N, 28, 28, 1) images, returning (N, num_classes) logits.

  ``norm``: BN (`jaxbn.linen.BatchNorm`, momentum 0.9, epsilon 1e-5) in each
  block (and, for residual nets, before the head); ``residual``:
  pre-activation residual blocks. The head is ``Dense(relu(BN(x)))`` for
  residual nets (their sum is not yet normalised nor rectified) and
  ``Dense(x)`` for plain ones. Call with ``train=True`` (batch statistics,
  ``mutable=['batch_stats']``) or ``train=False`` (running averages).
  ``mutable=['intermediates']`` also returns every block's output,
  ``intermediates['blocks']['block_out']``: a 1-tuple of a (depth, N, width) array.
  """

  depth: int
  width: int = 64
  norm: bool = False
  residual: bool = False
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    he = nn.initializers.he_normal()
    x = nn.Dense(self.width, kernel_init=he, name='stem')(x.reshape(x.shape[0], -1))
    blocks = nn.scan(
      Block,
      # Each block's params, running statistics and sown output get a leading depth axis.
      variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
      split_rngs={'params': True},
      length=self.depth,
    )
    x, _ = blocks(self.width, self.norm, self.residual, train, name='blocks')(x, None)
    if self.residual:
      if self.norm:
        x = BatchNorm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes, kernel_init=he, name='head')(x)


def _scaled(x: jax.Array, f) -> jax.Array:
  """``f`` (std or norm over axes 1, 2, keepdims) of ``x`` (depth, a, b), per block, as (depth,).

  Computed on ``x`` divided by its largest magnitude in each block: a residual
  net without BN reaches activations of 1e19 at depth 128, whose squares
  overflow float32.
  """
  m = jnp.max(jnp.abs(x), axis=(1, 2), keepdims=True)
  m = jnp.where(m > 0, m, 1.0)
  return (m * f(x / m))[:, 0, 0]


def init_scales(
  model: DeepMLP, variables: dict[str, Any], images: jax.Array, labels: jax.Array
) -> dict[str, np.ndarray]:
  """Per-block scales of ``model`` at ``variables``, in training mode (batch statistics).

  Args:
    model: a `DeepMLP`.
    variables: its ``params`` (and ``batch_stats`` if it has BN); other
      collections are ignored.
    images: (N, 28, 28, 1) float32, one batch.
    labels: (N,) int32.

  Returns:
    numpy arrays of shape (depth,), index l for block l (0 is next to the stem):
    ``activation_std``, the standard deviation of block l's output over all N
    x width values; ``grad_norm``, the l2 (Frobenius) norm of the gradient of
    the mean cross-entropy over the batch with respect to block l's Dense kernel.
  """
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  scales = _init_scales(model, variables, images, labels)
  return {k: np.asarray(v) for k, v in scales.items()}


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model configuration
def _init_scales(model, variables, images, labels):
  def loss_fn(params):
    logits, state = model.apply(
      {**variables, 'params': params},
      images,
      train=True,
      mutable=['batch_stats', 'intermediates'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state['intermediates']['blocks']['block_out'][0]

  grads, block_out = jax.grad(loss_fn, has_aux=True)(variables['params'])
  kernel = grads['blocks']['Dense_0']['kernel']  # (depth, width, width)
  return {
    'activation_std': _scaled(block_out, lambda u: jnp.std(u, axis=(1, 2), keepdims=True)),
    'grad_norm': _scaled(kernel, lambda u: jnp.sqrt(jnp.sum(u * u, axis=(1, 2), keepdims=True))),
  }
