"""Specification of `jaxbn.batch_norm`, the pure function.

The expected values come from `np_batch_norm` below, written from the
equations in float64 NumPy and independent of jaxbn, or from invariants
(vmap, gradients, shift and scale invariance) that any correct batch norm has.
"""

import functools
import math
import re
import warnings

import chex
import hypothesis
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxbn
import jaxbn._functional
import jaxbn.linen

# ---------------------------------------------------------------------------
# Float64 NumPy reference.


def _feature_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def _split_axes(shape, axis):
  """(feature_axes, reduction_axes, feature_shape, broadcastable feature shape)."""
  ndim = len(shape)
  feature_axes = _feature_axes(ndim, axis)
  reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)
  feature_shape = tuple(shape[a] for a in feature_axes)
  keep = tuple(shape[a] if a in feature_axes else 1 for a in range(ndim))
  return feature_axes, reduction_axes, feature_shape, keep


def np_batch_norm(
  x,
  scale,
  bias,
  mean,
  var,
  *,
  use_running_average,
  axis=-1,
  momentum=0.9,
  epsilon=1e-5,
  count=None,
  unbiased_running_var=False,
  mask=None,
  use_fast_variance=None,
):
  """Batch norm from the equations, in float64: returns (y, new_mean, new_var).

  ``use_fast_variance`` (how jaxbn computes the variance) is accepted and
  ignored: the reference computes it one exact way.
  """
  del use_fast_variance
  x = np.asarray(x, np.float64)
  _, red, _, keep = _split_axes(x.shape, axis)
  mean = np.asarray(mean, np.float64)
  var = np.asarray(var, np.float64)
  if use_running_average:
    mu, sigma2 = mean, var
    new_mean, new_var = mean, var
  else:
    w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
    n = w.sum(red)
    xz = np.where(w > 0, x, 0.0)  # masked-out entries may hold anything
    mu = xz.sum(red) / n
    sigma2 = (w * (xz - mu.reshape(keep)) ** 2).sum(red) / n
    stored = sigma2 * n / (n - 1) if unbiased_running_var else sigma2
    if momentum is None:  # equal weight to each of the count + 1 batches
      new_mean = (count * mean + mu) / (count + 1)
      new_var = (count * var + stored) / (count + 1)
    else:
      new_mean = momentum * mean + (1 - momentum) * mu
      new_var = momentum * var + (1 - momentum) * stored
  y = (x - mu.reshape(keep)) / np.sqrt(sigma2.reshape(keep) + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(keep)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(keep)
  return y, new_mean, new_var


def _np_stats(x, axis=-1):
  """Float64 per-feature (mean, biased var, n)."""
  x = np.asarray(x, np.float64)
  _, red, _, _ = _split_axes(x.shape, axis)
  return x.mean(red), x.var(red), math.prod(x.shape[a] for a in red)


def _batch_stats(x, running_mean=None, **kwargs):
  """Training-mode batch norm of ``x`` (features last) without scale or bias, momentum 0.

  The running averages start at ``running_mean`` (default 0) and 1, so the
  returned ``(y, mean, var)`` holds this batch's statistics.
  """
  features = x.shape[-1]
  if running_mean is None:
    running_mean = jnp.zeros(features)
  return jaxbn.batch_norm(
    x,
    None,
    None,
    running_mean,
    jnp.ones(features),
    use_running_average=False,
    momentum=0.0,
    **kwargs,
  )


def _inputs(shape, axis=-1, seed=0):
  """Float32 (x, scale, bias, mean, var): features with distinct offsets and spreads."""
  rng = np.random.default_rng(seed)
  _, _, fshape, keep = _split_axes(shape, axis)
  loc = rng.uniform(-3.0, 3.0, keep)
  spread = rng.uniform(0.5, 2.0, keep)
  x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, fshape).astype(np.float32)
  bias = rng.standard_normal(fshape).astype(np.float32)
  mean = rng.standard_normal(fshape).astype(np.float32)
  var = rng.uniform(0.5, 2.0, fshape).astype(np.float32)
  return x, scale, bias, mean, var


def _assert_within(actual, desired, tol):
  """|actual - desired| <= tol elementwise (tol an array broadcastable to them)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  chex.assert_equal_shape([actual, desired])
  error = np.abs(actual - desired)
  bad = ~(error <= tol)
  assert not bad.any(), (
    f'{bad.sum()} values off: {actual[bad]} != {desired[bad]}, max error {error.max()}'
  )


def _assert_output(out, expected, shape, feature_shape, *, atol=1e-5, rtol=1e-5):
  """`out` is a BatchNormOutput of the right shapes close to `expected`."""
  assert isinstance(out, jaxbn.BatchNormOutput), type(out)
  chex.assert_shape(out.y, shape)
  chex.assert_shape([out.mean, out.var], feature_shape)
  chex.assert_trees_all_close(tuple(out), tuple(expected), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# Against the reference.

_TRAINING_CASES = (
  dict(testcase_name='dense', shape=(8, 3)),
  dict(testcase_name='nhwc', shape=(5, 7, 3, 4)),
  dict(testcase_name='nchw_axis1', shape=(5, 4, 7, 3), axis=1),
  dict(testcase_name='rank3_axis_minus2', shape=(6, 4, 5), axis=-2),
  dict(testcase_name='rank5', shape=(3, 2, 4, 3, 2)),
  dict(testcase_name='tuple_axes', shape=(5, 4, 3, 2), axis=(1, 3)),
  dict(testcase_name='tuple_axes_negative', shape=(5, 4, 3, 2), axis=(-1, 1)),
  dict(testcase_name='momentum0_eps1e-3', shape=(8, 3), momentum=0.0, epsilon=1e-3),
  dict(testcase_name='momentum1', shape=(8, 3), momentum=1.0),
  dict(testcase_name='two_pass_nhwc', shape=(5, 7, 3, 4), use_fast_variance=False),
  dict(testcase_name='unbiased_nhwc', shape=(5, 7, 3, 4), unbiased_running_var=True),
  dict(testcase_name='unbiased_dense_n2', shape=(2, 3), unbiased_running_var=True),
  dict(testcase_name='cumulative', shape=(8, 3), momentum=None, count=3),
  dict(
    testcase_name='cumulative_unbiased_first',
    shape=(6, 2, 3),
    momentum=None,
    count=0,
    unbiased_running_var=True,
  ),
  dict(testcase_name='no_scale_no_bias', shape=(8, 3), use_scale=False, use_bias=False),
  dict(testcase_name='mask_rows', shape=(6, 5, 3), mask_shape=(6, 5, 1)),
  dict(
    testcase_name='mask_full_unbiased_two_pass',
    shape=(8, 3),
    mask_shape=(8, 3),
    unbiased_running_var=True,
    use_fast_variance=False,
  ),
)


def _mask(shape, seed=1):
  """A random boolean mask with at least two selected entries per feature."""
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < 0.6
  mask[:2] = True
  return mask


class ReferenceTest(chex.TestCase):
  """Outputs and running-stat updates equal the float64 NumPy reference."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_TRAINING_CASES)
  def test_training_matches_reference(
    self, shape, use_scale=True, use_bias=True, mask_shape=None, count=None, **kwargs
  ):
    x, scale, bias, mean, var = _inputs(shape, kwargs.get('axis', -1))
    scale = scale if use_scale else None
    bias = bias if use_bias else None
    mask = None if mask_shape is None else _mask(mask_shape)

    @self.variant
    def fn(x, scale, bias, mean, var, mask, count):
      return jaxbn.batch_norm(
        x, scale, bias, mean, var, use_running_average=False, mask=mask, count=count, **kwargs
      )

    out = fn(x, scale, bias, mean, var, mask, count)
    expected = np_batch_norm(
      x, scale, bias, mean, var, use_running_average=False, mask=mask, count=count, **kwargs
    )
    _, _, fshape, _ = _split_axes(shape, kwargs.get('axis', -1))
    _assert_output(out, expected, shape, fshape)
    chex.assert_trees_all_equal_dtypes(tuple(out), (x, mean, var))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='dense', shape=(8, 3)),
    dict(testcase_name='single_example', shape=(1, 3)),
    dict(testcase_name='nchw_axis1', shape=(5, 4, 7, 3), axis=1, epsilon=1e-2),
    dict(testcase_name='tuple_axes', shape=(5, 4, 3, 2), axis=(1, 3)),
    dict(testcase_name='no_scale', shape=(3, 2, 4, 3, 2), use_scale=False),
  )
  def test_inference_matches_reference(self, shape, use_scale=True, **kwargs):
    x, scale, bias, mean, var = _inputs(shape, kwargs.get('axis', -1))
    scale = scale if use_scale else None
    fn = self.variant(
      lambda *args: jaxbn.batch_norm(*args, use_running_average=True, momentum=0.5, **kwargs)
    )
    out = fn(x, scale, bias, mean, var)
    expected = np_batch_norm(x, scale, bias, mean, var, use_running_average=True, **kwargs)
    _, _, fshape, _ = _split_axes(shape, kwargs.get('axis', -1))
    _assert_output(out, expected, shape, fshape)
    # Inference returns the running statistics unchanged, bit for bit.
    chex.assert_trees_all_equal((out.mean, out.var), (mean, var))

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_dtype_argument(self):
    x, scale, bias, mean, var = _inputs((6, 3))
    fn = self.variant(
      lambda *a: jaxbn.batch_norm(*a, use_running_average=False, dtype=jnp.bfloat16)
    )
    out = fn(x, scale, bias, mean, var)
    self.assertEqual(out.y.dtype, jnp.bfloat16)
    self.assertEqual(out.mean.dtype, jnp.float32)
    self.assertEqual(out.var.dtype, jnp.float32)
    expected = np_batch_norm(x, scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close(out.y.astype(jnp.float32), expected[0], atol=2e-2, rtol=1e-2)


class PerChannelTest(chex.TestCase):
  """Statistics are per feature, over all other axes, with N, H, W, C all distinct."""

  SHAPE = (5, 7, 3, 4)  # N, H, W, C

  def _channels(self):
    # Channel c has mean 10 * c and standard deviation c + 1, so statistics
    # mixing channels, or taken over the wrong axes, are far off.
    rng = np.random.default_rng(0)
    c = np.arange(self.SHAPE[-1])
    return (10.0 * c + (c + 1) * rng.standard_normal(self.SHAPE)).astype(np.float32)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_nhwc_statistics_per_channel(self, use_fast_variance):
    x = self._channels()
    fn = self.variant(functools.partial(_batch_stats, use_fast_variance=use_fast_variance))
    y, mean, var = fn(x)
    x64 = x.astype(np.float64)
    chex.assert_shape([mean, var], (4,))
    chex.assert_trees_all_close(mean, x64.mean((0, 1, 2)), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(var, x64.var((0, 1, 2)), rtol=1e-5)
    # Each channel of the output is standardised over N, H and W together.
    y64 = np.asarray(y, np.float64)
    chex.assert_trees_all_close(y64.mean((0, 1, 2)), np.zeros(4), atol=1e-5)
    chex.assert_trees_all_close(y64.std((0, 1, 2)), np.ones(4), rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_channel_outputs_depend_only_on_their_channel(self):
    x = self._channels()
    fn = self.variant(
      lambda x: jaxbn.batch_norm(
        x, None, None, jnp.zeros(4), jnp.ones(4), use_running_average=False
      )
    )
    y = fn(x).y
    x2 = x.copy()
    x2[..., 2] = 3.0 * x2[..., 2] ** 2  # changes only channel 2
    y2 = fn(x2).y
    chex.assert_trees_all_equal(np.delete(y2, 2, axis=-1), np.delete(y, 2, axis=-1))
    self.assertGreater(float(jnp.abs(y2[..., 2] - y[..., 2]).max()), 0.1)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_axis1_nchw_equals_transposed_nhwc(self, use_fast_variance):
    x_nhwc, scale, bias, mean, var = _inputs(self.SHAPE)
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    kw = dict(use_running_average=False, use_fast_variance=use_fast_variance)
    fn = self.variant(
      lambda x, axis: jaxbn.batch_norm(x, scale, bias, mean, var, axis=axis, **kw),
      static_argnums=1,
    )
    nhwc, nchw = fn(x_nhwc, -1), fn(x_nchw, 1)
    chex.assert_trees_all_close(nchw.y, nhwc.y.transpose(0, 3, 1, 2), atol=1e-6)
    chex.assert_trees_all_close((nchw.mean, nchw.var), (nhwc.mean, nhwc.var), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tuple_axes_equal_flattened_features(self):
    # Features on axes 1 and 3 of (N, A, H, B) are features of (N * H, A * B).
    x, scale, bias, mean, var = _inputs((5, 4, 3, 2), axis=(1, 3))
    fn = self.variant(
      lambda x, scale, bias, mean, var, axis: jaxbn.batch_norm(
        x, scale, bias, mean, var, axis=axis, use_running_average=False
      ),
      static_argnums=5,
    )
    out = fn(x, scale, bias, mean, var, (1, 3))
    flat = lambda a: a.transpose(0, 2, 1, 3).reshape(15, 8)
    ref = fn(flat(x), scale.reshape(8), bias.reshape(8), mean.reshape(8), var.reshape(8), -1)
    chex.assert_shape([out.mean, out.var], (4, 2))
    chex.assert_trees_all_close(flat(out.y), ref.y, atol=1e-6)
    chex.assert_trees_all_close((out.mean.reshape(8), out.var.reshape(8)), (ref.mean, ref.var))


# ---------------------------------------------------------------------------
# Gradients, vmap.


class GradientTest(chex.TestCase):
  """Autodiff (forward and reverse, to second order) agrees with finite differences."""

  def _check_grads_float64(self, shape, *, order, masked=False, use_scale=True, **kwargs):
    with jax.enable_x64(True):
      args = tuple(a.astype(np.float64) for a in _inputs(shape, kwargs.get('axis', -1)))
      args = args if use_scale else (args[0], None, *args[2:])
      # Every third example left out: each virtual batch of 3 keeps 2.
      mask = (np.arange(shape[0]) % 3 != 2).reshape(-1, *[1] * (len(shape) - 1))
      mask = mask if masked else None
      fn = self.variant(lambda *args: jaxbn.batch_norm(*args, mask=mask, epsilon=1e-3, **kwargs))
      self.assertEqual(fn(*args).y.dtype, jnp.float64)
      # Gradients of y and of the new running mean and var, w.r.t. x, scale,
      # bias and the old running statistics.
      jax.test_util.check_grads(fn, args, order=order, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)

  # check_grads under jit only: eagerly, each case compiles every primitive
  # of every derivative (seconds each). Eager gradients are covered by
  # test_input_gradient_matches_closed_form.
  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
    dict(
      testcase_name='training_nchw_masked_cumulative_unbiased',
      use_running_average=False,
      shape=(3, 2, 2, 2),
      axis=1,
      masked=True,
      momentum=None,
      count=2,
      unbiased_running_var=True,
    ),
    dict(
      testcase_name='training_two_pass',
      use_running_average=False,
      shape=(4, 3),
      use_fast_variance=False,
    ),
    dict(
      testcase_name='training_ghost_masked_no_scale',
      use_running_average=False,
      shape=(6, 3, 2),
      masked=True,
      virtual_batch_size=3,
      use_scale=False,
    ),
    dict(testcase_name='inference', use_running_average=True, shape=(4, 3)),
  )
  def test_check_grads_float64(self, **kwargs):
    self._check_grads_float64(order=1, **kwargs)

  @chex.variants(with_jit=True)
  def test_check_second_order_grads_float64(self):
    self._check_grads_float64((4, 3), order=2, use_running_average=False, unbiased_running_var=True)

  @chex.variants(with_jit=True)
  def test_check_grads_in_epsilon_float64(self):
    # epsilon may be traced, and batch norm is differentiable in it.
    with jax.enable_x64(True):
      x, scale, bias, mean, var = (a.astype(np.float64) for a in _inputs((5, 3)))
      fn = self.variant(
        lambda eps: (
          jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False, epsilon=eps).y
        )
      )
      jax.test_util.check_grads(fn, (0.5,), order=2, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True)
  def test_check_grads_with_axis_name_float64(self):
    # Gradients flow across the shards of synchronized batch norm; the masks
    # are uneven, so shards weigh by their counts.
    mask = _mask((3, 4, 1))
    shard = lambda x, m, *stats: jaxbn.batch_norm(
      x, *stats, use_running_average=False, axis_name='b', mask=m, epsilon=1e-3
    )
    fn = self.variant(
      lambda x, *stats: jax.vmap(shard, (0, 0) + (None,) * 4, axis_name='b')(x, mask, *stats)
    )
    with jax.enable_x64(True):
      args = tuple(a.astype(np.float64) for a in _inputs((3, 4, 2)))
      jax.test_util.check_grads(fn, args, order=1, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_input_gradient_matches_closed_form(self):
    # d/dx of sum(w * y) for y = scale * x_hat + bias, with batch statistics:
    # scale / sigma * (w - mean(w) - x_hat * mean(w * x_hat)).
    x, scale, bias, mean, var = _inputs((7, 3))
    w = np.random.default_rng(5).standard_normal((7, 3))
    eps = 1e-3
    loss = lambda x: jnp.sum(
      w * jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False, epsilon=eps).y
    )
    grad = self.variant(jax.grad(loss))(x)
    x64 = x.astype(np.float64)
    sigma = np.sqrt(x64.var(0) + eps)
    x_hat = (x64 - x64.mean(0)) / sigma
    expected = scale / sigma * (w - w.mean(0) - x_hat * (w * x_hat).mean(0))
    chex.assert_trees_all_close(grad, expected, atol=1e-5, rtol=1e-4)


class VmapTest(chex.TestCase):
  """Axes added by vmap are reduced over only when named by axis_name."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_vmapped_axis_is_not_reduced(self, use_fast_variance):
    # An ensemble of 3 batch norms: each slice has its own batch and stats.
    x, scale, bias, _, _ = _inputs((3, 6, 2, 4))
    rng = np.random.default_rng(1)
    means = rng.standard_normal((3, 4)).astype(np.float32)
    variances = rng.uniform(0.5, 2.0, (3, 4)).astype(np.float32)
    kw = dict(use_running_average=False, unbiased_running_var=True)
    kw.update(use_fast_variance=use_fast_variance)
    one = lambda x, m, v: jaxbn.batch_norm(x, scale, bias, m, v, **kw)
    out = self.variant(jax.vmap(one))(x, means, variances)
    chex.assert_shape(out.y, (3, 6, 2, 4))
    chex.assert_shape([out.mean, out.var], (3, 4))
    loop = [one(x[i], means[i], variances[i]) for i in range(3)]
    chex.assert_trees_all_close(
      tuple(out), tuple(np.stack(a) for a in zip(*loop, strict=True)), atol=1e-6
    )
    ref = [np_batch_norm(x[i], scale, bias, means[i], variances[i], **kw) for i in range(3)]
    chex.assert_trees_all_close(
      tuple(out), tuple(np.stack(a) for a in zip(*ref, strict=True)), atol=1e-5, rtol=1e-5
    )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='fast', use_fast_variance=True),
    dict(testcase_name='two_pass', use_fast_variance=False),
    dict(testcase_name='masked', use_fast_variance=True, masked=True),
  )
  def test_axis_name_reduces_over_vmapped_axis(self, use_fast_variance, masked=False):
    # vmap over 3 shards of 4 examples each == one batch of 12 examples.
    x, scale, bias, mean, var = _inputs((3, 4, 2, 5))
    # Uneven masks: shards with fewer selected examples weigh less.
    mask = _mask((3, 4, 1, 1)) if masked else None
    kw = dict(use_running_average=False, unbiased_running_var=True)
    kw.update(use_fast_variance=use_fast_variance)
    shard = lambda x, m: jaxbn.batch_norm(x, scale, bias, mean, var, axis_name='b', mask=m, **kw)
    out = self.variant(jax.vmap(shard, axis_name='b'))(x, mask)
    flat_mask = None if mask is None else mask.reshape(12, 1, 1)
    whole = jaxbn.batch_norm(x.reshape(12, 2, 5), scale, bias, mean, var, mask=flat_mask, **kw)
    chex.assert_trees_all_close(out.y, whole.y.reshape(3, 4, 2, 5), atol=1e-5)
    chex.assert_shape([out.mean, out.var], (3, 5))  # one copy per vmapped shard
    chex.assert_trees_all_close(
      (out.mean, out.var),
      (np.broadcast_to(whole.mean, (3, 5)), np.broadcast_to(whole.var, (3, 5))),
      atol=1e-6,
    )
    expected = np_batch_norm(x.reshape(12, 2, 5), scale, bias, mean, var, mask=flat_mask, **kw)
    chex.assert_trees_all_close(tuple(whole), expected, atol=1e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_example_vmap_with_axis_name(self):
    # vmap over single dense examples: each slice holds one value per feature,
    # which is fine (no error) because axis_name averages over the batch.
    x, scale, bias, mean, var = _inputs((6, 3))
    example = lambda x: jaxbn.batch_norm(
      x, scale, bias, mean, var, use_running_average=False, axis_name='batch'
    )
    out = self.variant(jax.vmap(example, axis_name='batch'))(x)
    expected = np_batch_norm(x, scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close(out.y, expected[0], atol=1e-5)
    chex.assert_trees_all_close(out.mean, np.broadcast_to(expected[1], (6, 3)), atol=1e-6)
    chex.assert_trees_all_close(out.var, np.broadcast_to(expected[2], (6, 3)), atol=1e-6)


# ---------------------------------------------------------------------------
# Numerics.


def _assert_within_float32_rounding(got, want, magnitude):
  """``(y, mean, var)`` of data with a large mean, within what float32 rounding allows.

  ``ulp`` is the spacing of float32 numbers at the data's ``magnitude``. A
  float32 sum of n such values is within a few ulps of the sum (XLA's own
  reduction over (64, 3, 3, 2) values of mean 1e4: mean errors up to 4.5
  ulps in 30 seeds; `jaxbn.statistics.feature_sum`'s order: up to 1.9), so the mean is
  allowed ``mean_bound = 4 * ulp``; ``x - mean`` is then exact (the two are within a
  factor 2), so the variance is off by the mean's error squared plus the
  rounding of a float32 sum of squares (a few parts in 1e7: 16 float32
  epsilons allowed), and ``y`` by the mean's error over the standard
  deviation.
  """
  (y, mean, var), (y64, mean64, var64) = got, want
  mean_bound = 4 * float(np.spacing(np.float32(magnitude)))
  float32_eps = float(np.finfo(np.float32).eps)
  np.testing.assert_array_less(np.abs(np.asarray(mean, np.float64) - mean64), mean_bound)
  var_bound = mean_bound**2 + 16 * float32_eps * var64
  np.testing.assert_array_less(np.abs(np.asarray(var, np.float64) - var64), var_bound)
  y_bound = mean_bound / np.sqrt(var64) + 16 * float32_eps * np.abs(y64)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - y64), y_bound)


class NumericsTest(chex.TestCase):
  """Accurate, non-negative variance for large means; float32 stats for half inputs."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(use_fast_variance=(True, False), seed=(0, 1, 2))
  def test_large_mean_variance_is_accurate(self, use_fast_variance, seed):
    rng = np.random.default_rng(seed)
    x = (1e4 + rng.standard_normal((64, 3, 3, 2))).astype(np.float32)
    mean64, var64, _ = _np_stats(x)
    # The naive one-pass E[x^2] - E[x]^2 in float32 is useless on this input
    # (flax issue 1491), so the test below is not vacuous.
    naive = np.square(x).mean((0, 1, 2)) - np.square(x.mean((0, 1, 2)))
    self.assertGreater(np.abs(naive / var64 - 1).max(), 1e-2)

    fn = self.variant(functools.partial(_batch_stats, use_fast_variance=use_fast_variance))
    y, mean, var = fn(x)
    y_ref = (x.astype(np.float64) - mean64) / np.sqrt(var64 + 1e-5)
    _assert_within_float32_rounding((y, mean, var), (y_ref, mean64, var64), magnitude=1e4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    data_mean=(0.0, 1e4),
    running_mean_offset=(0.0, 1.0, 1.9, 2.1, 30.0, 1e4, -1e4),
  )
  def test_batch_statistics_do_not_depend_on_the_running_mean(self, data_mean, running_mean_offset):
    # The fast variance is shifted by the running mean (in units of the batch
    # standard deviation away from the batch mean here); beyond 2 standard
    # deviations a second pass takes over.
    rng = np.random.default_rng(0)
    spread = np.array([1.0, 0.5, 100.0], np.float32)
    x = (data_mean + spread * rng.standard_normal((64, 4, 3))).astype(np.float32)
    mean64, var64, _ = _np_stats(x)
    std64 = np.sqrt(var64)
    running_mean = (mean64 + running_mean_offset * std64).astype(np.float32)
    fn = self.variant(_batch_stats)
    y, mean, var = fn(x, running_mean)
    # Exact up to the rounding of x - running_mean: ulps of the larger of |x|
    # and |running_mean|, which x itself has when the running mean is near.
    largest = np.maximum(np.abs(x).max((0, 1)), np.abs(running_mean)).astype(np.float32)
    ulp = np.spacing(largest).astype(np.float64)
    mean_error = np.abs(np.asarray(mean, np.float64) - mean64)
    np.testing.assert_array_less(mean_error, 4 * ulp + 1e-6 * std64)
    var_error = np.abs(np.asarray(var, np.float64) - var64)
    np.testing.assert_array_less(var_error, 2e-5 * var64 + 2 * std64 * ulp)
    chex.assert_trees_all_close(y, (x - mean64) / np.sqrt(var64 + 1e-5), atol=5e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_running_mean_has_no_gradient_in_training(self):
    x, scale, bias, mean, var = _inputs((16, 3, 3, 4))
    weights = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    loss = lambda x, mean: jnp.sum(
      weights * jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False).y
    )
    grad = self.variant(jax.grad(loss, (0, 1)))
    dx, dmean = grad(x, mean)
    chex.assert_trees_all_close(dmean, np.zeros_like(mean))
    dx_far, _ = grad(x, mean + 100.0)  # the other branch of the variance
    chex.assert_trees_all_close(dx_far, dx, atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('fast_1e4', True, 1e4),
    ('two_pass_1e4', False, 1e4),
    ('fast_0.1', True, 0.1),
    ('two_pass_0.1', False, 0.1),
  )
  def test_constant_input_has_zero_variance(self, use_fast_variance, value):
    x = np.full((8, 5, 3), value, np.float32)
    bias = np.array([1.0, -2.0, 3.0], np.float32)
    fn = self.variant(
      lambda x: jaxbn.batch_norm(
        x,
        jnp.ones(3),
        bias,
        jnp.zeros(3),
        jnp.ones(3),
        use_running_average=False,
        momentum=0.0,
        use_fast_variance=use_fast_variance,
      )
    )
    y, mean, var = fn(x)
    chex.assert_tree_all_finite(y)
    self.assertTrue(np.all(np.asarray(var) >= 0), var)
    chex.assert_trees_all_close(var, np.zeros(3), atol=1e-6 * value**2)
    chex.assert_trees_all_close(mean, np.full(3, value), rtol=1e-6)
    chex.assert_trees_all_close(y, np.broadcast_to(bias, x.shape), atol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_near_constant_input_variance_is_not_negative(self, use_fast_variance):
    # Values one ulp apart around 1e4 (and 1e4 + 0.1): round-off territory.
    rng = np.random.default_rng(0)
    base = np.array([1e4, 1e4 + 0.1, -3e3], np.float32)
    steps = rng.integers(0, 2, (64, 3)).astype(np.float32)
    x = (base + steps * np.spacing(base)).astype(np.float32)
    fn = self.variant(functools.partial(_batch_stats, use_fast_variance=use_fast_variance))
    y, _, var = fn(x)
    self.assertTrue(np.all(np.asarray(var) >= 0), var)
    chex.assert_tree_all_finite(y)
    # Round-off of a float32 mean of 1e4 is ~1e-3, so ~1e-5 in the variance.
    chex.assert_trees_all_close(var, _np_stats(x)[1], atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('bfloat16', jnp.bfloat16, 2e-2), ('float16', jnp.float16, 5e-3))
  def test_half_precision_input(self, dtype, tol):
    x32, scale, bias, mean, var = _inputs((16, 3, 3, 4))
    x = jnp.asarray(x32, dtype)
    fn = self.variant(lambda *a: jaxbn.batch_norm(*a, use_running_average=False, momentum=0.9))
    out = fn(x, scale, bias, mean, var)
    # Statistics and running averages in float32; float32 params promote y.
    self.assertEqual(out.mean.dtype, jnp.float32)
    self.assertEqual(out.var.dtype, jnp.float32)
    self.assertEqual(out.y.dtype, jnp.float32)
    # Exactly the float32 computation on the same (rounded) values...
    same = fn(x.astype(jnp.float32), scale, bias, mean, var)
    chex.assert_trees_all_close(tuple(out), tuple(same), atol=1e-6, rtol=1e-6)
    # ...and close to the float64 reference on the unrounded input.
    expected = np_batch_norm(x32, scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close(tuple(out), expected, atol=tol, rtol=tol)

    # Without float32 parameters the output keeps the input dtype.
    bare = self.variant(
      lambda x: jaxbn.batch_norm(x, None, None, mean, var, use_running_average=False)
    )(x)
    self.assertEqual(bare.y.dtype, dtype)
    self.assertEqual(bare.mean.dtype, jnp.float32)
    expected = np_batch_norm(x32, None, None, mean, var, use_running_average=False)
    chex.assert_trees_all_close(bare.y.astype(jnp.float32), expected[0], atol=4 * tol, rtol=tol)


class MaskTest(chex.TestCase):
  """Only selected entries enter the statistics, whatever the others hold."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_mask_equals_selected_rows(self, use_fast_variance):
    x, scale, bias, mean, var = _inputs((8, 2, 3))
    rows = np.array([0, 1, 1, 0, 1, 1, 0, 1], bool)
    kw = dict(use_running_average=False, unbiased_running_var=True)
    kw.update(use_fast_variance=use_fast_variance)
    fn = self.variant(lambda x, m: jaxbn.batch_norm(x, scale, bias, mean, var, mask=m, **kw))
    masked = fn(x, rows.reshape(8, 1, 1))
    selected = fn(x[rows], None)
    chex.assert_trees_all_close((masked.mean, masked.var), (selected.mean, selected.var), atol=1e-6)
    chex.assert_trees_all_close(masked.y[rows], selected.y, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('fast_nan', True, np.nan),
    ('two_pass_nan', False, np.nan),
    ('fast_inf', True, np.inf),
    ('fast_huge', True, 1e30),
    ('two_pass_huge', False, 1e30),
  )
  def test_masked_out_garbage_is_ignored(self, use_fast_variance, garbage):
    # Padding (here the first example, as with left-padding) may hold anything.
    x, scale, bias, mean, var = _inputs((6, 3))
    rows = np.array([0, 1, 1, 1, 0, 1], bool)
    padded = np.where(rows[:, None], x, np.float32(garbage))
    fn = self.variant(
      lambda x, m: jaxbn.batch_norm(
        x,
        scale,
        bias,
        mean,
        var,
        mask=m,
        use_running_average=False,
        use_fast_variance=use_fast_variance,
      )
    )
    out = fn(padded, rows[:, None])
    expected = np_batch_norm(x[rows], scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close((out.mean, out.var), expected[1:], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out.y[rows], expected[0], atol=1e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fast', True), ('two_pass', False))
  def test_large_mean_with_zero_padding(self, use_fast_variance):
    # Zero padding in front of data with mean 1e4: the padding must not enter
    # the statistics, nor the check of the shift's precision.
    rng = np.random.default_rng(0)
    data = (1e4 + rng.standard_normal((64, 2))).astype(np.float32)
    x = np.concatenate([np.zeros((4, 2), np.float32), data])
    rows = np.arange(68) >= 4
    fn = self.variant(lambda x, m: _batch_stats(x, mask=m, use_fast_variance=use_fast_variance))
    y, mean, var = fn(x, rows[:, None])
    mean64, var64, _ = _np_stats(data)
    y_ref = (data.astype(np.float64) - mean64) / np.sqrt(var64 + 1e-5)
    _assert_within_float32_rounding((y[4:], mean, var), (y_ref, mean64, var64), magnitude=1e4)


# ---------------------------------------------------------------------------
# Cumulative average.


class CumulativeAverageTest(chex.TestCase):
  """momentum=None: after k batches the running stats are the mean of the k batch stats."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('biased', False), ('unbiased', True))
  def test_mean_of_batch_statistics(self, unbiased_running_var):
    rng = np.random.default_rng(0)
    step = self.variant(
      lambda x, mean, var, count: jaxbn.batch_norm(
        x,
        None,
        None,
        mean,
        var,
        use_running_average=False,
        momentum=None,
        count=count,
        unbiased_running_var=unbiased_running_var,
      )
    )
    # The initial values are forgotten: count=0 gives the first batch weight 1.
    mean = rng.standard_normal(3).astype(np.float32)
    var = rng.uniform(0.5, 2, 3).astype(np.float32)
    batch_means, batch_vars = [], []
    for k, n in enumerate([4, 6, 4, 5, 4]):
      x = ((k + 1) * rng.standard_normal((n, 2, 3)) + k).astype(np.float32)
      _, mean, var = step(x, mean, var, k)
      m, v, count = _np_stats(x)
      batch_means.append(m)
      batch_vars.append(v * count / (count - 1) if unbiased_running_var else v)
      chex.assert_trees_all_close(
        (mean, var), (np.mean(batch_means, 0), np.mean(batch_vars, 0)), rtol=1e-5
      )


class ComplexTest(chex.TestCase):
  """Complex inputs, as Flax normalizes them: complex mean, real variance E|x - mean|^2."""

  def _data(self, shape=(6, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    # Means far from 0 in both parts, so that the shifted moments matter.
    return rng.normal(size=shape) + 1j * rng.normal(size=shape) + (3.0 - 2.0j)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(use_fast_variance=(True, False), masked=(False, True))
  def test_matches_numpy(self, use_fast_variance, masked):
    x = self._data()
    rng = np.random.default_rng(1)
    scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    mask_shape = (*x.shape[:2], 1)
    mask = rng.random(mask_shape) < 0.6 if masked else np.ones(mask_shape, bool)
    running_mean, running_var = np.zeros(3), np.ones(3)
    with jax.enable_x64(True):
      y, mean, var = self.variant(
        lambda x, mask: jaxbn.batch_norm(
          x,
          scale,
          bias,
          running_mean,
          running_var,
          use_running_average=False,
          momentum=0.9,
          use_fast_variance=use_fast_variance,
          mask=mask,
        )
      )(x, mask)
    selected = np.broadcast_to(mask, x.shape)
    m = (x * selected).sum((0, 1)) / selected.sum((0, 1))
    v = (np.abs(x - m) ** 2 * selected).sum((0, 1)) / selected.sum((0, 1))
    self.assertEqual((y.dtype, mean.dtype, var.dtype), (np.complex128, np.complex128, np.float64))
    tol = dict(rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(np.asarray(y), (x - m) / np.sqrt(v + 1e-5) * scale + bias, **tol)
    chex.assert_trees_all_close(
      (np.asarray(mean), np.asarray(var)), (0.1 * m, 0.9 + 0.1 * v), **tol
    )

  def test_inference_and_the_running_statistics(self):
    x = self._data().astype(np.complex64)
    mean, var = np.array([1 + 1j, 0, -2j], np.complex64), np.array([0.5, 1.0, 2.0], np.float32)
    y, new_mean, new_var = jaxbn.batch_norm(x, None, None, mean, var, use_running_average=True)
    chex.assert_trees_all_close(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-6)
    chex.assert_trees_all_equal((new_mean, new_var), (mean, var))

  def test_renormalization_is_refused(self):
    with self.assertRaisesRegex(TypeError, r'renorm_clip.*complex64.*renorm_clip=None'):
      jaxbn.batch_norm(
        self._data().astype(np.complex64),
        None,
        None,
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
        use_running_average=False,
        renorm_clip=(3.0, 5.0),
      )


# ---------------------------------------------------------------------------
# One value per feature: Flax's result, with a warning.


def _single_value_warnings(record):
  return [w for w in record if issubclass(w.category, jaxbn.SingleValueWarning)]


class SingleValueTest(parameterized.TestCase):
  """Training on one value per feature computes what Flax does and warns once per trace."""

  def _inputs(self, shape, axis):
    """x far from the running mean (so that a rounded mean would show), and the stats."""
    x, scale, bias, mean, var = _inputs(shape, axis)
    return 100.0 * x, scale, bias, mean, var

  @parameterized.named_parameters(
    ('dense', (1, 3), -1),
    ('rank1', (3,), -1),
    ('nhwc_1x1', (1, 1, 1, 3), -1),
    ('nchw_1x1', (1, 3, 1, 1), 1),
  )
  def test_output_is_the_bias_and_the_running_stats_move_to_the_value_and_0(self, shape, axis):
    x, scale, bias, mean, var = self._inputs(shape, axis)
    message = rf'^jaxbn\.batch_norm .* shape {re.escape(str(shape))} .*single value per feature'
    with self.assertWarnsRegex(jaxbn.SingleValueWarning, message) as caught:
      y, new_mean, new_var = jaxbn.batch_norm(
        x, scale, bias, mean, var, use_running_average=False, axis=axis, momentum=0.75
      )
    self.assertEqual(caught.filename, __file__)  # the caller's line, for -W filters by module
    keep = _split_axes(shape, axis)[3]
    # Exactly the bias, as Flax: the value is its own mean, its variance 0.
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(keep), shape))
    value = x.reshape(3)
    np.testing.assert_allclose(new_mean, 0.75 * mean + 0.25 * value, rtol=1e-6)
    np.testing.assert_allclose(new_var, 0.75 * var, rtol=1e-6)

  @parameterized.named_parameters(('ema', 0.75, None), ('cumulative', None, 3))
  def test_unbiased_running_var_of_one_value_is_carried_over(self, momentum, count):
    x, scale, bias, mean, var = self._inputs((1, 3), -1)
    with self.assertWarns(jaxbn.SingleValueWarning):
      _, new_mean, new_var = jaxbn.batch_norm(
        x,
        scale,
        bias,
        mean,
        var,
        use_running_average=False,
        momentum=momentum,
        count=count,
        unbiased_running_var=True,
      )
    np.testing.assert_array_equal(new_var, var)  # n / (n - 1) with n = 1 has no value
    want_mean = 0.75 * mean + 0.25 * x[0] if count is None else (3 * mean + x[0]) / 4
    np.testing.assert_allclose(new_mean, want_mean, rtol=1e-6)

  def test_unbiased_running_var_of_a_feature_masked_to_one_value_is_carried_over(self):
    x, scale, bias, mean, var = _inputs((4, 3))
    mask = np.ones((4, 3), bool)
    mask[1:, 0] = False  # feature 0: one value; features 1 and 2: four
    _, new_mean, new_var = jaxbn.batch_norm(
      x, scale, bias, mean, var, use_running_average=False, momentum=0.5, mask=mask,
      unbiased_running_var=True,
    )  # fmt: skip
    _, want_mean, want_var = np_batch_norm(
      x, scale, bias, mean, var, use_running_average=False, momentum=0.5,
      unbiased_running_var=True,
    )  # fmt: skip
    np.testing.assert_allclose(new_mean[0], 0.5 * mean[0] + 0.5 * x[0, 0], rtol=1e-6)
    np.testing.assert_array_equal(new_var[0], var[0])
    np.testing.assert_allclose(new_mean[1:], want_mean[1:], rtol=1e-5)
    np.testing.assert_allclose(new_var[1:], want_var[1:], rtol=1e-5)

  def test_warned_once_per_trace_under_jit_and_grad(self):
    x, scale, bias, mean, var = self._inputs((1, 3), -1)
    loss = lambda x: jnp.sum(
      jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False).y ** 2
    )
    step = jax.jit(jax.value_and_grad(loss))
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter('always')
      _, grad = step(x)
      step(x + 1.0)  # the same trace: no new warning
      self.assertLen(_single_value_warnings(record), 1)
      step(x.reshape(1, 1, 3))  # a new shape, a new trace
      self.assertLen(_single_value_warnings(record), 2)
    # y = bias whatever x is; the two terms of the gradient, each about
    # scale * 2 * bias / sqrt(epsilon) ~ 600, cancel to rounding.
    np.testing.assert_allclose(grad, np.zeros((1, 3)), atol=1e-4)

  def test_axis_name_counts_the_values_across_the_named_axis(self):
    x, scale, bias, mean, var = self._inputs((1, 3), -1)
    call = lambda x: jaxbn.batch_norm(
      x, scale, bias, mean, var, use_running_average=False, axis_name='batch'
    )
    with self.assertWarns(jaxbn.SingleValueWarning):
      y, _, _ = jax.vmap(call, axis_name='batch')(x[None])  # one device, one value
    np.testing.assert_array_equal(y[0], np.broadcast_to(bias, (1, 3)))
    # Three examples of one value each, averaged across the axis: no warning.
    xs = np.concatenate([x, x + 1.0, x - 1.0])[:, None]
    out = jax.vmap(call, axis_name='batch')(xs)
    want = np_batch_norm(xs[:, 0], scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close(out.y[:, 0], want[0], atol=1e-5)


# ---------------------------------------------------------------------------
# Errors.


class ErrorTest(parameterized.TestCase):
  """Invalid arguments fail early with a message naming the problem."""

  def _call(self, x=None, *, scale=None, bias=None, mean=None, var=None, **kwargs):
    x = np.ones((4, 3), np.float32) if x is None else x
    kwargs.setdefault('use_running_average', False)
    return jaxbn.batch_norm(
      x,
      scale,
      bias,
      np.zeros(3, np.float32) if mean is None else mean,
      np.ones(3, np.float32) if var is None else var,
      **kwargs,
    )

  @parameterized.named_parameters(
    ('positive', 2), ('negative', -3), ('in_tuple', (0, 5)), ('in_tuple_negative', (-3, 1))
  )
  def test_axis_out_of_range(self, axis):
    with self.assertRaisesRegex(ValueError, r'axis=.*out of range.*rank 2'):
      self._call(axis=axis)

  def test_repeated_axis(self):
    with self.assertRaisesRegex(ValueError, r'same axis twice'):
      self._call(np.ones((4, 3, 3), np.float32), axis=(1, -2))

  @parameterized.parameters('scale', 'bias', 'mean', 'var')
  def test_mismatched_feature_shape(self, name):
    with self.assertRaisesRegex(ValueError, rf'^{name} has shape \(4,\).*needs shape \(3,\)'):
      self._call(**{name: np.ones(4, np.float32)})

  def test_stats_of_the_wrong_feature_axis(self):
    # (N, C, H, W) input but statistics sized for the last axis (axis left at -1).
    x = np.ones((2, 3, 5, 5), np.float32)
    with self.assertRaisesRegex(ValueError, r'mean has shape \(3,\).*needs shape \(5,\)'):
      self._call(x)

  @parameterized.parameters(np.int32, np.uint8, np.bool_)
  def test_non_float_input(self, dtype):
    with self.assertRaisesRegex(TypeError, r'floating-point.*' + np.dtype(dtype).name):
      self._call(np.ones((4, 3), dtype))

  @parameterized.parameters(1.5, -0.1, 90)
  def test_momentum_out_of_range(self, momentum):
    with self.assertRaisesRegex(ValueError, r'momentum=.* outside \[0, 1\]'):
      self._call(momentum=momentum)

  def test_cumulative_average_needs_count(self):
    with self.assertRaisesRegex(ValueError, r'momentum=None.*needs count'):
      self._call(momentum=None)

  def test_single_example_is_fine_when_not_degenerate(self):
    # Inference mode, or a conv feature map (several values per channel): no
    # SingleValueWarning, which pytest's filterwarnings=error would raise.
    self._call(np.ones((1, 3), np.float32), use_running_average=True)
    self._call(np.ones((1, 2, 2, 3), np.float32))

  def test_errors_raised_under_jit(self):
    fn = jax.jit(lambda x: self._call(x, momentum=2.0))
    with self.assertRaisesRegex(ValueError, r'momentum'):
      fn(np.ones((4, 3), np.float32))


# ---------------------------------------------------------------------------
# Properties.

_SHAPES_AND_AXES = (
  ((2, 1), -1),
  ((5, 3), -1),
  ((3, 2, 2), -1),
  ((2, 3, 2, 2), 1),
  ((4, 2, 3), (1, 2)),
)


def _floats(low, high):
  # No subnormals: XLA on CPU flushes them to zero.
  return st.floats(low, high, width=32, allow_subnormal=False)


@st.composite
def batches(draw, min_std=0.5, bound=10.0):
  """(x, axis): a float32 batch with at least 2 values and std >= min_std per feature."""
  shape, axis = draw(st.sampled_from(_SHAPES_AND_AXES))
  x = draw(hnp.arrays(np.float32, shape, elements=_floats(-bound, bound)))
  _, red, _, _ = _split_axes(shape, axis)
  hypothesis.assume(np.all(x.astype(np.float64).std(red) >= min_std))
  return x, axis


def _per_feature(draw, x, axis, elements):
  _, _, fshape, _ = _split_axes(x.shape, axis)
  return draw(hnp.arrays(np.float32, fshape, elements=elements))


def _normalise(x, axis, epsilon, mean=None, var=None, scale=None, bias=None, train=True):
  """jit-compiled once per shape and axis (the function is not recreated)."""
  _, _, fshape, _ = _split_axes(x.shape, axis)
  mean = np.zeros(fshape, np.float32) if mean is None else mean
  var = np.ones(fshape, np.float32) if var is None else var
  return _normalise_jit(x, scale, bias, mean, var, epsilon, axis=axis, train=train)


def _normalise_impl(x, scale, bias, mean, var, epsilon, *, axis, train):
  return jaxbn.batch_norm(
    x, scale, bias, mean, var, use_running_average=not train, axis=axis, epsilon=epsilon
  )


_normalise_jit = jax.jit(_normalise_impl, static_argnames=('axis', 'train'))


@jax.jit(static_argnames=('axis', 'use_fast_variance'))
def _batch_statistics_jit(x, *, axis, use_fast_variance):
  """Training mode with momentum 0: returns (y, batch mean, batch var)."""
  _, _, fshape, _ = _split_axes(x.shape, axis)
  stats = jnp.zeros(fshape)
  return jaxbn.batch_norm(
    x,
    None,
    None,
    stats,
    stats,
    use_running_average=False,
    axis=axis,
    momentum=0.0,
    use_fast_variance=use_fast_variance,
  )


class PropertyTest(parameterized.TestCase):
  """Invariants over random inputs (hypothesis)."""

  @hypothesis.given(batches(), st.sampled_from([1e-12, 1e-5, 1e-2]))
  def test_training_output_is_standardised(self, batch, epsilon):
    x, axis = batch
    y = np.asarray(_normalise(x, axis, epsilon).y, np.float64)
    _, red, _, _ = _split_axes(x.shape, axis)
    s2 = x.astype(np.float64).var(red)
    chex.assert_trees_all_close(y.mean(red), np.zeros_like(s2), atol=1e-5)
    # Variance 1, shrunk by epsilon: var(y) = s2 / (s2 + epsilon).
    chex.assert_trees_all_close(y.var(red), s2 / (s2 + epsilon), rtol=1e-3)

  @hypothesis.given(st.data())
  def test_invariant_to_per_feature_shift_and_positive_scale(self, data):
    x, axis = data.draw(batches())
    _, _, _, keep = _split_axes(x.shape, axis)
    shift = _per_feature(data.draw, x, axis, _floats(-10, 10)).reshape(keep)
    factor = _per_feature(data.draw, x, axis, _floats(0.125, 8)).reshape(keep)
    y = _normalise(x, axis, 1e-12).y
    chex.assert_trees_all_close(_normalise(x + shift, axis, 1e-12).y, y, atol=1e-3, rtol=1e-3)
    chex.assert_trees_all_close(_normalise(x * factor, axis, 1e-12).y, y, atol=1e-3, rtol=1e-3)

  @hypothesis.given(st.data())
  def test_equivariant_to_permuting_the_batch(self, data):
    x, axis = data.draw(batches())
    perm = np.asarray(data.draw(st.permutations(range(x.shape[0]))))
    out, permuted = _normalise(x, axis, 1e-5), _normalise(x[perm], axis, 1e-5)
    chex.assert_trees_all_close(permuted.y, np.asarray(out.y)[perm], atol=1e-4)
    chex.assert_trees_all_close((permuted.mean, permuted.var), (out.mean, out.var), atol=1e-5)

  @hypothesis.given(st.data())
  def test_inference_is_affine_per_feature(self, data):
    x, axis = data.draw(batches(min_std=0.0))
    _, red, fshape, keep = _split_axes(x.shape, axis)
    mean = _per_feature(data.draw, x, axis, _floats(-10, 10))
    var = _per_feature(data.draw, x, axis, _floats(2**-6, 64))
    scale = _per_feature(data.draw, x, axis, _floats(-10, 10))
    bias = _per_feature(data.draw, x, axis, _floats(-10, 10))
    epsilon = data.draw(st.sampled_from([1e-12, 1e-5, 1e-2]))
    f = lambda x: _normalise(x, axis, epsilon, mean, var, scale, bias, train=False)
    # Two points give the affine map y = a * x + b of each feature...
    b = np.asarray(f(np.zeros_like(x)).y, np.float64)
    a = np.asarray(f(np.ones_like(x)).y, np.float64) - b
    for coefficient in (a, b):  # ...the same at every position...
      chex.assert_trees_all_equal(
        coefficient, np.broadcast_to(coefficient.take([0], red[0]), x.shape)
      )
    mean64, var64, bias64 = (v.astype(np.float64).reshape(keep) for v in (mean, var, bias))
    slope = scale.astype(np.float64).reshape(keep) / np.sqrt(var64 + epsilon)
    # float32 round-off, relative to the magnitudes of the terms of y.
    # (Plus a tiny floor: results below float32's normal range flush to 0.)
    tol = lambda x: (
      1e-5 * (np.abs(slope) * (np.abs(x) + np.abs(mean64) + 1) + np.abs(bias64)) + 1e-30
    )
    _assert_within(a, np.broadcast_to(slope, x.shape), tol(0.0))
    # ...and it maps every input.
    out = f(x)
    _assert_within(out.y, a * x + b, tol(x))
    _assert_within(out.y, slope * (x - mean64) + bias64, tol(x))
    # The running statistics are returned unchanged.
    chex.assert_trees_all_equal((out.mean, out.var), (mean, var))
    chex.assert_shape([out.mean, out.var], fshape)

  @hypothesis.given(batches(min_std=0.0, bound=1e4))
  def test_variance_is_never_negative(self, batch):
    # Any bounded input, including constant ones: var >= 0 and finite output.
    x, axis = batch
    # float32 round-off of the variance: a few ulps of the largest square.
    atol = 1e-5 * np.square(x, dtype=np.float64).max() + 1e-6
    for use_fast_variance in (True, False):
      out = _batch_statistics_jit(x, axis=axis, use_fast_variance=use_fast_variance)
      self.assertTrue(np.all(np.asarray(out.var) >= 0), out.var)
      chex.assert_tree_all_finite(tuple(out))
      chex.assert_trees_all_close(out.var, _np_stats(x, axis)[1], atol=atol, rtol=1e-3)


# ---------------------------------------------------------------------------
# Docstring examples.


if __name__ == '__main__':
  absltest.main()
