"""LeNet-5 with batch normalization, as D2L's batch-norm chapter draws it, in linen and NNX.

`LeNet` (Flax linen) and `NNXLeNet` (Flax NNX) are the same model: the same
layers with the same names (conv1, bn1, ..., fc3), shapes and initialisation,
so their variables, as nested dicts, are interchangeable.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from d2l_lenet import kernels
from jaxbn import nnx as jnnx
from jaxbn.linen import BatchNorm

ModuleDef = Any
CONV_IMPLS = ('auto', 'standard', 'banded')
NORMS = ('jaxbn', 'flax', 'none')
APIS = ('linen', 'nnx')
_NORM_LAYERS = {
  'linen': {'jaxbn': BatchNorm, 'flax': nn.BatchNorm},
  'nnx': {'jaxbn': jnnx.BatchNorm, 'flax': nnx.BatchNorm},
}


def norm_layer(kind: str, api: str = 'linen', **options) -> ModuleDef | None:
  """The BN layer ``kind`` of ``api`` with ``options`` bound, for the models' ``norm``.

  ``'jaxbn'``: `jaxbn.BatchNorm` (linen) or `jaxbn.nnx.BatchNorm`; ``'flax'``:
  ``flax.linen.BatchNorm`` or ``flax.nnx.BatchNorm``; ``'none'``: None (no BN
  layers).
  """
  if kind not in NORMS:
    raise ValueError(f'norm={kind!r} is not one of {NORMS}.')
  if kind == 'none':
    return None
  return functools.partial(_NORM_LAYERS[api][kind], **options)


def resolve_conv_impl(conv_impl: str) -> str:
  """``'standard'`` or ``'banded'``; ``'auto'`` is banded on CPU, standard elsewhere."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl={conv_impl!r} is not one of {CONV_IMPLS}.')
  if conv_impl == 'auto':
    return 'banded' if jax.default_backend() == 'cpu' else 'standard'
  return conv_impl


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _conv_and_pool(conv_impl: str, api: str) -> tuple[Any, Any]:
  """The convolution layer of ``api`` (Flax's or its banded form) and the max-pool."""
  if resolve_conv_impl(conv_impl) == 'banded':
    conv = {'linen': kernels.BandedConv, 'nnx': kernels.NNXBandedConv}[api]
    return conv, kernels.max_pool_2x2
  return {'linen': nn.Conv, 'nnx': nnx.Conv}[api], _max_pool


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
      (their XLA:CPU forms, `d2l_lenet.kernels.BandedConv` and
      `d2l_lenet.kernels.max_pool_2x2`) or ``'auto'`` (banded on CPU).
    num_classes: size of the output layer.
    dtype: the layers' computation dtype, e.g. ``jnp.bfloat16`` (None: that of
      the inputs and parameters). Parameters, BN statistics and the logits stay
      in at least float32.
    dropout_rate: dropout after fc1's and fc2's sigmoids in training (D2L's
      place for it; it needs the ``'dropout'`` rng stream when not 0).
  """

  norm: ModuleDef | None = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  conv_impl: str = 'auto'
  num_classes: int = 10
  dtype: Any = None
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Maps (N, 28, 28, 1) images to (N, num_classes) logits.

    ``train`` selects batch statistics (and their update in the mutable
    ``batch_stats`` collection) or the running averages. ``mask`` (N,) bool
    marks the real examples of a padded batch: only they enter the batch
    statistics.
    """
    xavier = nn.initializers.xavier_uniform()
    conv_layer, pool = _conv_and_pool(self.conv_impl, 'linen')
    conv = functools.partial(
      conv_layer, kernel_size=(5, 5), padding='VALID', kernel_init=xavier, dtype=self.dtype
    )
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
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    x = dropout(nn.sigmoid(bn(dense(120, name='fc1')(x), 'bn3')))
    x = dropout(nn.sigmoid(bn(dense(84, name='fc2')(x), 'bn4')))
    logits = dense(self.num_classes, name='fc3')(x)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


# The chapter's BN layer for NNXLeNet: D2L's momentum and epsilon.
D2L_NNX_NORM = functools.partial(jnnx.BatchNorm, momentum=0.9, epsilon=1e-5)


class NNXLeNet(nnx.Module):
  """`LeNet` as a Flax NNX module: the same layers, names and initialisation.

  Train with ``model.train()`` (batch statistics, running averages updated in
  place), evaluate with ``model.eval()``.

  Args:
    norm: the BN layer, called as ``norm(num_features, rngs=rngs)``, e.g.
      ``functools.partial(jaxbn.nnx.BatchNorm, momentum=0.9)`` or
      ``flax.nnx.BatchNorm``; None leaves them out. See `norm_layer`.
    conv_impl: as `LeNet`'s.
    num_classes: size of the output layer.
    dtype: as `LeNet`'s.
    rngs: the random numbers of the initialisation.
  """

  def __init__(
    self,
    norm: ModuleDef | None = D2L_NNX_NORM,
    *,
    conv_impl: str = 'auto',
    num_classes: int = 10,
    dtype: Any = None,
    rngs: nnx.Rngs,
  ):
    xavier = nn.initializers.xavier_uniform()
    conv_layer, self.pool = _conv_and_pool(conv_impl, 'nnx')
    conv = functools.partial(
      conv_layer, kernel_size=(5, 5), padding='VALID', kernel_init=xavier, dtype=dtype, rngs=rngs
    )
    dense = functools.partial(nnx.Linear, kernel_init=xavier, dtype=dtype, rngs=rngs)
    bn = lambda n: None if norm is None else norm(n, dtype=dtype, rngs=rngs)
    self.conv1, self.bn1 = conv(1, 6), bn(6)
    self.conv2, self.bn2 = conv(6, 16), bn(16)
    self.fc1, self.bn3 = dense(16 * 4 * 4, 120), bn(120)
    self.fc2, self.bn4 = dense(120, 84), bn(84)
    self.fc3 = dense(84, num_classes)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Maps (N, 28, 28, 1) images to (N, num_classes) logits; ``mask`` as `LeNet`'s."""

    def bn(layer, h):
      if layer is None:
        return h
      return layer(h, mask=None if mask is None else mask.reshape(-1, *[1] * (h.ndim - 1)))

    x = self.pool(nnx.sigmoid(bn(self.bn1, self.conv1(x))))
    x = self.pool(nnx.sigmoid(bn(self.bn2, self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.sigmoid(bn(self.bn3, self.fc1(x)))
    x = nnx.sigmoid(bn(self.bn4, self.fc2(x)))
    logits = self.fc3(x)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def first_norm_params(params) -> dict[str, jax.Array] | None:
  """gamma and beta of the first BN layer (as the chapter prints them), or None."""
  if 'bn1' not in params:
    return None
  return {'gamma': params['bn1']['scale'], 'beta': params['bn1']['bias']}
