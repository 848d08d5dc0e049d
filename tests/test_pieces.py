"""Each piece that `jaxbn.batch_norm` composes, tested on its own against float64 references.

The references are written from the equations, independent of jaxbn: float64
NumPy, and for the normalization's custom derivative, autodiff of the formula
in float64 jnp. A mistake in one piece fails here by name, not only somewhere
in `batch_norm`'s output. Shapes are small: these tests are about the formulas.
"""

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax import linen as nn
from jax import lax

import jaxbn
import jaxbn._functional
from jaxbn import _ghost as ghost
from jaxbn import _normalize as normalize
from jaxbn import _renorm as renorm
from jaxbn import _running as running
from jaxbn import statistics

# ---------------------------------------------------------------------------
# Float64 NumPy references.


def _np_moments(x, axes, mask=None):
  """Float64 (mean, biased var, n) per feature over ``axes``, of the True entries of ``mask``."""
  x = np.asarray(x, np.float64)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask, np.float64), x.shape)
  n = w.sum(axes, keepdims=True)
  mean = (w * x).sum(axes, keepdims=True) / n
  var = (w * (x - mean) ** 2).sum(axes, keepdims=True) / n
  return mean.squeeze(axes), var.squeeze(axes), n.squeeze(axes)


def _data(shape, loc=3.0, seed=0):
  """Float32 data whose features have distinct means (around ``loc``) and spreads."""
  rng = np.random.default_rng(seed)
  offsets = loc + rng.uniform(-1.0, 1.0, shape[-1:])
  spreads = rng.uniform(0.5, 2.0, shape[-1:])
  return (offsets + spreads * rng.standard_normal(shape)).astype(np.float32)


def _mask(shape, seed=1):
  """A boolean mask that drops about 40% of the entries, keeping at least 2 per feature."""
  mask = np.random.default_rng(seed).random(shape) < 0.6
  mask[:2] = True
  assert not mask.all()
  return mask


# ---------------------------------------------------------------------------
# statistics.py


class BatchStatisticsTest(chex.TestCase):
  """`batch_statistics`: the shifted one-pass and the two-pass formulas, masked or not."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='two_pass', use_fast_variance=False, shift=None),
    dict(testcase_name='one_pass_unshifted', use_fast_variance=True, shift=None),
    dict(testcase_name='one_pass_near_shift', use_fast_variance=True, shift=3.0),
    # Many standard deviations from the mean: the second pass takes over.
    dict(testcase_name='one_pass_far_shift', use_fast_variance=True, shift=-40.0),
    dict(testcase_name='two_pass_masked', use_fast_variance=False, shift=None, masked=True),
    dict(testcase_name='one_pass_masked', use_fast_variance=True, shift=3.0, masked=True),
  )
  def test_matches_float64(self, use_fast_variance, shift, masked=False):
    x = _data((6, 3, 4))
    axes = (0, 1)
    mask = _mask((6, 3, 1)) if masked else None
    if shift is not None:
      shift = np.full((1, 1, 4), shift, np.float32)
    stats = self.variant(
      lambda x, shift, mask: statistics.batch_statistics(
        x, axes, use_fast_variance=use_fast_variance, shift=shift, mask=mask
      )
    )
    mean, var, _ = _np_moments(x, axes, mask)
    chex.assert_trees_all_close(stats(x, shift, mask), (mean, var), atol=1e-5, rtol=1e-5)

  def test_shifted_one_pass_equals_two_pass(self):
    # A large mean: unshifted one-pass moments would lose most digits of var.
    x = _data((16, 4), loc=1000.0)
    one_pass = statistics.batch_statistics(x, (0,), shift=x.mean(0, keepdims=True))
    two_pass = statistics.batch_statistics(x, (0,), use_fast_variance=False)
    chex.assert_trees_all_close(one_pass, two_pass, atol=0.0, rtol=1e-5)

  def test_masked_means_and_count(self):
    x, mask = _data((6, 3, 4)), _mask((6, 3, 1))
    means = statistics.masked_means((x, x**2), (0, 1), mask)
    n = statistics.value_count(x, (0, 1), mask)
    w = np.broadcast_to(mask, x.shape)
    expected_n = w.sum((0, 1))
    expected = [np.where(w, v, 0.0).sum((0, 1)) / expected_n for v in (x, x**2)]
    chex.assert_trees_all_close(means, tuple(expected), rtol=1e-5)
    chex.assert_trees_all_equal(n, expected_n.astype(np.float32))
    chex.assert_trees_all_equal(statistics.value_count(x, (0, 1)), np.float32(18))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    ((32, 4, 4, 6), (0, 1, 2)),  # as (32, 96) rows: k = 16
    ((64, 3, 3, 2), (0, 1, 2)),  # k = 32
    ((48, 16), (0,)),  # k = 4
    ((18, 4), (0,)),  # 16 does not divide 18: summed as it is
    ((6, 5, 4), (0, 2)),  # not all leading axes: summed as it is
  )
  def test_feature_sum_and_its_broadcast(self, shape, axes):
    x = _data(shape)
    total = self.variant(statistics.feature_sum, static_argnums=1)(x, axes)
    chex.assert_trees_all_close(total, x.astype(np.float64).sum(axes), rtol=1e-5)
    # broadcast_features is the broadcast of the kept axes, and its transpose
    # sums over the others.
    v = _data(total.shape)
    broadcast = self.variant(statistics.broadcast_features, static_argnums=(1, 2))
    chex.assert_trees_all_equal(
      broadcast(v, shape, axes), np.broadcast_to(np.expand_dims(v, axes), shape)
    )
    _, transpose = jax.vjp(lambda v: broadcast(v, shape, axes), v)
    chex.assert_trees_all_close(transpose(x)[0], x.astype(np.float64).sum(axes), rtol=1e-5)

  def test_canonicalize_axes(self):
    self.assertEqual(statistics.canonicalize_axes(4, -1), (3,))
    self.assertEqual(statistics.canonicalize_axes(4, (3, -3)), (1, 3))
    with self.assertRaisesRegex(ValueError, 'same axis twice'):
      statistics.canonicalize_axes(4, (1, -3))
    with self.assertRaisesRegex(ValueError, 'out of range'):
      statistics.canonicalize_axes(2, 2)


# ---------------------------------------------------------------------------
# running.py


class RunningAverageTest(chex.TestCase):
  """`ema_update`, `cumulative_update` and `unbiased_variance`, leaf by leaf."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.3, 0.9, 1.0)
  def test_ema_update(self, momentum):
    rng = np.random.default_rng(0)
    old = (rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32))
    batch = (rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32))
    new = self.variant(running.ema_update)(old, batch, momentum)
    # Momentum is the decay: the share of the old value that is kept.
    expected = tuple(
      momentum * np.float64(o) + (1 - momentum) * np.float64(b)
      for o, b in zip(old, batch, strict=True)
    )
    chex.assert_trees_all_close(new, expected, atol=1e-6, rtol=1e-6)

  def test_ema_update_moves_towards_the_batch_by_one_minus_momentum(self):
    new = running.ema_update(np.float32(0.0), np.float32(1.0), 0.9)
    chex.assert_trees_all_close(new, np.float32(0.1), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cumulative_update_is_the_mean_of_the_batches(self):
    x = _data((5, 8, 3))  # 5 batches of 8 examples, 3 features
    batches = [statistics.batch_statistics(x[k], (0,), use_fast_variance=False) for k in range(5)]
    update = self.variant(running.cumulative_update)
    # Whatever the running statistics start at, the first batch replaces them.
    average = (np.full(3, 7.0, np.float32), np.full(3, -2.0, np.float32))
    for count, stats in enumerate(batches):
      average = update(average, stats, count)
    expected = [np.mean([np.float64(b[i]) for b in batches], axis=0) for i in (0, 1)]
    chex.assert_trees_all_close(average, tuple(expected), atol=1e-6, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='unmasked', masked=False),
    dict(testcase_name='masked', masked=True),
  )
  def test_unbiased_variance(self, masked):
    x = _data((6, 3, 4))
    mask = _mask((6, 3, 1)) if masked else None

    @self.variant
    def unbiased(x, mask):
      _, var = statistics.batch_statistics(x, (0, 1), mask=mask)
      return running.unbiased_variance(var, statistics.value_count(x, (0, 1), mask))

    w = np.broadcast_to(np.ones((6, 3, 1), bool) if mask is None else mask, x.shape)
    # Bessel's correction, feature by feature over the selected entries.
    expected = [np.var(np.float64(x[..., f][w[..., f]]), ddof=1) for f in range(4)]
    chex.assert_trees_all_close(unbiased(x, mask), np.array(expected), rtol=1e-5)

  def test_unbiased_variance_of_single_values_is_not_divided_by_zero(self):
    chex.assert_trees_all_equal(
      running.unbiased_variance(np.zeros(2, np.float32), 1.0), np.zeros(2)
    )


# ---------------------------------------------------------------------------
# ghost.py


class GhostBatchTest(chex.TestCase):
  """Virtual batches: consecutive examples per group, statistics per group and their mean."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='dense', shape=(12, 3), virtual_batch_size=3),
    dict(testcase_name='nhwc', shape=(8, 3, 2, 4), virtual_batch_size=2),
    dict(testcase_name='masked', shape=(8, 3, 4), virtual_batch_size=4, masked=True),
  )
  def test_statistics_per_group_and_their_mean(self, shape, virtual_batch_size, masked=False):
    x = _data(shape)
    axes = tuple(range(len(shape) - 1))
    mask = _mask((*shape[:-1], 1)) if masked else None
    groups = ghost.num_groups(shape[0], (len(shape) - 1,), virtual_batch_size)
    self.assertEqual(groups, shape[0] // virtual_batch_size)

    @self.variant
    def group_statistics(x, mask):
      xg, group_axes = ghost.split_batch(x, axes, groups)
      if mask is not None:
        mask, _ = ghost.split_batch(jnp.broadcast_to(mask, x.shape), axes, groups)
      stats = statistics.batch_statistics(xg, group_axes, mask=mask)
      return stats, ghost.mean_over_groups(stats, groups)

    per_group, averaged = group_statistics(x, mask)
    # Group g is examples g * vbs to (g + 1) * vbs - 1, reduced like the whole batch.
    runs = [slice(g * virtual_batch_size, (g + 1) * virtual_batch_size) for g in range(groups)]
    expected = [_np_moments(x[run], axes, None if mask is None else mask[run])[:2] for run in runs]
    expected_mean, expected_var = (np.stack([e[i] for e in expected]) for i in (0, 1))
    chex.assert_trees_all_close(per_group, (expected_mean, expected_var), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
      averaged, (expected_mean.mean(0), expected_var.mean(0)), atol=1e-5, rtol=1e-5
    )

  def test_one_group_leaves_the_batch_alone(self):
    x = _data((6, 4))
    xg, axes = ghost.split_batch(jnp.asarray(x), (0,), 1)
    # No leading group axis: the input keeps its rank.
    chex.assert_shape(xg, (6, 4))
    self.assertEqual(axes, (0,))
    stats = (x[0], x[1])
    self.assertIs(ghost.mean_over_groups(stats, 1), stats)
    chex.assert_shape(ghost.with_group_axis(x[0], 1), (4,))
    self.assertEqual(ghost.num_groups(6, (1,), None), 1)

  def test_per_feature_values_get_a_group_axis(self):
    chex.assert_shape(ghost.with_group_axis(np.ones((3, 4)), 2), (1, 3, 4))
    self.assertIsNone(ghost.with_group_axis(None, 2))

  def test_num_groups_rejects_bad_sizes(self):
    with self.assertRaisesRegex(ValueError, 'does not divide'):
      ghost.num_groups(8, (1,), 3)
    with self.assertRaisesRegex(ValueError, 'feature axis'):
      ghost.num_groups(8, (0,), 2)


# ---------------------------------------------------------------------------
# normalize.py


def _jnp_normalize(x, scale, bias, mean, var, epsilon, *, axes, mask=None, renorm_clip=None):
  """Batch norm written out in jnp, for autodiff: ``(y, batch mean, biased batch var)``."""
  keep = lambda v: jnp.expand_dims(v, axes)
  w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  n = w.sum(axes)
  mu = (w * x).sum(axes) / n
  sigma2 = (w * (x - keep(mu)) ** 2).sum(axes) / n
  x_hat = (x - keep(mu)) / jnp.sqrt(keep(sigma2) + epsilon)
  if renorm_clip is not None:
    rmax, dmax = renorm_clip
    std = jnp.sqrt(var + epsilon)
    r = lax.stop_gradient(jnp.clip(jnp.sqrt(sigma2 + epsilon) / std, 1 / rmax, rmax))
    d = lax.stop_gradient(jnp.clip((mu - mean) / std, -dmax, dmax))
    x_hat = x_hat * keep(r) + keep(d)
  return x_hat * keep(scale) + keep(bias), mu, sigma2


class NormalizeTest(chex.TestCase):
  """`normalize`'s values and closed-form derivatives equal autodiff of the formula."""

  # Under jit only: eagerly, each case compiles every primitive of both derivatives.
  @chex.variants(with_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='nhwc', shape=(4, 3, 2, 3), axes=(0, 1, 2), stat_shape=(3,)),
    dict(testcase_name='masked', shape=(6, 2, 3), axes=(0, 1), stat_shape=(3,), masked=True),
    dict(testcase_name='renorm', shape=(6, 3), axes=(0,), stat_shape=(3,), renorm_clip=(1.2, 0.1)),
    # A leading axis of 2 virtual batches: statistics (2, 3), per-feature values (1, 3).
    dict(testcase_name='groups', shape=(2, 3, 2, 3), axes=(1, 2), stat_shape=(1, 3)),
  )
  def test_values_and_derivatives(self, shape, axes, stat_shape, masked=False, renorm_clip=None):
    rng = np.random.default_rng(0)
    x = 2.0 + 3.0 * rng.standard_normal(shape)
    scale, bias, mean = (rng.standard_normal(stat_shape) for _ in range(3))
    var = rng.uniform(0.5, 2.0, stat_shape)
    mask = _mask(shape[:2] + (1,) * (len(shape) - 2)) if masked else None
    with jax.enable_x64(True):
      args = (x, scale, bias, mean, var, 0.1)
      kwargs = dict(axes=axes, mask=mask, renorm_clip=renorm_clip)
      fn = self.variant(lambda *args: normalize.normalize(*args, **kwargs))
      formula = lambda *args: _jnp_normalize(*args, **kwargs)
      # Forward mode, with tangents for every argument (none may flow from mean or var).
      tangents = tuple(rng.standard_normal(np.shape(a)) for a in args)
      forward = lambda f: jax.jit(lambda args, tangents: jax.jvp(f, args, tangents))
      chex.assert_trees_all_close(
        forward(fn)(args, tangents), forward(formula)(args, tangents), atol=1e-10, rtol=1e-10
      )
      # Reverse mode, with cotangents for y and both statistics.
      cotangents = tuple(rng.standard_normal(np.shape(o)) for o in formula(*args))
      reverse = lambda f: jax.jit(lambda args, cts: jax.vjp(f, *args)[1](cts))
      chex.assert_trees_all_close(
        reverse(fn)(args, cotangents), reverse(formula)(args, cotangents), atol=1e-10, rtol=1e-10
      )

  def test_affine(self):
    x, mean, rstd = _data((5, 3)), np.array([1.0, 2, 3]), np.array([0.5, 1, 2])
    scale, bias, r, d = np.array([2.0, 3, 4]), np.array([-1.0, 0, 1]), 1.5, -0.25
    y = normalize.affine(x, mean, rstd, (0,), scale, bias, r, d)
    expected = ((np.float64(x) - mean) * rstd * r + d) * scale + bias
    chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
      normalize.affine(x, mean, rstd, (0,), None, None), (np.float64(x) - mean) * rstd, rtol=1e-6
    )


# ---------------------------------------------------------------------------
# renorm.py


class RenormTest(chex.TestCase):
  """`renorm_correction` is the paper's r and d, clipped; `renorm_schedule` widens the clip."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='clipped', rmax=1.5, dmax=0.5),
    dict(testcase_name='traced_clip', rmax=np.float32(2.0), dmax=np.float32(1.0)),
    dict(testcase_name='plain_batch_norm', rmax=1.0, dmax=0.0),
  )
  def test_matches_the_paper(self, rmax, dmax):
    # Batch spreads from 1/3 to 3 times the running ones, and means from
    # -2 to 2 running deviations away: inside and outside the bounds both ways.
    running_mean = np.array([0.0, 1.0, -1.0, 2.0, 0.5], np.float32)
    running_var = np.array([1.0, 4.0, 0.25, 1.0, 9.0], np.float32)
    running_std = np.sqrt(np.float64(running_var) + 0.5)
    batch_std = running_std * np.array([3.0, 1.0 / 3.0, 1.2, 0.9, 1.0])
    batch_mean = running_mean + running_std * np.array([2.0, -2.0, 0.3, -0.2, 0.0])
    batch_var = (batch_std**2 - 0.5).astype(np.float32)
    batch_mean = batch_mean.astype(np.float32)
    correction = self.variant(renorm.renorm_correction)
    r, d = correction(batch_mean, batch_var, running_mean, running_var, 0.5, (rmax, dmax))
    # Ioffe (2017), algorithm 1, with sigma = sqrt(var + epsilon).
    sigma_b = np.sqrt(np.float64(batch_var) + 0.5)
    expected_r = np.clip(sigma_b / running_std, 1 / np.float64(rmax), rmax)
    expected_d = np.clip((np.float64(batch_mean) - running_mean) / running_std, -dmax, dmax)
    chex.assert_trees_all_close((r, d), (expected_r, expected_d), atol=1e-6, rtol=1e-5)
    if rmax > 1:  # the bounds are reached in both directions, and not everywhere
      np.testing.assert_allclose(np.asarray(r)[:2], [rmax, 1 / rmax], rtol=1e-6)
      np.testing.assert_allclose(np.asarray(d)[:2], [dmax, -dmax], rtol=1e-6)
      self.assertTrue(np.all(np.abs(np.asarray(d)[2:]) < dmax))

  def test_no_gradient_flows_through_r_and_d(self):
    ones = np.ones(3, np.float32)
    total = lambda *stats: sum(x.sum() for x in renorm.renorm_correction(*stats, 1e-3, (3.0, 5.0)))
    grads = jax.grad(total, argnums=(0, 1, 2, 3))(0.5 * ones, 2 * ones, ones, ones)
    chex.assert_trees_all_equal(grads, (0 * ones,) * 4)

  def test_schedule_widens_linearly(self):
    bounds = [renorm.renorm_schedule(step, 3.0, 5.0, 10) for step in (0, 5, 10, 20)]
    expected = [(1.0, 0.0), (2.0, 2.5), (3.0, 5.0), (3.0, 5.0)]
    chex.assert_trees_all_close(bounds, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# The public API and the docstring examples.


class PublicApiTest(absltest.TestCase):
  def test_pieces_for_users_are_exported(self):
    for name in jaxbn.__all__:
      self.assertTrue(callable(getattr(jaxbn, name)), name)
    self.assertIs(jaxbn.ema_update, running.ema_update)
    self.assertIs(jaxbn.unbiased_variance, running.unbiased_variance)
    self.assertIs(jaxbn.renorm_correction, renorm.renorm_correction)
    self.assertIs(jaxbn.batch_statistics, statistics.batch_statistics)


if __name__ == '__main__':
  absltest.main()


def _full_size_sums(jaxpr, size: int) -> int:
  """The reduce_sum equations over ``size`` values in ``jaxpr`` and the jaxprs inside it."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'reduce_sum' and eqn.invars[0].aval.size == size
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _full_size_sums(sub.jaxpr, size)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _full_size_sums(sub, size)
  return count


@pytest.mark.parametrize('module, backward_sums', [(jaxbn.BatchNorm, 2), (nn.BatchNorm, 3)])
def test_reverse_mode_reduces_twice_where_autodiff_of_the_formula_reduces_three_times(
  module, backward_sums
):
  """The README's claim: the closed-form derivative's two sums serve the input and the params."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
  w = jax.random.normal(jax.random.key(1), x.shape)
  layer = module(use_running_average=False)
  variables = layer.init(jax.random.key(2), x)

  def loss(params, x):
    y, _ = layer.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return (y * w).sum()

  forward = _full_size_sums(jax.make_jaxpr(loss)(variables['params'], x).jaxpr, x.size)
  grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
  assert _full_size_sums(grad.jaxpr, x.size) - forward == backward_sums
