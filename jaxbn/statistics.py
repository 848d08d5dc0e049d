"""Per-feature batch statistics: axes, masked means and counts, mean and variance.

The reductions behind `jaxbn.batch_norm`, usable on their own: statistics
are taken over ``reduction_axes`` (every axis but the features), over the
entries a boolean ``mask`` selects, and across devices with ``axis_name``.
The variance is the biased one, ``mean(|x - mean(x)|**2)``; see
`jaxbn.unbiased_variance` for ``n / (n - 1)`` times it. Complex inputs have a
complex mean and a real variance, as in Flax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

Axes = int | Sequence[int]


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


def abs_square(x: jax.Array) -> jax.Array:
  """``|x|**2``, real: ``x**2`` for real ``x``, ``re**2 + im**2`` for complex."""
  if jnp.iscomplexobj(x):
    return lax.square(x.real) + lax.square(x.imag)
  return lax.square(x)


# XLA:CPU sums an (R, C) array over R several times faster when its rows hold
# at least this many values, which a short feature axis C (LeNet's 6 and 16
# channels) does not.
_ROW_WIDTH = 64


def _rows_per_line(shape: Sequence[int], axes: tuple[int, ...]) -> int:
  """The k of `feature_sum`: a power of 2, 1 to sum ``shape`` over ``axes`` as it is."""
  if len(shape) < 2 or axes != tuple(range(len(shape) - 1)):
    return 1
  k = 1
  while k * shape[-1] < _ROW_WIDTH:
    k *= 2
  return k if math.prod(shape[:-1]) % k == 0 else 1


def feature_sum(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``v.sum(axes)``, faster on XLA:CPU when the axes are all but the last and it is short.

  (N, ..., C) is summed as (R / k, k * C) rows over R / k, then the k
  partial sums of each feature, with k * C >= 64 (`_rows_per_line`): the
  same sum in another order, within an ulp or two of the sum as XLA's is
  (tests/test_functional.py, large means).
  """
  k = _rows_per_line(v.shape, axes)
  if k == 1:
    return v.sum(axes)
  return v.reshape(-1, k * v.shape[-1]).sum(0).reshape(k, -1).sum(0)


def broadcast_features(v: jax.Array, shape: Sequence[int], axes: tuple[int, ...]) -> jax.Array:
  """``v`` (of the axes of ``shape`` not in ``axes``) broadcast along ``axes`` to ``shape``.

  Written so that its transpose, in reverse mode, sums the cotangent in
  `feature_sum`'s fast layout (its k partial sums in sequence).
  """
  k = _rows_per_line(shape, axes)
  if k == 1:
    return jnp.broadcast_to(jnp.expand_dims(v, axes), shape)
  line = jnp.tile(v, k)
  return jnp.broadcast_to(line, (math.prod(shape) // line.size, line.size)).reshape(shape)


def masked_means(
  values: Sequence[jax.Array],
  axes: tuple[int, ...],
  mask: ArrayLike | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  count: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
  """Means over ``axes`` (and the named axis) of each array, in one collective.

  Args:
    values: arrays of one shape, e.g. ``(x, x**2)``.
    axes: the axes to reduce over.
    mask: boolean, broadcastable to the values: only True entries are averaged.
    axis_name: named axis to average over as well (one ``pmean`` or ``psum``).
    axis_index_groups: subgroups of ``axis_name`` averaged separately.
    count: with a mask, the number of selected entries (`value_count`) if
      already known; else it is summed in the same collective.

  Returns:
    One mean per array, of the shape of the axes not reduced over and of the
    array's dtype. With a mask each is a sum over the selected entries divided
    by their count (0 if there are none): devices with fewer real examples
    weigh less, unlike a mean of per-device means.
  """
  # The means travel stacked, in one dtype (complex if any value is); each
  # comes back in its own.
  own_dtype = lambda means: tuple(
    m.real if jnp.iscomplexobj(m) and not jnp.iscomplexobj(v) else m
    for m, v in zip(means, values, strict=False)
  )
  if mask is None:
    n = math.prod(values[0].shape[a] for a in axes)
    means = jnp.stack([feature_sum(v, axes) / n for v in values])
    if axis_name is not None:
      means = lax.pmean(means, axis_name, axis_index_groups=axis_index_groups)
    return own_dtype(means)
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), values[0].shape)
  sums = [feature_sum(jnp.where(mask, v, 0), axes) for v in values]
  if count is None:
    sums.append(mask.sum(axes, dtype=jnp.finfo(values[0].dtype).dtype))
  sums = jnp.stack(sums)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  if count is None:
    *sums, count = sums
    count = count.real
  return own_dtype([s / jnp.maximum(count, 1) for s in sums])


def value_count(
  x: jax.Array,
  axes: tuple[int, ...],
  mask: ArrayLike | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
) -> jax.Array:
  """The number ``n`` of values averaged per feature, as float32.

  ``n`` is the size of ``axes`` (times the number of devices along
  ``axis_name``), or with a mask the number of True entries; it is what
  `jaxbn.unbiased_variance` needs. Of the shape of the axes not in ``axes``
  with a mask, a scalar without.
  """
  if mask is None:
    n = jnp.asarray(math.prod(x.shape[a] for a in axes), jnp.float32)
  else:
    n = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).sum(axes, dtype=jnp.float32)
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
  shift: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-feature mean and biased variance of ``x`` over ``reduction_axes``.

  ``x`` should already be in the precision of the reduction (float32 or
  wider); if complex, the mean is complex and the variance
  ``E|x - E[x]|^2`` real. Both formulas give a variance that is never
  negative:

  * ``use_fast_variance=True``: one pass and one collective, with shifted
    moments ``var = E[(x - k)^2] - E[x - k]^2``. ``k = shift`` is a guess of
    the mean of each feature (size 1 along ``reduction_axes``; 0 if None):
    `batch_norm` passes the running mean, so that no extra pass over ``x`` is
    needed. The formula loses about ``(E[x] - k)^2 / var`` ulps of the
    variance (flax issue 1491 is ``k = 0`` with a large mean); when ``k`` is
    more than 2 standard deviations from the mean, a second pass about the
    mean of ``x - k`` replaces it (under `lax.cond`, so it costs only then).
    Mean and variance are then exact up to the rounding of ``x - k`` (to ulps
    of the larger of ``|x|`` and ``|k|``, the rounding ``x`` itself has when
    ``k`` is no larger).
  * ``use_fast_variance=False``: two passes, ``var = E[(x - E[x])^2]``.

  Gradients are those of the formula; with ``shift`` they do not flow
  through ``k``. ``mask``, ``axis_name`` and ``axis_index_groups`` are as in
  `masked_means`.

  Returns:
    ``(mean, var)``, each of the shape of the axes not reduced over.

  Example:
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # 2 examples, 2 features
    >>> batch_statistics(x, (0,))
    (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32))
  """
  reduce = lambda *vs: masked_means(vs, reduction_axes, mask, axis_name, axis_index_groups)

  def two_passes(x):
    (mean,) = reduce(x)
    (var,) = reduce(abs_square(x - jnp.expand_dims(mean, reduction_axes)))
    return mean, var

  if not use_fast_variance:
    return two_passes(x)
  shift = jnp.zeros((), x.dtype) if shift is None else lax.stop_gradient(jnp.asarray(shift))
  centred = x - shift
  offset, mean_sq = reduce(centred, abs_square(centred))
  mean = offset + (jnp.squeeze(shift, reduction_axes) if shift.ndim else shift)
  var = mean_sq - abs_square(offset)

  def second_pass(centred, offset, var):
    (exact,) = reduce(abs_square(centred - jnp.expand_dims(offset, reduction_axes)))
    return exact - var

  # The correction carries no derivative, so the cond is not differentiated.
  # It reads `centred`, which the moments needed anyway (reading x would
  # keep a second full-size array alive).
  imprecise = jnp.any(abs_square(offset) > 4.0 * var)
  zeros = lambda centred, offset, var: jnp.zeros_like(var)
  var = var + lax.cond(imprecise, second_pass, zeros, *lax.stop_gradient((centred, offset, var)))
  return mean, jnp.maximum(var, 0.0)
