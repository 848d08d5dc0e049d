"""Past the chapter: ghost batch norm and batch renormalization, against references in the test."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxbn


def _inputs(shape=(8, 5, 4, 3), seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = jax.random.normal(k1, shape) * 2.0 + 1.0
  scale = 1.0 + 0.1 * jax.random.normal(k2, (c,))
  bias = 0.1 * jax.random.normal(k3, (c,))
  mean = 0.5 * jax.random.normal(k4, (c,))
  var = jnp.full((c,), 2.0)
  return x, scale, bias, mean, var


class GhostBatchNormTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('conv', (8, 5, 4, 3), 2), ('dense', (12, 7), 4))
  def test_each_virtual_batch_is_normalised_on_its_own(self, shape, virtual):
    x, scale, bias, mean, var = _inputs(shape)
    ghost = self.variant(
      lambda x: jaxbn.batch_norm(
        x, scale, bias, mean, var, use_running_average=False, virtual_batch_size=virtual
      )
    )(x)
    parts = [
      jaxbn.batch_norm(x[i : i + virtual], scale, bias, mean, var, use_running_average=False)
      for i in range(0, shape[0], virtual)
    ]
    chex.assert_trees_all_close(
      ghost.y, jnp.concatenate([p.y for p in parts]), atol=1e-5, rtol=1e-5
    )
    # The running averages take the mean of the groups' updates.
    chex.assert_trees_all_close(ghost.mean, np.mean([p.mean for p in parts], 0), atol=1e-6)
    chex.assert_trees_all_close(ghost.var, np.mean([p.var for p in parts], 0), atol=1e-6)

  def test_whole_batch_as_one_virtual_batch_is_plain_batch_norm(self):
    x, scale, bias, mean, var = _inputs()
    plain = jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False)
    ghost = jaxbn.batch_norm(
      x, scale, bias, mean, var, use_running_average=False, virtual_batch_size=8
    )
    chex.assert_trees_all_close(ghost, plain, atol=0, rtol=0)

  def test_inference_ignores_virtual_batches(self):
    x, scale, bias, mean, var = _inputs()
    a = jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=True, virtual_batch_size=3)
    b = jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=True)
    chex.assert_trees_all_close(a, b, atol=0, rtol=0)

  def test_errors(self):
    x, scale, bias, mean, var = _inputs()
    with self.assertRaisesRegex(ValueError, r'virtual_batch_size=3 does not divide .* 8'):
      jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False, virtual_batch_size=3)
    y = jnp.ones((4, 6))
    with self.assertRaisesRegex(ValueError, 'axis 0 is a feature axis'):
      jaxbn.batch_norm(
        y,
        None,
        None,
        jnp.zeros(4),
        jnp.ones(4),
        axis=0,
        use_running_average=False,
        virtual_batch_size=2,
      )

  @parameterized.named_parameters(('biased', False), ('unbiased', True))
  def test_virtual_batches_of_one_value_are_batches_of_one(self, unbiased_running_var):
    # Each example alone, as Flax normalises a batch of one: the output is the
    # bias, the running mean takes the mean of the examples, and the running
    # variance their variance 0 (biased) or, as one value has no unbiased
    # variance, stays as it is.
    x, scale, bias, mean, var = _inputs((8, 3))
    with pytest.warns(jaxbn.SingleValueWarning, match='single value per feature in each virtual'):
      y, new_mean, new_var = jaxbn.batch_norm(
        x,
        scale,
        bias,
        mean,
        var,
        use_running_average=False,
        momentum=0.75,
        virtual_batch_size=1,
        unbiased_running_var=unbiased_running_var,
      )
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (8, 3)))
    np.testing.assert_allclose(new_mean, 0.75 * mean + 0.25 * x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_var, var if unbiased_running_var else 0.75 * var, rtol=1e-6)

  def test_module_option(self):
    x = _inputs()[0]
    module = jaxbn.BatchNorm(momentum=0.9, virtual_batch_size=4)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    y, updates = module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    top, _ = jaxbn.BatchNorm(momentum=0.9).apply(
      variables, x[:4], use_running_average=False, mutable=['batch_stats']
    )
    chex.assert_trees_all_close(y[:4], top, atol=1e-5)
    chex.assert_shape(updates['batch_stats']['mean'], (3,))


def _renorm_reference(x, scale, bias, mean, var, eps, rmax, dmax):
  """Ioffe (2017), Algorithm 1, in float64 NumPy."""
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  mu_b, var_b = x.mean(axes), x.var(axes)
  sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(np.asarray(var, np.float64) + eps)
  r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
  d = np.clip((mu_b - np.asarray(mean, np.float64)) / sigma, -dmax, dmax)
  return np.asarray(scale) * ((x - mu_b) / sigma_b * r + d) + np.asarray(bias)


class BatchRenormTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('clipped', 1.2, 0.1), ('loose', 3.0, 5.0), ('unclipped', 1e6, 1e6)
  )
  def test_matches_the_paper(self, rmax, dmax):
    x, scale, bias, mean, var = _inputs()
    out = self.variant(
      lambda x: jaxbn.batch_norm(
        x, scale, bias, mean, var, use_running_average=False, renorm_clip=(rmax, dmax)
      )
    )(x)
    np.testing.assert_allclose(
      out.y, _renorm_reference(x, scale, bias, mean, var, 1e-5, rmax, dmax), atol=2e-5, rtol=1e-5
    )
    # The running averages are updated as in plain batch norm.
    plain = jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False)
    chex.assert_trees_all_close((out.mean, out.var), (plain.mean, plain.var), atol=1e-6)

  def test_rmax_one_dmax_zero_is_plain_batch_norm_with_its_gradients(self):
    x, scale, bias, mean, var = _inputs()

    def loss(x, scale, bias, clip):
      y = jaxbn.batch_norm(x, scale, bias, mean, var, use_running_average=False, renorm_clip=clip).y
      return jnp.sum(jnp.sin(y))

    plain = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias, None)
    renorm = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias, (1.0, 0.0))
    chex.assert_trees_all_close(renorm, plain, atol=1e-6, rtol=1e-6)

  def test_no_gradient_flows_through_r_and_d(self):
    """The gradient equals that of the formula with r and d fed in as constants."""
    x, scale, bias, mean, var = _inputs()
    eps, (rmax, dmax) = 1e-5, (1.5, 0.5)
    xb = np.asarray(x, np.float64)
    sigma_b, sigma = np.sqrt(xb.var((0, 1, 2)) + eps), np.sqrt(np.asarray(var, np.float64) + eps)
    r = jnp.asarray(np.clip(sigma_b / sigma, 1 / rmax, rmax), jnp.float32).reshape(1, 1, 1, -1)
    d = jnp.asarray(np.clip((xb.mean((0, 1, 2)) - mean) / sigma, -dmax, dmax), jnp.float32).reshape(
      1, 1, 1, -1
    )
    assert np.all(r == rmax) or np.any(np.abs(d) == dmax)  # the clipping is active

    def with_constants(x):
      xhat = (x - x.mean((0, 1, 2), keepdims=True)) / jnp.sqrt(
        x.var((0, 1, 2), keepdims=True) + eps
      )
      per_channel = lambda v: v.reshape(1, 1, 1, -1)
      return jnp.sum(jnp.sin(per_channel(scale) * (xhat * r + d) + per_channel(bias)))

    def renorm(x):
      y = jaxbn.batch_norm(
        x, scale, bias, mean, var, use_running_average=False, renorm_clip=(rmax, dmax)
      )
      return jnp.sum(jnp.sin(y.y))

    chex.assert_trees_all_close(renorm(x), with_constants(x), atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(jax.grad(renorm)(x), jax.grad(with_constants)(x), atol=1e-4)

  @chex.variants(with_jit=True)
  def test_gradients_match_finite_differences_where_clipped(self):
    # Far from the running statistics, r = 1 / rmax and d = dmax are clipped
    # constants: the function's own derivative is then the stop-gradient one.
    x, scale, bias, _, _ = _inputs((8, 2, 3))
    mean, var = jnp.full((3,), -10.0), jnp.full((3,), 100.0)
    fn = self.variant(
      lambda x, scale, bias: jaxbn.batch_norm(
        x,
        scale,
        bias,
        mean,
        var,
        use_running_average=False,
        renorm_clip=(1.5, 0.5),
        virtual_batch_size=4,
      )
    )
    groups = np.asarray(x, np.float64).reshape(2, 8, 3)
    sigma_b, sigma = np.sqrt(groups.var(1) + 1e-5), np.sqrt(100.0 + 1e-5)
    assert np.all(sigma_b / sigma < 1 / 1.5) and np.all((groups.mean(1) + 10.0) / sigma > 0.5)
    with jax.enable_x64(True):
      args = tuple(a.astype(jnp.float64) for a in (x, scale, bias))
      jax.test_util.check_grads(fn, args, order=2, modes=('fwd', 'rev'), atol=1e-6, rtol=1e-6)

  def test_schedule_widens_linearly(self):
    for step, expected in [(0, (1.0, 0.0)), (50, (2.0, 2.5)), (100, (3.0, 5.0)), (500, (3.0, 5.0))]:
      np.testing.assert_allclose(jaxbn.renorm_schedule(step, 3.0, 5.0, 100), expected, rtol=1e-6)

  def test_module_counts_steps_and_starts_as_plain_batch_norm(self):
    x = _inputs()[0]
    module = jaxbn.BatchNorm(momentum=0.9, renorm_clip=(3.0, 5.0), renorm_warmup_steps=100)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    assert int(variables['batch_stats']['renorm_steps']) == 0
    y, updates = module.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    plain = jaxbn.BatchNorm(momentum=0.9).apply(
      {
        'params': variables['params'],
        'batch_stats': {k: v for k, v in variables['batch_stats'].items() if k != 'renorm_steps'},
      },
      x,
      use_running_average=False,
      mutable=['batch_stats'],
    )[0]
    chex.assert_trees_all_close(y, plain, atol=0, rtol=0)
    assert int(updates['batch_stats']['renorm_steps']) == 1


if __name__ == '__main__':
  pytest.main([__file__])
