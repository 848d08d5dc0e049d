"""Folding inference-mode batch norm into the preceding convolution or dense layer.

In inference mode, ``BN(W x + b)`` with running ``mean, var`` and parameters
``scale, bias`` is the affine map ``W' x + b'`` with, per output feature,
``m = scale / sqrt(var + eps)``, ``W' = W * m`` and ``b' = (b - mean) * m + bias``.
A model without BN layers then computes the same outputs with fewer operations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# (layer, the BN layer that follows it) in jaxbn.models.LeNet.
LENET_PAIRS = (
  ('conv1', 'bn1'),
  ('conv2', 'bn2'),
  ('fc1', 'bn3'),
  ('fc2', 'bn4'),
)


def fold_into_linear(
  kernel: jax.Array,
  bias: jax.Array | None,
  bn_params: Mapping[str, jax.Array],
  bn_stats: Mapping[str, jax.Array],
  epsilon: float,
) -> tuple[jax.Array, jax.Array]:
  """Kernel and bias of a layer equal to ``layer -> BN`` in inference mode.

  Args:
    kernel: (..., F) weights with output features last (Flax's Dense (I, F)
      and Conv (H, W, I, F)).
    bias: (F,) bias of the layer, or None.
    bn_params: the BN layer's ``params`` (``scale`` and/or ``bias``, (F,)).
    bn_stats: its ``batch_stats`` (``mean`` and ``var``, (F,)).
    epsilon: the BN layer's epsilon.

  Returns:
    ``(kernel, bias)`` of the folded layer, in float32 or wider.
  """
  multiplier = lax.rsqrt(bn_stats['var'] + epsilon)
  if 'scale' in bn_params:
    multiplier = multiplier * bn_params['scale']
  bias = jnp.zeros_like(bn_stats['mean']) if bias is None else bias
  folded_bias = (bias - bn_stats['mean']) * multiplier
  if 'bias' in bn_params:
    folded_bias = folded_bias + bn_params['bias']
  return kernel * multiplier.reshape((1,) * (kernel.ndim - 1) + (-1,)), folded_bias


def fold_batch_norms(
  params: Mapping,
  batch_stats: Mapping,
  pairs: Sequence[tuple[str, str]] = LENET_PAIRS,
  epsilon: float = 1e-5,
) -> dict:
  """Params of the same model without its BN layers (e.g. LeNet(norm=None)).

  Each ``(layer, bn)`` pair names a top-level layer and the BN layer applied
  to its output; the BN layers' params disappear and the layers get folded
  kernels and biases. Other params are copied.
  """
  folded = {k: v for k, v in params.items() if k not in {bn for _, bn in pairs}}
  for layer, bn in pairs:
    kernel, bias = fold_into_linear(
      params[layer]['kernel'], params[layer].get('bias'), params[bn], batch_stats[bn], epsilon
    )
    folded[layer] = {**params[layer], 'kernel': kernel, 'bias': bias}
  return folded
