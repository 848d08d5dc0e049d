"""LeNet's BN layers changed as the experiments ask: in some layers only, with noise, frozen.

Each function returns a ``norm`` for `d2l_lenet.models.LeNet`: a callable that
the model calls as ``norm(use_running_average=..., dtype=..., name='bn1')``
and whose result it calls as ``layer(h, mask=m)``. All use D2L's momentum and
epsilon (`CHAPTER_BN`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import flax.linen as nn
import jax

from jaxbn.linen import BatchNorm

CHAPTER_BN = {'momentum': 0.9, 'epsilon': 1e-5}
LENET_BNS = ('bn1', 'bn2', 'bn3', 'bn4')
# LeNet's layers from the input up, each with the BN layer that follows it.
LENET_LAYERS = (('conv1', 'bn1'), ('conv2', 'bn2'), ('fc1', 'bn3'), ('fc2', 'bn4'), ('fc3',))


class Identity(nn.Module):
  """Leaves its input as it is: a LeNet BN slot left empty."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    return x


def bn_at(layers: Collection[str], **options: Any) -> Callable[..., nn.Module]:
  """BN (`jaxbn.BatchNorm`) in the slots named in ``layers`` (of `LENET_BNS`), none elsewhere.

  ``options`` go to each BN layer, e.g. ``use_scale=False, use_bias=False``
  for gamma fixed at 1 and beta at 0.
  """
  unknown = set(layers) - set(LENET_BNS)
  if unknown:
    raise ValueError(f'bn_at: {sorted(unknown)} are not LeNet BN layers {LENET_BNS}.')
  options = {**CHAPTER_BN, **options}

  def norm(*, name: str, use_running_average: bool, dtype: Any = None) -> nn.Module:
    if name not in layers:
      return Identity(name=name)
    return BatchNorm(use_running_average=use_running_average, dtype=dtype, name=name, **options)

  return norm


class NoisyBatchNorm(nn.Module):
  """BN followed, in training, by a random per-channel affine map drawn anew at each step.

  Santurkar et al.'s "noisy BatchNorm": the normalised activations ``z`` leave
  as ``y = s * z + m``, with ``m ~ U(-max_shift, max_shift)`` and
  ``s ~ U(1, max_scale)`` drawn per channel from the ``'noise'`` rng stream at
  every call in training mode. The next layer's inputs thus have a mean
  that is not zero and a variance that is not one, and both move from step to
  step: the "covariate shift" that BN is said to remove, put back after it.
  Inference (running averages) applies the map's expectation, ``E[s] z + E[m]
  = (1 + max_scale) / 2 * z``.
  """

  use_running_average: bool = False
  max_shift: float = 1.0
  max_scale: float = 2.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    z = BatchNorm(use_running_average=self.use_running_average, dtype=self.dtype, **CHAPTER_BN)(
      x, mask=mask
    )
    if self.use_running_average:
      # The map's expectation, E[s] z + E[m], as dropout scales by its keep rate.
      return (z * ((1.0 + self.max_scale) / 2)).astype(z.dtype)
    shift_key, scale_key = jax.random.split(self.make_rng('noise'))
    shape = (1,) * (x.ndim - 1) + x.shape[-1:]  # per channel, the same for every example
    shift = jax.random.uniform(shift_key, shape, minval=-self.max_shift, maxval=self.max_shift)
    scale = jax.random.uniform(scale_key, shape, minval=1.0, maxval=self.max_scale)
    return (scale * z + shift).astype(z.dtype)


def noisy_bn(max_shift: float = 1.0, max_scale: float = 2.0) -> Callable[..., nn.Module]:
  """`NoisyBatchNorm` in every slot, as a ``norm`` for LeNet."""
  return functools.partial(NoisyBatchNorm, max_shift=max_shift, max_scale=max_scale)


def present(params: dict[str, Any], layers=LENET_LAYERS) -> tuple[tuple[str, ...], ...]:
  """``layers`` with the names that ``params`` lacks left out (e.g. LeNet without BN)."""
  return tuple(tuple(name for name in group if name in params) for group in layers)


def fixed_affine_bn() -> Callable[..., nn.Module]:
  """BN everywhere with gamma fixed at 1 and beta at 0 (no scale or offset to learn)."""
  return bn_at(LENET_BNS, use_scale=False, use_bias=False)
