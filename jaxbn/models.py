"""LeNet-5 with batch normalization, as D2L's batch-norm chapter draws it."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxbn import kernels
from jaxbn.linen import BatchNorm

ModuleDef = Any
CONV_IMPLS = ('auto', 'standard', 'banded')
NORMS = ('jaxbn', 'flax', 'none')


def norm_layer(kind: str, **options) -> ModuleDef | None:
  """The BN layer ``kind`` with ``options`` bound, for `LeNet`'s ``norm``.

  ``'jaxbn'``: `jaxbn.BatchNorm`; ``'flax'``: `flax.linen.BatchNorm`;
  ``'none'``: None (no BN layers).
  """
  layers = {'jaxbn': BatchNorm, 'flax': nn.BatchNorm, 'none': None}
  if kind not in layers:
    raise ValueError(f'norm={kind!r} is not one of {NORMS}.')
  return None if layers[kind] is None else functools.partial(layers[kind], **options)


def resolve_conv_impl(conv_impl: str) -> str:
  """``'standard'`` or ``'banded'``; ``'auto'`` is banded on CPU, standard elsewhere."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r} is not one of {CONV_IMPLS}.')
  if conv_impl == 'auto':
    return 'banded' if jax.default_backend() == 'cpu' else 'standard'
  return conv_impl


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class LeNet(nn.Module):
  """D2L's LeNet with a batch norm after each hidden layer.

  conv1 6@5x5 -> bn1 -> sigmoid -> max-pool 2; conv2 16@5x5 -> bn2 -> sigmoid
  -> max-pool 2; fc1 120 -> bn3 -> sigmoid; fc2 84 -> bn4 -> sigmoid; fc3 10.
  Weights are Xavier-uniform, as ``d2l.train_ch6`` initializes them.

  Attributes:
    norm: the BN layer, called as ``norm(use_running_average=not train,
      name='bn1')``, e.g. ``functools.partial(jaxbn.BatchNorm, momentum=0.9)``
      (the default: D2L's momentum and epsilon) or ``flax.linen.BatchNorm``;
      None leaves them out (chapter 6's LeNet). See `norm_layer`.
    conv_impl: ``'standard'`` (``nn.Conv``, ``nn.max_pool``), ``'banded'``
      (their XLA:CPU forms, `jaxbn.kernels`) or ``'auto'`` (banded on CPU).
    num_classes: size of the output layer.
    dtype: the layers' computation dtype, e.g. ``jnp.bfloat16`` (None: that of
      the inputs and parameters). Parameters, BN statistics and the logits stay
      in at least float32.
  """

  norm: ModuleDef | None = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  conv_impl: str = 'auto'
  num_classes: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Maps (N, 28, 28, 1) images to (N, num_classes) logits.

    ``train`` selects batch statistics (and their update in the mutable
    ``batch_stats`` collection) or the running averages. ``mask`` (N,) bool
    marks the real examples of a padded batch: only they enter the batch
    statistics.
    """
    xavier = nn.initializers.xavier_uniform()
    banded = resolve_conv_impl(self.conv_impl) == 'banded'
    conv = functools.partial(
      nn.Conv,
      kernel_size=(5, 5),
      padding='VALID',
      kernel_init=xavier,
      dtype=self.dtype,
      conv_general_dilated=kernels.banded_conv_general_dilated if banded else None,
    )
    pool = kernels.max_pool_2x2 if banded else _max_pool
    dense = functools.partial(nn.Dense, kernel_init=xavier, dtype=self.dtype)

    def bn(h, name):
      if self.norm is None:
        return h
      m = None if mask is None else mask.reshape(-1, *[1] * (h.ndim - 1))
      layer = self.norm(use_running_average=not train, dtype=self.dtype, name=name)
      return layer(h, mask=m)

    x = pool(nn.sigmoid(bn(conv(6, name='conv1')(x), 'bn1')))
    x = pool(nn.sigmoid(bn(conv(16, name='conv2')(x), 'bn2')))
    x = x.reshape(x.shape[0], -1)
    x = nn.sigmoid(bn(dense(120, name='fc1')(x), 'bn3'))
    x = nn.sigmoid(bn(dense(84, name='fc2')(x), 'bn4'))
    logits = dense(self.num_classes, name='fc3')(x)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def first_norm_params(params) -> dict[str, jax.Array] | None:
  """gamma and beta of the first BN layer (as the chapter prints them), or None."""
  if 'bn1' not in params:
    return None
  return {'gamma': params['bn1']['scale'], 'beta': params['bn1']['bias']}
