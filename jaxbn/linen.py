"""`BatchNorm`: a Flax linen module around `jaxbn.batch_norm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer

from jaxbn._functional import batch_norm, layer_options
from jaxbn._renorm import renorm_schedule
from jaxbn.statistics import Axes, canonicalize_axes


class BatchNorm(nn.Module):
  """Batch normalization with running statistics in the ``batch_stats`` collection.

  A drop-in replacement for `flax.linen.BatchNorm`: the same attributes, the
  same variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``,
  ``var``, of the shape of the feature axes) and the same outputs. Train with
  ``mutable=['batch_stats']`` and keep the returned updates; evaluate with
  ``use_running_average=True``. Running statistics are not updated by
  ``init``. See `jaxbn.batch_norm` for the equations and conventions.

  Training on a single value per feature (a batch of one dense example, say)
  computes what Flax computes, the output being ``bias``, and emits a
  `jaxbn.SingleValueWarning` naming the layer's path when traced; ``init``
  on such a batch (a dummy example) emits none.

  Beyond Flax:

  * ``momentum=None`` keeps the cumulative (equal-weight) average of all
    batches seen, as PyTorch's ``momentum=None``; the number of batches
    averaged so far is stored in ``batch_stats['count']`` (int32 scalar).
  * ``unbiased_running_var=True`` stores the unbiased batch variance
    ``n / (n - 1) * var`` in the running variance, as PyTorch does.
  * The fast variance is computed with moments shifted by the running mean
    (at Flax's cost), with two passes when that is far from the batch mean:
    accurate when the mean is large relative to the spread (flax issue 1491).

  Attributes:
    use_running_average: inference mode if True; may also be given per call.
    axis: the feature axis or axes (default -1: channels of NHWC, or C of (N, C)).
    momentum: decay of the running average, ``ra = momentum * ra + (1 -
      momentum) * batch`` (Flax's default 0.99; D2L uses 0.9), or None.
    epsilon: added to the variance before the square root.
    dtype: output dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn a per-feature offset (beta).
    use_scale: learn a per-feature scale (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis over which to average statistics across devices.
    axis_index_groups: subgroups of ``axis_name`` to average over separately.
    use_fast_variance: one-pass (True) or two-pass (False) variance.
    force_float32_reductions: compute statistics and keep running averages in
      at least float32.
    unbiased_running_var: store the unbiased variance in the running average.
    virtual_batch_size: ghost batch norm: normalise each run of this many
      examples with its own statistics in training.
    renorm_clip: ``(rmax, dmax)`` of batch renormalization, or None.
    renorm_warmup_steps: steps over which the renorm bounds widen from
      ``(1, 0)`` to ``renorm_clip`` (`jaxbn.renorm_schedule`), counted in
      ``batch_stats['renorm_steps']``; 0 uses ``renorm_clip`` from the start.
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = nn.initializers.zeros
  scale_init: Initializer = nn.initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  unbiased_running_var: bool = False
  virtual_batch_size: int | None = None
  renorm_clip: tuple[float, float] | None = None
  renorm_warmup_steps: int = 0

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` (any rank) per feature; returns an array of its shape.

    Args:
      x: the input, e.g. (N, C) or (N, H, W, C).
      use_running_average: overrides the attribute of the same name.
      mask: boolean array broadcastable to ``x``; only True entries enter the
        batch statistics.
    """
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    feature_axes = canonicalize_axes(jnp.ndim(x), self.axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, feature_shape, stats_dtype)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, feature_shape, stats_dtype)
    count = None
    if self.momentum is None:
      count = self.variable('batch_stats', 'count', jnp.zeros, (), jnp.int32)
    renorm_clip, renorm_steps = self.renorm_clip, None
    if renorm_clip is not None and self.renorm_warmup_steps:
      renorm_steps = self.variable('batch_stats', 'renorm_steps', jnp.zeros, (), jnp.int32)
      renorm_clip = renorm_schedule(renorm_steps.value, *renorm_clip, self.renorm_warmup_steps)

    def param(name, init, use):
      if not use:
        return None
      value = self.param(name, init, feature_shape, self.param_dtype)
      return value if self.force_float32_reductions else jnp.asarray(value, self.param_dtype)

    initializing = self.is_initializing()
    options = layer_options(self)
    path = '/'.join(self.scope.path)
    where = f"at '{path}'" if path else '(top-level module)'
    if initializing:  # the named axis may not exist yet (as in Flax)
      options.update(axis_name=None, axis_index_groups=None)
    y, new_mean, new_var = batch_norm(
      x,
      param('scale', self.scale_init, self.use_scale),
      param('bias', self.bias_init, self.use_bias),
      ra_mean.value,
      ra_var.value,
      use_running_average=use_running_average,
      count=None if count is None else count.value,
      mask=mask,
      renorm_clip=renorm_clip,
      name=f'{type(self).__name__} {where}',
      # `init` learns nothing; its example is often a dummy batch of one.
      warn_single_value=not initializing,
      **options,
    )
    if not initializing and not use_running_average:
      ra_mean.value = new_mean
      ra_var.value = new_var
      if count is not None:
        count.value = count.value + 1
      if renorm_steps is not None:
        renorm_steps.value = renorm_steps.value + 1
    return y
