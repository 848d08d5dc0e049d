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
* **One value per feature** (training mode on a batch of one dense example,
  a (1, 1, 1, C) feature map, or virtual batches of one such example) is
  computed as Flax computes it: the batch mean is the value itself and the
  batch variance 0, so ``y = bias`` exactly and the running mean and variance
  move toward the value and toward 0. A `SingleValueWarning` says so when
  the call is traced, as nothing is learned from such a batch. With
  ``unbiased_running_var=True`` the running variance is left as it is
  instead: one value has no unbiased variance (``n / (n - 1)`` with
  ``n = 1``), and 0 would make later inference divide by ``sqrt(epsilon)``.
* **Derivatives** in training mode are batch norm's closed form, through the
  batch statistics and in forward and reverse mode to any order; none flows
  to the running statistics except through the momentum update.

`batch_norm` composes pieces that can be used and tested on their own:
`jaxbn.statistics` (masked, cross-device batch statistics), `jaxbn._ghost`
(virtual batches), `jaxbn._normalize` (the normalization and its derivative),
`jaxbn._renorm` (batch renormalization) and `jaxbn._running` (running averages).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from jaxbn._ghost import mean_over_groups, num_groups, split_batch, with_group_axis
from jaxbn._normalize import affine, normalize
from jaxbn._running import cumulative_update, ema_update, unbiased_variance
from jaxbn.statistics import Axes, canonicalize_axes, value_count

# The options of `batch_norm` that jaxbn.BatchNorm and jaxbn.nnx.BatchNorm hold
# as attributes of the same names.
LAYER_OPTIONS = (
  'axis',
  'momentum',
  'epsilon',
  'unbiased_running_var',
  'use_fast_variance',
  'force_float32_reductions',
  'axis_name',
  'axis_index_groups',
  'dtype',
  'virtual_batch_size',
)


def layer_options(layer: Any) -> dict[str, Any]:
  """The `batch_norm` keyword arguments that ``layer`` holds as attributes (`LAYER_OPTIONS`)."""
  return {name: getattr(layer, name) for name in LAYER_OPTIONS}


class BatchNormOutput(NamedTuple):
  """What `batch_norm` returns: the output and the new running statistics."""

  y: jax.Array
  mean: jax.Array
  var: jax.Array


def _check_inputs(x, feature_axes, named_stats, momentum, count, renorm_clip):
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise TypeError(
      f'batch_norm needs a floating-point (or complex) input, got dtype {x.dtype}: '
      'cast it first, e.g. x.astype(jnp.float32).'
    )
  if renorm_clip is not None and jnp.iscomplexobj(x):
    raise TypeError(
      f'Batch renormalization (renorm_clip) clips real values; the input is {x.dtype}. '
      'Use renorm_clip=None for complex inputs.'
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


class SingleValueWarning(UserWarning):
  """Training-mode batch norm averaged a single value per feature, e.g. a batch of one.

  Emitted by `jaxbn.batch_norm` and the layers while they are traced: once
  per call of a layer in a trace, not at every step of a jitted function.
  The message names the layer (its path in a linen model; its class and
  size in NNX) and the input's shape, so that Python's default filter shows
  each layer's once. The output is then ``bias`` alone, as in Flax, and
  nothing is learned from the batch. Filter exactly this warning with
  ``warnings.filterwarnings('ignore', category=jaxbn.SingleValueWarning)``
  or ``-W ignore::jaxbn.SingleValueWarning``.
  """


def _static_axis_size(axis_name: Any, axis_index_groups: Any) -> int | None:
  """The number of devices (or vmapped examples) that ``axis_name`` averages over, if static."""
  if axis_name is None:
    return 1
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  try:
    size = lax.axis_size(axis_name)
  except (NameError, TypeError):  # an unbound name fails later, with JAX's own message
    return None
  return size if isinstance(size, int) else None


def _single_value(xg, group_axes, axis_name, axis_index_groups) -> bool:
  """Whether training-mode statistics average one value per feature (without a mask)."""
  devices = _static_axis_size(axis_name, axis_index_groups)
  return devices is not None and math.prod(xg.shape[a] for a in group_axes) * devices == 1


def _warn_single_value(shape, feature_axes, groups, name):
  warnings.warn(
    f'{name or "jaxbn.batch_norm"} in training mode normalises an input of shape '
    f'{shape} (feature axes {feature_axes}) with a single value per feature'
    f'{" in each virtual batch" if groups > 1 else ""}: its output is the bias alone '
    'and nothing is learned from it. Use a larger batch, or use_running_average=True.',
    SingleValueWarning,
    stacklevel=3,
  )


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
  virtual_batch_size: int | None = None,
  renorm_clip: tuple[ArrayLike, ArrayLike] | None = None,
  name: str | None = None,
  warn_single_value: bool = True,
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
    x: input of any rank, e.g. (N, C) or (N, H, W, C); floating or complex
      (complex mean, real variance ``E|x - mean|^2``, as in Flax).
    scale: per-feature gamma of shape ``F`` (the sizes of the feature axes),
      or None for no scaling.
    bias: per-feature beta of shape ``F``, or None for no offset.
    mean: running mean, shape ``F``.
    var: running variance, shape ``F`` (biased unless ``unbiased_running_var``).
    use_running_average: inference mode if True, training mode if False.
    axis: the feature axis or axes; every other axis is reduced over.
    momentum: decay of the running average in [0, 1] (`jaxbn.ema_update`), or
      None for the cumulative average ``running + (batch - running) / (count +
      1)`` (`jaxbn.cumulative_update`).
    epsilon: added to the variance before the square root.
    count: with ``momentum=None``, the number of batches already averaged into
      ``mean`` and ``var``; the caller increments it after a training step.
    unbiased_running_var: store ``n / (n - 1)`` times the batch variance in
      the running variance, as PyTorch does (``n`` values per feature;
      `jaxbn.unbiased_variance`). A feature of a single value (``n = 1``:
      a batch, virtual batch or mask of one value) leaves the running
      variance unchanged, its mean still being averaged in.
    use_fast_variance: one pass with moments shifted by the running mean
      ``mean`` (True) or two passes (False); see `batch_statistics`. Both are
      accurate and never negative.
    force_float32_reductions: compute statistics in at least float32.
    mask: boolean array broadcastable to ``x``; only True entries enter the
      statistics (also across devices, weighted by their counts).
    axis_name: named axis (``shard_map``, ``pmap``, ``vmap``) to average the
      statistics over, for synchronized batch norm.
    axis_index_groups: subgroups of ``axis_name`` to average over separately.
    dtype: output dtype; by default that of ``x``, ``scale`` and ``bias``
      promoted together.
    virtual_batch_size: ghost batch norm (Hoffer et al., 2017): in training,
      each run of this many consecutive examples along axis 0 is normalised
      with its own statistics; the running averages are updated with the mean
      of the groups' statistics. Must divide the batch.
    renorm_clip: ``(rmax, dmax)`` for batch renormalization (Ioffe, 2017): in
      training, ``y = scale * ((x - mu_B) / sigma_B * r + d) + bias`` with
      ``r = clip(sigma_B / sigma, 1/rmax, rmax)``, ``d = clip((mu_B - mu) /
      sigma, -dmax, dmax)``, ``mu, sigma`` from the running averages and no
      gradient through ``r, d`` (`jaxbn.renorm_correction`). ``(1, 0)`` is
      plain batch norm; the values may be traced (see `renorm_schedule`).
    name: the layer, as the `SingleValueWarning` names it (the layers pass
      their class and path); None names ``jaxbn.batch_norm``. The warning
      names the input's shape too.
    warn_single_value: whether training-mode statistics of a single value
      per feature (known from the shapes and ``axis_name``'s size, not from
      a mask) emit a `SingleValueWarning`; `jaxbn.BatchNorm` turns it off
      during ``init``, which learns nothing from its example.

  Returns:
    ``BatchNormOutput(y, mean, var)``: ``y`` of the shape of ``x``, and the
    new running mean and variance of shape ``F`` (float32 by default).

  Raises:
    TypeError: if ``x`` is neither floating point nor complex, or complex with
      ``renorm_clip``.
    ValueError: if an axis is out of range, a statistic or parameter is not of
      shape ``F``, ``momentum`` is outside [0, 1], or ``count`` is missing for
      ``momentum=None``.

  Warns:
    SingleValueWarning: in training mode, when the statistics average a
      single value per feature (see the conventions above).

  Example:
    >>> x = jnp.arange(12.0).reshape(4, 3)  # a batch of 4, 3 features
    >>> y, mean, var = batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3),
    ...                           use_running_average=False, momentum=0.5)
    >>> mean  # 0.5 * 0 + 0.5 * [4.5, 5.5, 6.5]
    Array([2.25, 2.75, 3.25], dtype=float32)
    >>> var  # 0.5 * 1 + 0.5 * 11.25
    Array([6.125, 6.125, 6.125], dtype=float32)
  """
  x = jnp.asarray(x)
  feature_axes = canonicalize_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  stats = dict(scale=scale, bias=bias, mean=mean, var=var)
  _check_inputs(x, feature_axes, stats, momentum, count, renorm_clip)
  stats_dtype = jnp.result_type(x, jnp.float32) if force_float32_reductions else x.dtype
  if dtype is None:
    dtype = jnp.result_type(*(v for v in (x, scale, bias) if v is not None))
  mean, var = jnp.asarray(mean), jnp.asarray(var)

  if use_running_average:
    y = affine(x, mean, lax.rsqrt(var + epsilon), reduction_axes, scale, bias)
    return BatchNormOutput(y.astype(dtype), mean, var)

  # Ghost batch norm: statistics per group of examples, with a leading group
  # axis (none without virtual batches).
  groups = num_groups(x.shape[0], feature_axes, virtual_batch_size)
  xg, group_axes = split_batch(x, reduction_axes, groups)
  single = mask is None and _single_value(xg, group_axes, axis_name, axis_index_groups)
  if single and warn_single_value:
    _warn_single_value(x.shape, feature_axes, groups, name)
  if mask is not None:
    mask, _ = split_batch(
      jnp.broadcast_to(jnp.asarray(mask, bool), x.shape), reduction_axes, groups
    )
  y, batch_mean, batch_var = normalize(
    xg.astype(stats_dtype),
    *(with_group_axis(v, groups) for v in (scale, bias, mean, var)),
    epsilon,
    axes=group_axes,
    mask=mask,
    renorm_clip=renorm_clip,
    # One value is its own mean, exactly (and y exactly bias, as in Flax); the
    # fast variance would round it through the shift by the running mean.
    use_fast_variance=use_fast_variance and not single,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  )
  if unbiased_running_var:
    n = value_count(xg, group_axes, mask, axis_name, axis_index_groups)
    # One value has no unbiased variance (n - 1 = 0): such a batch (or virtual
    # batch, or masked feature) leaves the running variance as it is.
    carried = with_group_axis(var, groups)
    batch_var = jnp.where(n == 1, carried, unbiased_variance(batch_var, n))
  batch_stats = mean_over_groups((batch_mean, batch_var), groups)
  if momentum is None:
    new_mean, new_var = cumulative_update((mean, var), batch_stats, count)
  else:
    new_mean, new_var = ema_update((mean, var), batch_stats, momentum)
  return BatchNormOutput(y.reshape(x.shape).astype(dtype), new_mean, new_var)
