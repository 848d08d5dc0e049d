"""d2l_lenet.measures on cases worked by hand, and the experiments' LeNet variants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from d2l_lenet import measures, models, variants


def three_layers(params):
  """A small nonlinear network on a fixed batch: a loss of three layers' weights."""
  x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
  h = jnp.tanh(x @ params['a'])
  h = jnp.tanh(h @ params['b'])
  return jnp.sum((h @ params['c']) ** 2)


def random_params(seed):
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  return {
    'a': jax.random.normal(ka, (3, 5)),
    'b': jax.random.normal(kb, (5, 5)),
    'c': jax.random.normal(kc, (5, 2)),
  }


LAYERS = (('a',), ('b',), ('c',))


def test_covariate_shift_is_zero_when_the_layers_below_do_not_move():
  params = random_params(0)
  moved_top = {**params, 'c': params['c'] + 1.0}  # only the last layer moves
  shift = measures.covariate_shift(three_layers, params, moved_top, LAYERS)
  chex.assert_trees_all_close(shift['l2'], jnp.zeros(3), atol=0)
  chex.assert_trees_all_close(shift['relative_l2'], jnp.zeros(3), atol=0)
  chex.assert_trees_all_close(shift['cosine'], jnp.ones(3), atol=1e-6)


def test_covariate_shift_sees_only_the_layers_below():
  params = random_params(1)
  moved_first = {**params, 'a': params['a'] * 1.5}
  shift = measures.covariate_shift(three_layers, params, moved_first, LAYERS)
  assert shift['l2'][0] == 0  # nothing below the first layer
  assert shift['l2'][1] > 1e-3 and shift['l2'][2] > 1e-3  # both see the first layer move
  # Moving a layer's own weights is no shift of that layer.
  moved_middle = {**params, 'b': params['b'] * 1.5}
  shift = measures.covariate_shift(three_layers, params, moved_middle, LAYERS)
  assert shift['l2'][1] == 0 and shift['l2'][2] > 1e-3


def test_covariate_shift_worked_by_hand():
  # loss = 0.5 (w2 w1)^2 (one example x = 1, target 0): G_2 = w2 w1^2.
  loss = lambda p: 0.5 * (p['w2'] * p['w1']) ** 2
  params = {'w1': jnp.float32(1.0), 'w2': jnp.float32(2.0)}
  new = {'w1': jnp.float32(3.0), 'w2': jnp.float32(-5.0)}
  shift = measures.covariate_shift(loss, params, new, (('w1',), ('w2',)))
  # G_2 = 2 * 1 = 2 before; with w1 = 3 (w2 still 2): 2 * 9 = 18.
  chex.assert_trees_all_close(shift['l2'], jnp.array([0.0, 16.0]))
  chex.assert_trees_all_close(shift['relative_l2'], jnp.array([0.0, 8.0]))
  chex.assert_trees_all_close(shift['cosine'], jnp.array([1.0, 1.0]))
  # loss = b . (a * v), v = (1, 1): G_b = a, which turns by 90 degrees.
  loss = lambda p: jnp.dot(p['b'], p['a'] * jnp.ones(2))
  params = {'a': jnp.array([1.0, 0.0]), 'b': jnp.array([0.3, 0.7])}
  new = {'a': jnp.array([0.0, 1.0]), 'b': params['b']}
  shift = measures.covariate_shift(loss, params, new, (('a',), ('b',)))
  chex.assert_trees_all_close(shift['l2'][1], jnp.sqrt(2.0))
  chex.assert_trees_all_close(shift['cosine'][1], 0.0, atol=1e-7)


def quadratic(diagonal):
  return lambda p: 0.5 * jnp.sum(diagonal * p['w'] ** 2)


def test_landscape_of_a_quadratic_along_an_eigenvector():
  # f = (w1^2 + 4 w2^2) / 2 at w = (0, 1): g = (0, 4), an eigenvector of curvature 4.
  f = quadratic(jnp.array([1.0, 4.0]))
  out = measures.gradient_landscape(f, {'w': jnp.array([0.0, 1.0])}, [0.1, 0.25])
  # f(w - eta g) = 2 (1 - 4 eta)^2; the gradient changes by eta * 4 * |g| = 16 eta.
  chex.assert_trees_all_close(out['loss'], jnp.array([0.72, 0.0]), atol=1e-6)
  chex.assert_trees_all_close(out['loss_range'], 2.0)  # from f(w) = 2 down to 0
  chex.assert_trees_all_close(out['gradient_change'], jnp.array([1.6, 4.0]))
  chex.assert_trees_all_close(out['gradient_predictiveness'], 4.0)
  chex.assert_trees_all_close(out['beta_smoothness'], 4.0)
  chex.assert_trees_all_close(out['grad_norm'], 4.0)


def test_beta_smoothness_of_a_quadratic_off_an_eigenvector():
  # At w = (1, 1), g = A w = (1, 4): the gradient moves by eta |A g|, so beta = |A g| / |g|.
  f = quadratic(jnp.array([1.0, 4.0]))
  out = measures.gradient_landscape(f, {'w': jnp.ones(2)}, [0.01, 0.3])
  chex.assert_trees_all_close(out['beta_smoothness'], np.sqrt(257.0 / 17.0), rtol=1e-6)


@given(
  st.lists(st.floats(0.1, 50.0), min_size=2, max_size=6),
  st.data(),
)
def test_beta_smoothness_of_a_quadratic_is_its_curvature_along_the_direction(curvatures, data):
  axis = data.draw(st.integers(0, len(curvatures) - 1))
  steps = data.draw(st.lists(st.floats(1e-2, 1.0), min_size=1, max_size=4))
  w = jnp.zeros(len(curvatures)).at[axis].set(1.0)
  out = measures.gradient_landscape(quadratic(jnp.array(curvatures)), {'w': w}, steps)
  # A difference of float32 gradients over a step: relative error ~ eps / (step * curvature).
  chex.assert_trees_all_close(out['beta_smoothness'], curvatures[axis], rtol=2e-4)


def test_loss_range_of_a_linear_function_is_exact():
  # f = c . w + 2 with c = (3, 4) as a pytree of two leaves: g = c, |c|^2 = 25.
  f = lambda p: 3.0 * p['x'] + 4.0 * p['y'] + 2.0
  params = {'x': jnp.float32(0.5), 'y': jnp.float32(-1.0)}
  out = measures.gradient_landscape(f, params, [0.1, 0.5, 1.0])
  f0 = 3.0 * 0.5 - 4.0 + 2.0
  chex.assert_trees_all_close(out['loss'], f0 - 25.0 * jnp.array([0.1, 0.5, 1.0]), rtol=1e-6)
  chex.assert_trees_all_close(out['loss_range'], 25.0, rtol=1e-6)
  chex.assert_trees_all_close(out['gradient_change'], jnp.zeros(3), atol=0)
  chex.assert_trees_all_close(out['beta_smoothness'], 0.0, atol=0)
  chex.assert_trees_all_close(out['grad_norm'], 5.0)


IMAGES = jax.random.uniform(jax.random.key(7), (16, 28, 28, 1))


def init(model):
  return model.init(jax.random.key(0), IMAGES[:1], train=False)


def test_bn_in_some_slots_only():
  model = models.LeNet(norm=variants.bn_at(('bn1', 'bn3')))
  variables = init(model)
  assert {'bn1', 'bn3'} <= set(variables['params']) and not {'bn2', 'bn4'} & set(
    variables['params']
  )
  assert variants.present(variables['params'])[1] == ('conv2',)
  with pytest.raises(ValueError, match=r"\['bn5'\] are not LeNet BN layers"):
    variants.bn_at(('bn1', 'bn5'))


def test_fixed_gamma_and_beta_have_nothing_to_learn():
  variables = init(models.LeNet(norm=variants.fixed_affine_bn()))
  for name in variants.LENET_BNS:
    assert name not in variables['params']
    assert set(variables['batch_stats'][name]) == {'mean', 'var'}


def test_noisy_bn_is_bn_with_a_fresh_per_channel_affine_map_in_training():
  x = jax.random.normal(jax.random.key(1), (64, 3, 3, 5)) * 3.0 + 2.0
  noisy = variants.NoisyBatchNorm(max_shift=1.0, max_scale=2.0)
  variables = noisy.init(jax.random.key(0), x)
  rngs = lambda seed: {'noise': jax.random.key(seed)}
  y, _ = noisy.apply(variables, x, rngs=rngs(1), mutable=['batch_stats'])
  # BN leaves each channel with mean 0 and std ~1: the map's shift and scale are what remain.
  mean, std = jnp.mean(y, axis=(0, 1, 2)), jnp.std(y, axis=(0, 1, 2))
  assert jnp.all(jnp.abs(mean) <= 1.0) and jnp.all((std >= 0.99) & (std <= 2.0))
  assert jnp.max(jnp.abs(mean)) > 0.05  # not BN's zero mean
  y_same, _ = noisy.apply(variables, x, rngs=rngs(1), mutable=['batch_stats'])
  y_other, _ = noisy.apply(variables, x, rngs=rngs(2), mutable=['batch_stats'])
  chex.assert_trees_all_equal(y, y_same)
  assert not jnp.allclose(y, y_other)
  evaluated = variants.NoisyBatchNorm(use_running_average=True).apply(variables, x)
  # No noise: the map's expected scale 1.5 (shift 0) on the initial running averages (0, 1).
  chex.assert_trees_all_close(evaluated, 1.5 * x / jnp.sqrt(1.0 + 1e-5))


def test_lenet_dropout_acts_in_training_only():
  plain, dropped = models.LeNet(), models.LeNet(dropout_rate=0.5)
  variables = init(plain)
  chex.assert_trees_all_close(
    plain.apply(variables, IMAGES, train=False), dropped.apply(variables, IMAGES, train=False)
  )
  train = lambda seed: dropped.apply(
    variables, IMAGES, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(seed)}
  )[0]
  assert not jnp.allclose(train(1), train(2))
