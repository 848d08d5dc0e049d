"""Fuzzing batch_norm: finite, documented results or the documented error, for any input."""

import contextlib
import math

import hypothesis
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import jaxbn

DTYPES = ['float32', 'bfloat16', 'float16', 'int32']


@st.composite
def cases(draw):
  ndim = draw(st.integers(1, 4))
  shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
  dtype = draw(st.sampled_from(DTYPES))
  axis = draw(st.integers(-ndim - 1, ndim))
  momentum = draw(st.one_of(st.none(), st.floats(-0.5, 1.5, allow_nan=False)))
  with_count = draw(st.booleans())
  training = draw(st.booleans())
  seed = draw(st.integers(0, 2**31 - 1))
  return shape, dtype, axis, momentum, with_count, training, seed


def expected_error(shape, dtype, axis, momentum, with_count, training):
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    return ValueError, 'out of range for an input of rank'
  if dtype == 'int32':
    return TypeError, 'floating-point'
  if momentum is None and not with_count:
    return ValueError, 'needs count'
  if momentum is not None and not 0 <= momentum <= 1:
    return ValueError, r'outside \[0, 1\]'
  return None


def expected_warning(shape, axis, training):
  """One value per feature in training is computed (as Flax does) with a SingleValueWarning."""
  if training and math.prod(shape) // shape[axis] == 1:
    return pytest.warns(jaxbn.SingleValueWarning, match='single value per feature')
  return contextlib.nullcontext()


@hypothesis.given(cases())
def test_batch_norm_returns_finite_documented_results_or_the_documented_error(case):
  shape, dtype, axis, momentum, with_count, training, seed = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-100, 100, shape).astype(np.float32)).astype(dtype)
  features = shape[axis] if -len(shape) <= axis < len(shape) else 1
  mean = jnp.asarray(rng.normal(size=features), jnp.float32)
  var = jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32)
  call = lambda: jaxbn.batch_norm(
    x,
    jnp.ones(features),
    jnp.zeros(features),
    mean,
    var,
    use_running_average=not training,
    axis=axis,
    momentum=momentum,
    count=3 if with_count else None,
  )
  error = expected_error(shape, dtype, axis, momentum, with_count, training)
  if error is not None:
    with pytest.raises(error[0], match=error[1]):
      call()
    return
  with expected_warning(shape, axis, training):
    y, new_mean, new_var = call()
  assert y.shape == x.shape
  assert new_mean.shape == new_var.shape == (features,)
  assert new_mean.dtype == new_var.dtype == jnp.float32
  for value in (y, new_mean, new_var):
    assert bool(jnp.all(jnp.isfinite(value.astype(jnp.float32))))
  assert bool(jnp.all(new_var >= 0))
  if not training:
    np.testing.assert_array_equal(new_mean, mean)
    np.testing.assert_array_equal(new_var, var)
    return
  xs = np.moveaxis(np.asarray(x.astype(jnp.float32), np.float64), axis, -1).reshape(-1, features)
  weight = 1 / 4 if momentum is None else 1 - momentum
  np.testing.assert_allclose(
    new_mean, (1 - weight) * np.asarray(mean) + weight * xs.mean(0), rtol=1e-4, atol=1e-3
  )
  np.testing.assert_allclose(
    new_var, (1 - weight) * np.asarray(var) + weight * xs.var(0), rtol=1e-3, atol=1e-2
  )
  # Normalised per feature: mean ~0 (the scale is 1, the bias 0).
  ys = np.moveaxis(np.asarray(y.astype(jnp.float32), np.float64), axis, -1).reshape(-1, features)
  assert np.all(np.abs(ys.mean(0)) < 0.05)
