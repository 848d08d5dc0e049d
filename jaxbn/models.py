"""LeNet-5 with batch normalization, as in D2L's batch-norm chapter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxbn.linen import BatchNorm

NORMS = ('jaxbn', 'flax', 'none')


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 of NHWC ``x`` (H and W even).

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``, written as a reshape and
  a max: XLA differentiates that into an elementwise select, which runs much
  faster on CPU than the select-and-scatter of ``lax.reduce_window``.
  """
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet(nn.Module):
  """D2L's LeNet with an optional batch norm after each hidden layer.

  conv 6@5x5 -> BN -> sigmoid -> max-pool 2; conv 16@5x5 -> BN -> sigmoid ->
  max-pool 2; dense 120 -> BN -> sigmoid; dense 84 -> BN -> sigmoid; dense 10.
  Weights are Xavier-uniform, as ``d2l.train_ch6`` initializes them.

  Attributes:
    norm: ``'jaxbn'`` (`jaxbn.BatchNorm`), ``'flax'`` (`flax.linen.BatchNorm`)
      or ``'none'`` (chapter 6's plain LeNet, same layers without BN).
    momentum: decay of the running averages (D2L: 0.9).
    epsilon: added to the variance (D2L: 1e-5).
    num_classes: size of the output layer.
  """

  norm: str = 'jaxbn'
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (N, 28, 28, 1) images to (N, num_classes) logits.

    ``train`` selects batch statistics (and their update in the mutable
    ``batch_stats`` collection) or the running averages.
    """
    if self.norm not in NORMS:
      raise ValueError(f'norm={self.norm!r} is not one of {NORMS}.')
    kernel_init = nn.initializers.xavier_uniform()
    conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding='VALID', kernel_init=kernel_init)
    dense = functools.partial(nn.Dense, kernel_init=kernel_init)

    def norm(h):
      if self.norm == 'none':
        return h
      module = BatchNorm if self.norm == 'jaxbn' else nn.BatchNorm
      return module(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon)(h)

    x = max_pool_2x2(nn.sigmoid(norm(conv(6)(x))))
    x = max_pool_2x2(nn.sigmoid(norm(conv(16)(x))))
    x = x.reshape(x.shape[0], -1)
    x = nn.sigmoid(norm(dense(120)(x)))
    x = nn.sigmoid(norm(dense(84)(x)))
    return dense(self.num_classes)(x)


def create_model(name: str = 'lenet', **kwargs) -> nn.Module:
  """The model called ``name`` (only ``'lenet'`` for now) with its options."""
  models = {'lenet': LeNet}
  if name not in models:
    raise ValueError(f'model={name!r} is unknown: choose one of {sorted(models)}.')
  return models[name](**kwargs)


def first_norm_params(params) -> dict[str, jax.Array] | None:
  """gamma and beta of the first BN layer (as the chapter prints them), or None."""
  name = 'BatchNorm_0'
  if name not in params:
    return None
  return {'gamma': jnp.ravel(params[name]['scale']), 'beta': jnp.ravel(params[name]['bias'])}
