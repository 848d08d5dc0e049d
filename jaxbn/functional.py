"""Batch normalization as a pure function of arrays.

Conventions (shared by `jaxbn.BatchNorm`):

* **Feature axes** are given by ``axis`` (default ``-1``, the channel of NHWC
  and of (N, C) inputs). Statistics are taken per feature over *every other
  axis*: (N,) for dense inputs, (N, H, W) for convolutions, and likewise for any
  rank. Axes added by ``vmap`` are invisible here and are not reduced over,
  unless named by ``axis_name``.
* **Momentum** is the decay of the running average, as in Flax and D2L::

      running = momentum * running + (1 - momentum) * batch

  (PyTorch's ``momentum=0.1`` means the same as ``momentum=0.9`` here).
  ``momentum=None`` keeps an equal-weight cumulative average of all batches
  seen, as PyTorch does, which needs the number of batches already averaged
  (``count``).
* **Variance**: normalisation always divides by the biased batch variance
  ``mean((x - mean(x))**2)``. The running variance stores the same biased
  value (Flax, D2L) unless ``unbiased_running_var=True``, which stores
  ``n / (n - 1)`` times it (PyTorch), ``n`` being the number of values
  averaged per feature.
* **Precision**: statistics are reduced in at least float32, so bfloat16 or
  float16 inputs get float32 statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

Axes = int | Sequence[int]


class BatchNormOutput(NamedTuple):
  """What `batch_norm` returns: the output and the new running statistics."""

  y: jax.Array
  mean: jax.Array
  var: jax.Array


def canonicalize_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
  """Returns ``axis`` as a sorted tuple of non-negative axes of an ``ndim`` array.

  Raises:
    ValueError: if an axis is out of range for ``ndim`` or repeated.
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise ValueError(
        f'axis={axis!r} is out of range for an input of rank {ndim}: use '
        f'feature axes in [-{ndim}, {ndim - 1}] (-1 for NHWC and (N, C)).'
      )
  canonical = tuple(sorted(a % ndim for a in axes))
  if len(set(canonical)) != len(canonical):
    raise ValueError(f'axis={axis!r} names the same axis twice.')
  return canonical


def _check_inputs(x, feature_axes, named_stats, momentum, count):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f'batch_norm needs a real floating-point input, got dtype {x.dtype}: '
      'cast it first, e.g. x.astype(jnp.float32).'
    )
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  for name, value in named_stats.items():
    if value is not None and jnp.shape(value) != feature_shape:
      raise ValueError(
        f'{name} has shape {jnp.shape(value)} but the input {x.shape} with '
        f'feature axes {feature_axes} needs shape {feature_shape}: one value '
        'per feature.'
      )
  if momentum is None:
    if count is None:
      raise ValueError(
        'momentum=None (cumulative average) needs count, the number of '
        'batches already averaged into mean and var.'
      )
  elif isinstance(momentum, int | float) and not 0.0 <= momentum <= 1.0:
    raise ValueError(
      f'momentum={momentum} is outside [0, 1]: it is the decay of the '
      'running average (0.9 keeps 90% of the old value); PyTorch-style '
      'momentum m corresponds to 1 - m here.'
    )


def _mean(values, axes, mask, axis_name, axis_index_groups):
  """Means over ``axes`` (and the named axis) of each array, in one collective.

  With a mask, each mean is a sum over the selected entries divided by their
  count, both summed over devices: devices with fewer real examples weigh
  less, unlike a mean of per-device means.
  """
  if mask is None:
    means = jnp.stack([v.mean(axes) for v in values])
    if axis_name is not None:
      means = lax.pmean(means, axis_name, axis_index_groups=axis_index_groups)
    return tuple(means)
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), values[0].shape)
  count = mask.sum(axes, dtype=values[0].dtype)
  sums = jnp.stack([jnp.where(mask, v, 0).sum(axes) for v in values] + [count])
  if axis_name is not None:
    sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  *sums, count = sums
  return tuple(s / jnp.maximum(count, 1) for s in sums)


def _count(x, reduction_axes, mask, axis_name, axis_index_groups):
  """Number of values averaged per feature (for the unbiased variance)."""
  if mask is None:
    n = jnp.asarray(math.prod(x.shape[a] for a in reduction_axes), jnp.float32)
  else:
    n = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).sum(reduction_axes, dtype=jnp.float32)
  if axis_name is not None:
    n = lax.psum(n, axis_name, axis_index_groups=axis_index_groups)
  return n


def batch_statistics(
  x: jax.Array,
  reduction_axes: tuple[int, ...],
  *,
  use_fast_variance: bool = True,
  mask: ArrayLike | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-feature mean and biased variance of ``x`` over ``reduction_axes``.

  ``x`` should already be in the precision of the reduction (float32 or
  wider). Both formulas give a variance that is never negative:

  * ``use_fast_variance=True``: one pass and one collective, with shifted
    moments ``var = E[(x - k)^2] - E[x - k]^2`` where ``k`` is the first value
    of each feature (averaged over the named axis, so every device uses the
    same shift). Unlike the unshifted ``E[x^2] - E[x]^2`` it keeps its
    precision when the mean is large relative to the spread (flax issue
    1491); the result is clamped at 0 against round-off.
  * ``use_fast_variance=False``: two passes, ``var = E[(x - E[x])^2]``.

  Returns:
    ``(mean, var)``, each of the shape of the axes not reduced over.
  """
  reduce = lambda *vs: _mean(vs, reduction_axes, mask, axis_name, axis_index_groups)
  if use_fast_variance:
    first = tuple(slice(0, 1) if a in reduction_axes else slice(None) for a in range(x.ndim))
    shift = lax.stop_gradient(x[first])
    if axis_name is not None:
      shift = lax.pmean(shift, axis_name, axis_index_groups=axis_index_groups)
    mean_shifted, mean_sq = reduce(x - shift, lax.square(x - shift))
    var = jnp.maximum(mean_sq - lax.square(mean_shifted), 0.0)
    mean = mean_shifted + jnp.squeeze(shift, reduction_axes)
  else:
    (mean,) = reduce(x)
    (var,) = reduce(lax.square(x - jnp.expand_dims(mean, reduction_axes)))
  return mean, var


def batch_norm(
  x: ArrayLike,
  scale: ArrayLike | None,
  bias: ArrayLike | None,
  mean: ArrayLike,
  var: ArrayLike,
  *,
  use_running_average: bool,
  axis: Axes = -1,
  momentum: float | None = 0.9,
  epsilon: float = 1e-5,
  count: ArrayLike | None = None,
  unbiased_running_var: bool = False,
  use_fast_variance: bool = True,
  force_float32_reductions: bool = True,
  mask: ArrayLike | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  dtype: DTypeLike | None = None,
) -> BatchNormOutput:
  r"""Batch normalization (Ioffe & Szegedy, 2015) of ``x`` along ``axis``.

  .. math::
    y = \mathrm{scale} \cdot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}
        + \mathrm{bias}

  In training mode (``use_running_average=False``) :math:`\mu, \sigma^2` are
  the per-feature mean and biased variance of this batch, and the running
  statistics are updated as ``momentum * running + (1 - momentum) * batch``.
  In inference mode they are ``mean`` and ``var``, returned unchanged.

  Args:
    x: input of any rank, e.g. (N, C) or (N, H, W, C); real floating dtype.
    scale: per-feature gamma of shape ``F`` (the sizes of the feature axes),
      or None for no scaling.
    bias: per-feature beta of shape ``F``, or None for no offset.
    mean: running mean, shape ``F``.
    var: running variance, shape ``F`` (biased unless ``unbiased_running_var``).
    use_running_average: inference mode if True, training mode if False.
    axis: the feature axis or axes; every other axis is reduced over.
    momentum: decay of the running average in [0, 1], or None for the
      cumulative average ``running + (batch - running) / (count + 1)``.
    epsilon: added to the variance before the square root.
    count: with ``momentum=None``, the number of batches already averaged into
      ``mean`` and ``var``; the caller increments it after a training step.
    unbiased_running_var: store ``n / (n - 1)`` times the batch variance in
      the running variance, as PyTorch does (``n`` values per feature).
    use_fast_variance: one-pass shifted moments (True) or two passes (False);
      see `batch_statistics`. Both are accurate and never negative.
    force_float32_reductions: compute statistics in at least float32.
    mask: boolean array broadcastable to ``x``; only True entries enter the
      statistics (also across devices, weighted by their counts).
    axis_name: named axis (``shard_map``, ``pmap``, ``vmap``) to average the
      statistics over, for synchronized batch norm.
    axis_index_groups: subgroups of ``axis_name`` to average over separately.
    dtype: output dtype; by default that of ``x``, ``scale`` and ``bias``
      promoted together.

  Returns:
    ``BatchNormOutput(y, mean, var)``: ``y`` of the shape of ``x``, and the
    new running mean and variance of shape ``F`` (float32 by default).

  Raises:
    TypeError: if ``x`` is not floating point.
    ValueError: if an axis is out of range, a statistic or parameter is not of
      shape ``F``, ``momentum`` is outside [0, 1], ``count`` is missing for
      ``momentum=None``, or training-mode statistics would average a single
      value per feature (e.g. a batch of one dense example): the output would
      then be ``bias`` alone and the layer would learn nothing.

  Example:
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, mean, var = batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3),
    ...                           use_running_average=False)
    >>> mean
    Array([0.45, 0.55, 0.65], dtype=float32)
  """
  x = jnp.asarray(x)
  feature_axes = canonicalize_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  _check_inputs(
    x,
    feature_axes,
    dict(scale=scale, bias=bias, mean=mean, var=var),
    momentum,
    count,
  )
  stats_dtype = jnp.result_type(x, jnp.float32) if force_float32_reductions else x.dtype
  if dtype is None:
    dtype = jnp.result_type(*(v for v in (x, scale, bias) if v is not None))
  mean = jnp.asarray(mean)
  var = jnp.asarray(var)

  if use_running_average:
    batch_mean, batch_var = mean, var
    new_mean, new_var = mean, var
  else:
    values_per_feature = math.prod(x.shape[a] for a in reduction_axes)
    if values_per_feature == 1 and axis_name is None:
      raise ValueError(
        f'Training-mode batch norm of an input of shape {x.shape} with '
        f'feature axes {feature_axes} averages a single value per feature: '
        'the output would be the bias alone and nothing would be learned. '
        'Use a batch of at least 2 examples, or use_running_average=True.'
      )
    xs = x.astype(stats_dtype)
    batch_mean, batch_var = batch_statistics(
      xs,
      reduction_axes,
      use_fast_variance=use_fast_variance,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
    )
    stored_var = batch_var
    if unbiased_running_var:
      n = _count(x, reduction_axes, mask, axis_name, axis_index_groups)
      stored_var = batch_var * n / jnp.maximum(n - 1, 1)
    if momentum is None:
      weight = 1.0 / (jnp.asarray(count, jnp.float32) + 1.0)
      new_mean = mean + weight * (batch_mean - mean)
      new_var = var + weight * (stored_var - var)
    else:
      new_mean = momentum * mean + (1.0 - momentum) * batch_mean
      new_var = momentum * var + (1.0 - momentum) * stored_var

  shape = [1] * x.ndim
  for a in feature_axes:
    shape[a] = x.shape[a]
  multiplier = lax.rsqrt(batch_var + epsilon)
  if scale is not None:
    multiplier = multiplier * jnp.asarray(scale)
  y = (x - batch_mean.reshape(shape)) * multiplier.reshape(shape)
  if bias is not None:
    y = y + jnp.asarray(bias).reshape(shape)
  return BatchNormOutput(y.astype(dtype), new_mean, new_var)
