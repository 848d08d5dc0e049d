"""Training-mode batch norm with its closed-form derivative.

`normalize` computes the batch statistics (`jaxbn.batch_statistics`), the
batch renormalization correction if asked (`jaxbn.renorm_correction`) and the
affine output (`affine`); its derivative is batch norm's closed form, a custom
JVP, rather than autodiff of those steps. `jaxbn.batch_norm` calls it with the
input already split into virtual batches, if any.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn._renorm import renorm_correction
from jaxbn.statistics import batch_statistics, broadcast_features, masked_means, value_count


class _Normalization(NamedTuple):
  """The static (hashable) settings of `_normalize`."""

  axes: tuple[int, ...]
  use_fast_variance: bool
  axis_name: Any
  axis_index_groups: tuple[tuple[int, ...], ...] | None


def affine(
  x: jax.Array,
  mean: jax.Array,
  rstd: jax.Array,
  axes: tuple[int, ...],
  scale: jax.Array | None,
  bias: jax.Array | None,
  r: jax.Array | None = None,
  d: jax.Array | None = None,
) -> jax.Array:
  """``(x - mean) * (rstd * r * scale) + (d * scale + bias)``: normalise, then scale and shift.

  The per-feature values (``mean``, ``rstd`` = 1 / std, ``scale``, ``bias``
  and renormalization's ``r``, ``d``) have the shape of the axes of ``x`` not
  in ``axes`` and are broadcast along ``axes``; None terms are left out. The
  per-feature factors are combined first, so that each element of ``x`` takes
  one subtraction, one multiplication and one addition.
  """
  multiplier, offset = rstd, d
  if r is not None:
    multiplier = multiplier * r
  if scale is not None:
    multiplier = multiplier * scale
    offset = None if offset is None else offset * scale
  if bias is not None:
    offset = bias if offset is None else offset + bias
  keep = lambda v: jnp.expand_dims(v, axes)
  y = (x - keep(mean)) * keep(multiplier)
  return y if offset is None else y + keep(offset)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _normalize(how, x, scale, bias, mean, var, epsilon, mask, renorm_clip):
  """Training-mode batch norm: ``(y, batch_mean, batch_var)``.

  ``x`` is reduced over ``how.axes``; ``scale`` and ``bias`` (or None) have
  the shape of the statistics, or 1 along a group axis; ``mean, var`` are the
  running statistics (the shift of the moments, and the reference of batch
  renormalization). The derivative is batch norm's closed form
  (`_normalize_jvp`); none flows to ``mean``, ``var``, ``mask`` or
  ``renorm_clip``.
  """
  return _normalize_primal(how, x, scale, bias, mean, var, epsilon, mask, renorm_clip)[0]


def _normalize_primal(how, x, scale, bias, mean, var, epsilon, mask, renorm_clip):
  batch_mean, batch_var = batch_statistics(
    x,
    how.axes,
    use_fast_variance=how.use_fast_variance,
    mask=mask,
    axis_name=how.axis_name,
    axis_index_groups=how.axis_index_groups,
    shift=jnp.expand_dims(mean, how.axes),
  )
  rstd = lax.rsqrt(batch_var + epsilon)
  r = d = None
  if renorm_clip is not None:
    r, d = renorm_correction(batch_mean, batch_var, mean, var, epsilon, renorm_clip)
  y = affine(x, batch_mean, rstd, how.axes, scale, bias, r, d)
  return (y, batch_mean, batch_var), (rstd, r, d)


@_normalize.defjvp
def _normalize_jvp(how, primals, tangents):
  r"""The tangent of ``y = x_hat * a + b``, ``x_hat = (x - mu) * rstd`` and
  ``a = rstd * r * scale`` (`affine`), grouped by what it broadcasts:

  .. math::
    \dot y = a \dot x
      + \hat x \big(r\, \dot{\mathrm{scale}}
        - a (\overline{\hat x \dot x} + \tfrac12 \mathrm{rstd}\, \dot\epsilon)\big)
      + \big(d\, \dot{\mathrm{scale}} + \dot{\mathrm{bias}} - a \bar{\dot x}\big),

  bars being the (masked, cross-device) means of the statistics:
  :math:`\dot\mu = \bar{\dot x}` and :math:`\dot{\sigma^2} =
  2 \overline{\hat x \dot x} / \mathrm{rstd}`. So written, its transpose
  (reverse mode) takes two reductions, :math:`\sum g` and :math:`\sum g \hat x`,
  shared with the gradients of ``bias`` and ``scale``, and one elementwise
  pass; autodiff of the forward formula reduces three times and writes one
  more full-size array (on XLA:CPU, benchmarks/throughput.py measured jaxbn's
  LeNet at 0.98-0.99x Flax BN's speed before, 1.03-1.04x after).
  """
  x, scale, bias, _, _, _, mask, _ = primals
  x_dot, scale_dot, bias_dot, _, _, epsilon_dot, *_ = tangents
  (y, batch_mean, batch_var), (rstd, r, d) = _normalize_primal(how, *primals)
  keep = lambda v: broadcast_features(v, x.shape, how.axes)
  x_hat = (x - keep(batch_mean)) * keep(rstd)
  # A mask's count is no tangent: it is summed apart from them.
  count = None
  if mask is not None:
    count = value_count(x, how.axes, mask, how.axis_name, how.axis_index_groups)
  mean_dot, x_hat_x_dot = masked_means(
    (x_dot, x_hat * x_dot), how.axes, mask, how.axis_name, how.axis_index_groups, count
  )
  a = rstd if r is None else rstd * r
  slope = -a * (x_hat_x_dot + 0.5 * rstd * epsilon_dot)
  if scale is not None:
    slope = slope * scale + (scale_dot if r is None else r * scale_dot)
    a = a * scale
  offset = -a * mean_dot
  if scale is not None and d is not None:
    offset = offset + d * scale_dot
  if bias is not None:
    offset = offset + bias_dot
  y_dot = keep(a) * x_dot + x_hat * keep(slope) + keep(offset)
  return (y, batch_mean, batch_var), (y_dot, mean_dot, 2.0 * x_hat_x_dot / rstd)


def normalize(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  mean: jax.Array,
  var: jax.Array,
  epsilon: ArrayLike,
  *,
  axes: tuple[int, ...],
  mask: ArrayLike | None = None,
  renorm_clip: tuple[ArrayLike, ArrayLike] | None = None,
  use_fast_variance: bool = True,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Batch norm of ``x`` with its own statistics over ``axes``.

  .. math::
    y = \mathrm{scale} \cdot \Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}
        \, r + d\Big) + \mathrm{bias}

  with ``r = 1, d = 0`` unless ``renorm_clip`` is given (`jaxbn.renorm_correction`).

  Args:
    x: the input, in the precision of the statistics (float32 or wider),
      real or complex.
    scale: gamma of the statistics' shape (the axes of ``x`` not in
      ``axes``; 1 along a group axis, `jaxbn._ghost.with_group_axis`), or None.
    bias: beta of that shape, or None.
    mean: the running mean of that shape: the shift of the one-pass moments
      and the reference of batch renormalization.
    var: the running variance of that shape (used by batch renormalization).
    epsilon: added to the variance before the square root.
    axes: the axes to reduce over.
    mask, use_fast_variance, axis_name, axis_index_groups: as in
      `jaxbn.batch_statistics`.
    renorm_clip: ``(rmax, dmax)`` of batch renormalization, or None.

  Returns:
    ``(y, batch_mean, batch_var)``: ``y`` of the shape of ``x``, and the biased
    batch statistics. Derivatives of all three flow to ``x``, ``scale``,
    ``bias`` and ``epsilon``, none to ``mean``, ``var``, ``mask`` or
    ``renorm_clip``.
  """
  how = _Normalization(
    axes=axes,
    use_fast_variance=use_fast_variance,
    axis_name=axis_name,
    axis_index_groups=None
    if axis_index_groups is None
    else tuple(tuple(group) for group in axis_index_groups),
  )
  args = (x, scale, bias, mean, var, epsilon, mask, renorm_clip)
  # With a named axis the same formula is differentiated by autodiff: jax
  # loses the axis name of a vmap when a custom JVP batched under it is
  # differentiated after jit ("unbound axis name"). Complex inputs too: the
  # closed form is written for real ones.
  if axis_name is None and not jnp.iscomplexobj(x):
    return _normalize(how, *args)
  return _normalize_primal(how, *args)[0]
