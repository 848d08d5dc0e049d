"""`BatchNorm`: a Flax NNX module around `jaxbn.batch_norm`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxbn._functional import batch_norm, layer_options
from jaxbn._renorm import renorm_schedule
from jaxbn.statistics import Axes, canonicalize_axes

_NO_MODE = (
  'No `use_running_average` argument was provided to BatchNorm. Give one of:\n\n'
  '1. the constructor: BatchNorm(..., use_running_average=True/False), or\n'
  '   model.train() / model.eval() on the model around it;\n'
  '2. the call: bn(x, use_running_average=True/False);\n'
  '3. a view: nnx.view(model, use_running_average=True/False).'
)


class BatchNorm(nnx.Module):
  """Batch normalization with running statistics in ``nnx.BatchStat`` variables.

  A drop-in replacement for `flax.nnx.BatchNorm`: the same constructor,
  attributes, call and state (``scale``, ``bias``: ``nnx.Param`` of shape
  ``(num_features,)`` in ``param_dtype``, or ``None`` when disabled;
  ``mean``, ``var``: ``nnx.BatchStat``, float32, of the same shape), and the
  same outputs. Train with ``model.train()`` (or ``use_running_average=False``
  in the constructor or call): each call normalises with the batch statistics
  and updates ``mean`` and ``var`` in place. Evaluate with ``model.eval()``,
  ``nnx.view(model, use_running_average=True)`` or the call argument. No
  gradient flows into the running statistics. See `jaxbn.batch_norm` for the
  equations and conventions:

  * ``momentum`` is the decay of the running average, ``ra = momentum * ra +
    (1 - momentum) * batch`` (PyTorch's ``momentum=0.1`` is ``0.9`` here);
  * the running variance holds the biased batch variance (as Flax and D2L)
    unless ``unbiased_running_var=True``; normalisation always uses the
    biased one;
  * training on a single value per feature (a batch of one dense example,
    or one example under a per-example ``nnx.vmap``) computes what Flax
    computes, the output being ``bias``, and emits a
    `jaxbn.SingleValueWarning` naming the layer (its class and
    ``num_features``) when traced.

  Beyond Flax (as `jaxbn.BatchNorm`, the linen module):

  * ``momentum=None`` keeps the cumulative (equal-weight) average of all
    batches seen, as PyTorch's ``momentum=None``; the number of batches
    averaged so far is the int32 scalar ``nnx.BatchStat`` ``count``.
  * ``unbiased_running_var``, ``force_float32_reductions``,
    ``virtual_batch_size`` (ghost batch norm) and ``renorm_clip`` (batch
    renormalization) as in `jaxbn.batch_norm`; with ``renorm_warmup_steps``
    the steps are counted in the int32 scalar ``nnx.BatchStat``
    ``renorm_steps`` (`jaxbn.renorm_schedule`).
  * The fast variance uses moments shifted by the running mean: accurate when
    the mean is large relative to the spread (flax issue 1491).
  * ``axis`` may be a tuple (e.g. ``(1, 3)``); the state then has Flax's flat
    layout, ``num_features`` being the product of the sizes of those axes.

  Example::

    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.nnx import BatchNorm

    >>> x = jax.random.normal(jax.random.key(0), (5, 6))  # (N, C)
    >>> layer = BatchNorm(num_features=6, momentum=0.9, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.state(layer))
    State({
      'bias': Param(
        value=(6,)
      ),
      'mean': BatchStat(
        value=(6,)
      ),
      'scale': Param(
        value=(6,)
      ),
      'var': BatchStat(
        value=(6,)
      )
    })

    >>> layer.train()  # normalise with this batch's statistics, update mean and var
    >>> y = layer(x)
    >>> bool(jnp.allclose(layer.mean[...], 0.1 * x.mean(0)))  # 0.9 * 0 + 0.1 * batch mean
    True
    >>> layer.eval()  # normalise with the running averages, leave them as they are
    >>> y = layer(x)
    >>> bool(jnp.allclose(layer.mean[...], 0.1 * x.mean(0)))
    True

  Args:
    num_features: the size of the feature axis (of the feature axes together).
    use_running_average: inference mode if True; may also be given per call.
    axis: the feature axis or axes (default -1: channels of NHWC, or C of (N, C)).
    momentum: decay of the running average (Flax's default 0.99; D2L uses
      0.9), or None for the cumulative average.
    epsilon: added to the variance before the square root.
    dtype: output dtype (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn a per-feature offset (beta).
    use_scale: learn a per-feature scale (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis (``nnx.vmap``, ``shard_map``, ``pmap``) over which to
      average the statistics; not needed under SPMD ``jax.jit``, where a
      sharded batch already gives the global batch's statistics.
    axis_index_groups: subgroups of ``axis_name`` to average over separately.
    use_fast_variance: one-pass (True) or two-pass (False) variance.
    promote_dtype: as in Flax, casts ``(x, mean, var, scale, bias)`` to a
      common dtype (``dtype`` if given); the running averages are updated from
      the uncast ``mean`` and ``var``.
    rngs: the random keys of the initializers (``rngs.params()``).
    bias_metadata: metadata of the ``bias`` Param.
    scale_metadata: metadata of the ``scale`` Param.
    force_float32_reductions: compute statistics in at least float32 and keep
      the running averages in float32 (else in ``param_dtype``).
    unbiased_running_var: store ``n / (n - 1)`` times the batch variance in
      the running variance (PyTorch), ``n`` values per feature.
    virtual_batch_size: ghost batch norm: normalise each run of this many
      examples with its own statistics in training.
    renorm_clip: ``(rmax, dmax)`` of batch renormalization, or None.
    renorm_warmup_steps: steps over which the renorm bounds widen from
      ``(1, 0)`` to ``renorm_clip``; 0 uses ``renorm_clip`` from the start.
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: Axes = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    force_float32_reductions: bool = True,
    unbiased_running_var: bool = False,
    virtual_batch_size: int | None = None,
    renorm_clip: tuple[float, float] | None = None,
    renorm_warmup_steps: int = 0,
  ):
    shape = (num_features,)
    stats_dtype = jnp.float32 if force_float32_reductions else param_dtype
    self.mean = nnx.BatchStat(jnp.zeros(shape, stats_dtype))
    self.var = nnx.BatchStat(jnp.ones(shape, stats_dtype))
    # Scale first, then bias: the same keys as Flax for random initializers.
    self.scale = nnx.data(None)
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
    self.bias = nnx.data(None)
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
    counter = lambda: nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.count = counter() if momentum is None else nnx.data(None)
    warmup = renorm_clip is not None and renorm_warmup_steps
    self.renorm_steps = counter() if warmup else nnx.data(None)

    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions
    self.unbiased_running_var = unbiased_running_var
    self.virtual_batch_size = virtual_batch_size
    self.renorm_clip = renorm_clip
    self.renorm_warmup_steps = renorm_warmup_steps

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
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(_NO_MODE)
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    x, mean, var, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    if not use_running_average:
      # As in Flax, the dtype only casts the running averages used in
      # inference; training updates them from their stored values.
      mean, var = self.mean[...], self.var[...]
    # Tuple axes: the flat state of Flax's layout, reshaped to the feature axes.
    feature_shape = tuple(jnp.shape(x)[a] for a in canonicalize_axes(jnp.ndim(x), self.axis))
    reshape = len(feature_shape) > 1 and math.prod(feature_shape) == self.num_features
    features = lambda v: v if v is None or not reshape else v.reshape(feature_shape)
    renorm_clip = self.renorm_clip
    if self.renorm_steps is not None:
      renorm_clip = renorm_schedule(self.renorm_steps[...], *renorm_clip, self.renorm_warmup_steps)
    y, new_mean, new_var = batch_norm(
      x,
      features(scale),
      features(bias),
      features(mean),
      features(var),
      use_running_average=use_running_average,
      count=None if self.count is None else self.count[...],
      mask=mask,
      renorm_clip=renorm_clip,
      # An NNX module does not know its path in the model; its size names it.
      name=f'{type(self).__name__}(num_features={self.num_features})',
      **layer_options(self),
    )
    if not use_running_average:
      # The running averages are state, not part of the loss: a later call
      # in inference mode within the same differentiated function must not
      # pass gradients back through them into this batch (as in Flax).
      for variable, new in ((self.mean, new_mean), (self.var, new_var)):
        new = jax.lax.stop_gradient(new.reshape(variable.shape))
        if jnp.iscomplexobj(new) and not jnp.iscomplexobj(variable[...]):
          # A complex input's mean is complex (the linen modules' becomes so
          # too); flax.nnx.BatchNorm drops its imaginary part here.
          variable.set_value(new)
        else:
          variable[...] = new.astype(variable.dtype)
      if self.count is not None:
        self.count[...] = self.count[...] + 1
      if self.renorm_steps is not None:
        self.renorm_steps[...] = self.renorm_steps[...] + 1
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Sets the mode for ``nnx.view(model, use_running_average=...)``, as Flax does.

    Args:
      use_running_average: if True, normalise with the running averages and
        leave them unchanged; if False, with the batch statistics, updating
        them; None keeps the current setting.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
