"""Combinations of `jaxbn.batch_norm`'s options against a float64 NumPy reference (hypothesis).

Each example draws one combination: the layout (shape and ``axis``, an int or
a tuple), training or inference, a mask (none, one per entry, or one per
position shared by the features), the running average (``momentum`` in
[0, 1], or None with a ``count``), ``unbiased_running_var``, virtual batches,
batch renormalization's ``renorm_clip``, the input dtype (float32, bfloat16,
float16) and the output ``dtype``, ``use_fast_variance``, ``epsilon``, a
``jax.vmap`` with or without ``axis_name`` (with it the statistics span the
vmapped axis too), and jit. `np_batch_norm` computes the expected ``y`` and
running statistics from the equations of `jaxbn.batch_norm`'s docstring, in
float64 and without jaxbn.

Tolerances. The reference takes the input as rounded to its dtype, so a
bfloat16 or float16 input costs nothing more than a float32 one: its
statistics are float32 (`FLOAT32` for the running mean and variance). Only an
output ``y`` in half precision is rounded once more, by at most half an ulp:
the unit round-off of its dtype (2**-8 for bfloat16, 2**-11 for float16) is
added to ``y``'s relative tolerance. The data keep float32 honest too: each
group of statistics holds ``loc - spread`` and ``loc + spread``, so no
variance is tiny next to the values' magnitude.

The number of examples is the project's hypothesis profile (tests/conftest.py:
25, 10-30 s on 2 shared cores, plus the explicit examples; HYPOTHESIS_PROFILE=thorough
for 1000).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jaxbn

# float32 statistics of values of magnitude <= ~10 with variances >= ~0.05:
# a few float32 ulps of the terms (in 300 examples the largest error of y, the
# mean or the variance was an eighth of this).
FLOAT32 = dict(atol=1e-5, rtol=1e-5)
# Half an ulp of y in its own dtype, relative to y.
UNIT_ROUNDOFF = {'float32': 2.0**-24, 'bfloat16': 2.0**-8, 'float16': 2.0**-11}

# (shape, axis): dense, sequence and image layouts, features first or last,
# several feature axes given in either order.
LAYOUTS = (
  ((8, 3), -1),
  ((3, 8), 0),
  ((6, 4, 3), -2),
  ((6, 4, 3), (1, 2)),
  ((4, 3, 2, 5), 1),
  ((4, 3, 2, 5), -1),
  ((4, 3, 2, 5), (-1, 1)),
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One combination of options; the data come from ``seed``."""

  shape: tuple[int, ...] = (8, 3)
  axis: int | tuple[int, ...] = -1
  training: bool = True
  mask: str | None = None  # None, 'entries' (x's shape) or 'positions' (1 along the features)
  momentum: float | None = 0.9
  count: int = 0  # with momentum=None
  unbiased_running_var: bool = False
  virtual_batch_size: int | None = None
  renorm_clip: tuple[float, float] | None = None
  x_dtype: str = 'float32'
  dtype: str | None = None  # batch_norm's output dtype argument
  use_scale: bool = True
  use_bias: bool = True
  use_fast_variance: bool = True
  epsilon: float = 1e-5
  vmap: str | None = None  # None, 'vmap' (independent slices) or 'axis_name' (synchronized)
  vmap_size: int = 2
  jit: bool = False
  seed: int = 0


def _axes(ndim, axis):
  """(feature axes, reduction axes), each sorted."""
  feature = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  return feature, tuple(a for a in range(ndim) if a not in feature)


def _feature_shape(shape, axis):
  return tuple(shape[a] for a in _axes(len(shape), axis)[0])


def _values_per_feature(shape, axis):
  return math.prod(shape[a] for a in _axes(len(shape), axis)[1])


def _to_groups(a, axis, groups):
  """(V, *shape) to (V, G, M, F): G groups of consecutive examples, M values of F features.

  The reduction axes come first, in order, so that axis 0 (the batch) varies
  slowest and splitting it into G runs of examples is a reshape.
  """
  feature, reduction = _axes(a.ndim - 1, axis)
  moved = a.transpose(0, *(r + 1 for r in reduction), *(f + 1 for f in feature))
  return moved.reshape(a.shape[0], groups, -1, math.prod(a.shape[f + 1] for f in feature))


def _from_groups(c, shape, axis):
  """The inverse of `_to_groups`: (V, G, M, F) to (V, *shape)."""
  feature, reduction = _axes(len(shape), axis)
  order = (*reduction, *feature)
  moved = c.reshape(c.shape[0], *(shape[a] for a in order))
  return moved.transpose(0, *(1 + order.index(a) for a in range(len(shape))))


def np_batch_norm(x, scale, bias, mean, var, mask, case):
  """Batch norm from the docstring's equations, in float64.

  ``x`` is (V, *shape) (V = 1 without vmap), ``mask`` of x's shape or None,
  the others of the feature shape or None. Returns ``(y, mean, var)`` with a
  leading V axis. Statistics are per feature over the reduction axes of each
  virtual batch, and over the V slices too with ``axis_name``.
  """
  shape, axis = case.shape, case.axis
  feature_shape = _feature_shape(shape, axis)
  flat = lambda v: np.asarray(v, np.float64).reshape(-1)
  gamma = 1.0 if scale is None else flat(scale)
  beta = 0.0 if bias is None else flat(bias)
  mu, sigma2 = flat(mean), flat(var)
  groups = 1 if case.virtual_batch_size is None else shape[0] // case.virtual_batch_size
  xc = _to_groups(np.asarray(x, np.float64), axis, groups)
  v = xc.shape[0]
  if not case.training:
    y = (xc - mu) / np.sqrt(sigma2 + case.epsilon) * gamma + beta
    new_mean, new_var = np.broadcast_to(mu, (v, mu.size)), np.broadcast_to(sigma2, (v, mu.size))
  else:
    w = (
      np.ones(xc.shape) if mask is None else _to_groups(np.asarray(mask, np.float64), axis, groups)
    )
    axes = (0, 2) if case.vmap == 'axis_name' else (2,)
    n = w.sum(axes, keepdims=True)
    batch_mean = (w * xc).sum(axes, keepdims=True) / n
    batch_var = (w * (xc - batch_mean) ** 2).sum(axes, keepdims=True) / n
    batch_std = np.sqrt(batch_var + case.epsilon)
    x_hat = (xc - batch_mean) / batch_std
    if case.renorm_clip is not None:
      rmax, dmax = case.renorm_clip
      std = np.sqrt(sigma2 + case.epsilon)
      r = np.clip(batch_std / std, 1 / rmax, rmax)
      d = np.clip((batch_mean - mu) / std, -dmax, dmax)
      x_hat = x_hat * r + d
    y = x_hat * gamma + beta
    stored = batch_var * n / (n - 1) if case.unbiased_running_var else batch_var
    # The mean over the virtual batches of their statistics.
    batch_mean, stored = (
      np.broadcast_to(s, (v, groups, 1, mu.size)).mean((1, 2)) for s in (batch_mean, stored)
    )
    if case.momentum is None:  # equal weight to each of the count + 1 batches
      new_mean = (case.count * mu + batch_mean) / (case.count + 1)
      new_var = (case.count * sigma2 + stored) / (case.count + 1)
    else:
      new_mean = case.momentum * mu + (1 - case.momentum) * batch_mean
      new_var = case.momentum * sigma2 + (1 - case.momentum) * stored
  y = _from_groups(np.broadcast_to(y, xc.shape), shape, axis)
  return y, new_mean.reshape(v, *feature_shape), new_var.reshape(v, *feature_shape)


def _data(case):
  """(x, scale, bias, mean, var, mask): x as (V, *shape) in its dtype, mask (V, ...) or None.

  Per feature, values ``loc + spread * z`` with z standard normal, except
  that each group of statistics (a feature of a virtual batch of a vmapped
  slice) holds z = -1 and z = +1 at two of its real entries; masked-out
  entries hold z + 4, so that statistics taking them in are far off.
  """
  rng = np.random.default_rng(case.seed)
  shape, axis = case.shape, case.axis
  feature_shape = _feature_shape(shape, axis)
  features = math.prod(feature_shape)
  v = case.vmap_size if case.vmap else 1
  groups = 1 if case.virtual_batch_size is None else shape[0] // case.virtual_batch_size
  m = _values_per_feature(shape, axis) // groups
  mask_features = features if case.mask == 'entries' else 1
  real = rng.random((v, groups, m, mask_features)) < (1.0 if case.mask is None else 0.6)
  two = np.argsort(rng.random(real.shape), axis=2)[:, :, :2]
  np.put_along_axis(real, two, True, axis=2)
  z = rng.standard_normal((v, groups, m, features))
  np.put_along_axis(
    z, np.broadcast_to(two, (v, groups, 2, features)), np.array([-1.0, 1.0])[:, None], axis=2
  )
  z = np.where(real, z, z + 4.0)
  loc, spread = rng.uniform(-3.0, 3.0, features), rng.uniform(0.5, 2.0, features)
  x = _from_groups(loc + spread * z, shape, axis)
  x = np.asarray(jnp.asarray(x.astype(np.float32), case.x_dtype))
  mask = None
  if case.mask is not None:
    features_of = _axes(len(shape), axis)[0] if case.mask == 'positions' else ()
    mask_shape = tuple(1 if a in features_of else s for a, s in enumerate(shape))
    mask = _from_groups(real, mask_shape, axis)
  per_feature = lambda values: values.reshape(feature_shape).astype(np.float32)
  sign = rng.choice([-1.0, 1.0], features)
  scale = per_feature(sign * rng.uniform(0.5, 2.0, features)) if case.use_scale else None
  bias = per_feature(rng.uniform(-2.0, 2.0, features)) if case.use_bias else None
  # Running statistics near the data's, so that renormalization's r and d are
  # sometimes clipped and sometimes not.
  mean = per_feature(loc + spread * rng.standard_normal(features))
  var = per_feature(spread**2 * np.exp(rng.uniform(np.log(0.25), np.log(4.0), features)))
  return x, scale, bias, mean, var, mask


@st.composite
def cases(draw):
  shape, axis = draw(st.sampled_from(LAYOUTS))
  per_example = _values_per_feature(shape, axis) // shape[0]
  virtual_sizes = [None]
  if 0 not in _axes(len(shape), axis)[0]:
    # Divisors of the batch whose groups hold at least 2 values per feature.
    virtual_sizes += [
      d for d in range(1, shape[0] + 1) if shape[0] % d == 0 and d * per_example >= 2
    ]
  momentum = draw(st.none() | st.floats(0.0, 1.0, allow_subnormal=False))
  renorm = st.tuples(st.floats(1.0, 3.0), st.floats(0.0, 2.0))
  return Case(
    shape=shape,
    axis=axis,
    training=draw(st.sampled_from([True, True, True, False])),
    mask=draw(st.sampled_from([None, 'entries', 'positions'])),
    momentum=momentum,
    count=draw(st.integers(0, 10)) if momentum is None else 0,
    unbiased_running_var=draw(st.booleans()),
    virtual_batch_size=draw(st.sampled_from(virtual_sizes)),
    renorm_clip=draw(st.none() | renorm),
    x_dtype=draw(st.sampled_from(['float32', 'bfloat16', 'float16'])),
    dtype=draw(st.sampled_from([None, 'float32', 'bfloat16', 'float16'])),
    use_scale=draw(st.booleans()),
    use_bias=draw(st.booleans()),
    use_fast_variance=draw(st.booleans()),
    epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
    vmap=draw(st.sampled_from([None, 'vmap', 'axis_name'])),
    vmap_size=draw(st.integers(2, 3)),
    jit=draw(st.booleans()),
    seed=draw(st.integers(0, 2**32 - 1)),
  )


def _batch_norm(case, scale, bias, mean, var):
  """``f(x, mask)``: `jaxbn.batch_norm` with the case's options, vmapped and jitted if asked."""
  axis_name = 'batch' if case.vmap == 'axis_name' else None

  def f(x, mask):
    return jaxbn.batch_norm(
      x,
      scale,
      bias,
      mean,
      var,
      use_running_average=not case.training,
      axis=case.axis,
      momentum=case.momentum,
      epsilon=case.epsilon,
      count=case.count if case.momentum is None else None,
      unbiased_running_var=case.unbiased_running_var,
      use_fast_variance=case.use_fast_variance,
      mask=mask,
      axis_name=axis_name,
      dtype=case.dtype,
      virtual_batch_size=case.virtual_batch_size,
      renorm_clip=case.renorm_clip,
    )

  if case.vmap:
    f = jax.vmap(f, axis_name=axis_name)
  return jax.jit(f) if case.jit else f


# The combinations the issue names, always run; hypothesis adds random ones.
@hypothesis.given(cases())
@hypothesis.example(  # a mask with the cumulative average, unbiased
  Case(shape=(6, 4, 3), axis=-2, mask='entries', momentum=None, count=3, unbiased_running_var=True)
)
@hypothesis.example(  # per-position mask, cumulative, virtual batches, tuple axes
  Case(
    shape=(4, 3, 2, 5),
    axis=(-1, 1),
    mask='positions',
    momentum=None,
    count=1,
    unbiased_running_var=True,
    virtual_batch_size=2,
    use_fast_variance=False,
  )
)
@hypothesis.example(  # renormalization in virtual batches, synchronized over vmap
  Case(
    shape=(4, 3, 2, 5),
    axis=1,
    mask='entries',
    momentum=0.5,
    unbiased_running_var=True,
    virtual_batch_size=2,
    renorm_clip=(1.5, 0.5),
    epsilon=0.1,
    vmap='axis_name',
    vmap_size=3,
    jit=True,
  )
)
@hypothesis.example(  # half precision in and out, several feature axes
  Case(
    shape=(6, 4, 3), axis=(1, 2), x_dtype='bfloat16', momentum=0.0, use_scale=False, use_bias=False
  )
)
@hypothesis.example(  # float16, features first, vmapped slices each with their own statistics
  Case(
    shape=(3, 8),
    axis=0,
    x_dtype='float16',
    dtype='float32',
    use_fast_variance=False,
    vmap='vmap',
    renorm_clip=(2.0, 1.0),
  )
)
@hypothesis.example(  # inference ignores mask, virtual batches and renormalization
  Case(
    shape=(4, 3, 2, 5),
    axis=-1,
    training=False,
    mask='entries',
    virtual_batch_size=2,
    renorm_clip=(2.0, 1.0),
    x_dtype='float16',
  )
)
def test_options_combined_match_the_float64_reference(case):
  x, scale, bias, mean, var, mask = _data(case)
  if not case.vmap:
    x, mask = x[0], None if mask is None else mask[0]
  out = _batch_norm(case, scale, bias, mean, var)(x, mask)

  x64 = np.asarray(x, np.float64).reshape(-1, *case.shape)
  mask64 = None if mask is None else np.broadcast_to(mask, x.shape).reshape(x64.shape)
  y, new_mean, new_var = np_batch_norm(x64, scale, bias, mean, var, mask64, case)
  if not case.vmap:
    y, new_mean, new_var = y[0], new_mean[0], new_var[0]

  params = [v for v in (x, scale, bias) if v is not None]
  y_dtype = jnp.dtype(case.dtype) if case.dtype else jnp.result_type(*params)
  chex.assert_shape(out.y, x.shape)
  chex.assert_shape([out.mean, out.var], new_mean.shape)
  chex.assert_trees_all_equal_dtypes(tuple(out), (jnp.zeros((), y_dtype), mean, var))
  chex.assert_trees_all_close((out.mean, out.var), (new_mean, new_var), **FLOAT32)
  rtol = FLOAT32['rtol'] + UNIT_ROUNDOFF[jnp.dtype(y_dtype).name]
  chex.assert_trees_all_close(
    np.asarray(out.y.astype(jnp.float32), np.float64), y, atol=FLOAT32['atol'], rtol=rtol
  )
