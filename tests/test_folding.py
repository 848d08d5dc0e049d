"""`jaxbn.folding.fold`: the folded model computes the inference outputs without BN arithmetic.

Each model gets random parameters and running statistics measured on another
batch (BN momentum 0), so that nothing is the identity; LeNet also gets a
channel whose variance is near the BN epsilon, so that a wrong epsilon shows.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn
from flax import traverse_util

import jaxbn
from d2l_lenet.models import LeNet, norm_layer
from jaxbn import folding

# Momentum 0: the running statistics after one training-mode call are that batch's.
JBN = functools.partial(jaxbn.BatchNorm, momentum=0.0)
FBN = functools.partial(nn.BatchNorm, momentum=0.0)


def _random(rng: np.random.Generator, path: tuple, shape: tuple) -> jax.Array:
  """A parameter of ``shape`` at ``path`` (kernels scaled by their fan-in, BN scales near 1)."""
  if path[-1] == 'kernel':
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
  return jnp.asarray((path[-1] == 'scale') + 0.3 * rng.normal(size=shape), jnp.float32)


def _variables(model, x, seed, shrink=None):
  """Random params, and the running statistics of a batch other than ``x`` (of its shape).

  ``shrink`` maps layer names to a factor for their first output feature, to
  make its variance comparable with the BN epsilon. NumPy random
  numbers and no ``init``: XLA:CPU compiles initializers slowly.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  flat = traverse_util.flatten_dict(shapes['params'])
  params = traverse_util.unflatten_dict({k: _random(rng, k, v.shape) for k, v in flat.items()})
  for name, factor in (shrink or {}).items():
    params[name] = jax.tree.map(lambda p, f=factor: p.at[..., 0].multiply(f), params[name])
  stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['batch_stats'])
  other = jnp.asarray(rng.uniform(-1.0, 2.0, size=x.shape), jnp.float32)
  _, stats = model.apply(
    {'params': params, 'batch_stats': stats}, other, train=True, mutable=['batch_stats']
  )
  return {'params': params, **stats}


def _inputs(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 2.0, size=shape), jnp.float32)


def _has_rsqrt(fn, *args) -> bool:
  return 'rsqrt' in str(jax.make_jaxpr(fn)(*args))


def _bn_paths(variables) -> set:
  """Paths of the layers with batch statistics, e.g. {('stem', 'BatchNorm_0')}."""
  return {k[:-1] for k in traverse_util.flatten_dict(variables['batch_stats'])}


def _prefixes(params) -> set:
  """Every path of ``params`` and its prefixes, e.g. {('a',), ('a', 'kernel')}."""
  return {k[:i] for k in traverse_util.flatten_dict(params) for i in range(1, len(k) + 1)}


class Block(nn.Module):
  """Conv -> BN (no scale) -> relu, nested in `CNN`."""

  features: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3))(x)
    return nn.relu(JBN(use_running_average=not train, use_scale=False)(x))


class CNN(nn.Module):
  """Nested blocks, explicit and automatic names, flax and jaxbn BN with their own epsilons."""

  @nn.compact
  def __call__(self, x, train):
    x = Block(4, name='stem')(x, train)
    x = Block(5)(x, train)
    x = nn.ConvTranspose(3, (2, 2), strides=(2, 2), use_bias=False)(x)
    x = FBN(use_running_average=not train, use_bias=False, epsilon=1e-3)(x)
    x = nn.DenseGeneral((2, 3))(nn.relu(x).reshape(x.shape[0], -1))
    x = JBN(use_running_average=not train, axis=(-2, -1), epsilon=1e-2)(x)
    x = nn.Dense(6, use_bias=False, name='head')(nn.relu(x).reshape(x.shape[0], -1))
    return FBN(use_running_average=not train, name='head_bn')(x)


class MLP(nn.Module):
  """Automatic names only; the square first layer makes a fold along the wrong axis fit."""

  @nn.compact
  def __call__(self, x, train):
    for features in (8, 6):
      x = nn.Dense(features)(x)
      x = nn.relu(JBN(use_running_average=not train, epsilon=1e-3)(x))
    return nn.Dense(3)(x)


class Unfoldable(nn.Module):
  """Each BN named ``bad_*`` cannot be folded; ``ok_bn`` can."""

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(JBN, use_running_average=not train)
    x = bn(name='bad_on_input')(x)
    y = bn(name='bad_after_relu')(nn.relu(nn.Conv(4, (3, 3))(x)))
    y = bn(axis=1, name='bad_axis')(nn.Conv(4, (1, 1))(y))
    y = bn(name='bad_transposed')(nn.ConvTranspose(4, (2, 2), transpose_kernel=True)(y))
    return bn(name='ok_bn')(nn.Conv(3, (1, 1), name='ok_conv')(y))


class Twice(nn.Module):
  """The raw output of ``dense`` goes into the BN and into the sum."""

  @nn.compact
  def __call__(self, x, train):
    y = nn.Dense(4, name='dense')(x)
    return FBN(use_running_average=not train, name='bn')(y) + y


class Shared(nn.Module):
  """One Dense called twice, only the first call followed by a BN."""

  @nn.compact
  def __call__(self, x, train):
    dense = nn.Dense(4, name='dense')
    return JBN(use_running_average=not train, name='bn')(dense(x)) + dense(2 * x)


class FoldTest(chex.TestCase):
  def _check_folded(self, model, x, variables, expected_params):
    apply_fn, params = folding.fold(model, variables, x, train=False)
    expected = model.apply(variables, x, train=False)
    got = self.variant(functools.partial(apply_fn, train=False))(params, x)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)
    self.assertEqual(set(params), expected_params)
    self.assertFalse(_bn_paths(variables) & _prefixes(params))
    self.assertTrue(_has_rsqrt(functools.partial(model.apply, train=False), variables, x))
    self.assertFalse(_has_rsqrt(functools.partial(apply_fn, train=False), params, x))
    return apply_fn, params

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(norm=('jaxbn', 'flax'), conv_impl=('standard', 'banded'))
  def test_lenet(self, norm, conv_impl):
    model = LeNet(norm=norm_layer(norm, momentum=0.0), conv_impl=conv_impl)
    x = _inputs((32, 28, 28, 1))
    variables = self._variables_near_epsilon(model, x)
    self._check_folded(model, x, variables, {'conv1', 'conv2', 'fc1', 'fc2', 'fc3'})

  def _variables_near_epsilon(self, model, x):
    variables = _variables(model, x, 1, shrink={'conv1': 3e-3, 'fc2': 2e-2})
    for bn in ('bn1', 'bn4'):
      var = variables['batch_stats'][bn]['var']
      self.assertBetween(float(var[0]), 1e-6, 1e-4)  # near epsilon = 1e-5
      self.assertGreater(float(var[1:].min()), 1e-3)
    self.assertGreater(float(jnp.abs(variables['batch_stats']['bn3']['mean']).max()), 0.1)
    return variables

  @chex.variants(with_jit=True, without_jit=True)
  def test_nested_cnn(self):
    x = _inputs((8, 6, 6, 2))
    variables = _variables(CNN(), x, 1)
    _, params = self._check_folded(
      CNN(), x, variables, {'stem', 'Block_0', 'ConvTranspose_0', 'DenseGeneral_0', 'head'}
    )
    self.assertEqual(set(params['stem']), {'Conv_0'})
    # Layers without a bias get one.
    chex.assert_shape(params['ConvTranspose_0']['bias'], (3,))
    chex.assert_shape(params['head']['bias'], (6,))
    chex.assert_shape(params['DenseGeneral_0']['bias'], (2, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp(self):
    x = _inputs((16, 8))
    variables = _variables(MLP(), x, 1)
    self._check_folded(MLP(), x, variables, {'Dense_0', 'Dense_1', 'Dense_2'})

  @chex.variants(with_jit=True, without_jit=True)
  def test_strict_false_keeps_the_unfoldable(self):
    x = _inputs((4, 6, 6, 3))
    model = Unfoldable()
    variables = _variables(model, x, 1)
    apply_fn, params = folding.fold(model, variables, x, strict=False, train=False)
    got = self.variant(functools.partial(apply_fn, train=False))(params, x)
    chex.assert_trees_all_close(got, model.apply(variables, x, train=False), atol=1e-5, rtol=1e-5)
    bad = {'bad_on_input', 'bad_after_relu', 'bad_axis', 'bad_transposed'}
    self.assertLessEqual(bad, set(params))
    self.assertNotIn('ok_bn', params)
    chex.assert_trees_all_equal(params['bad_axis'], variables['params']['bad_axis'])


def test_names_each_unfoldable_layer_and_why():
  x = _inputs((4, 6, 6, 3))
  variables = _variables(Unfoldable(), x, 1)
  with pytest.raises(ValueError) as error:
    folding.fold(Unfoldable(), variables, x, train=False)
  message = str(error.value)
  assert "'bad_on_input': its input is not the very output of a Dense" in message
  assert "'bad_after_relu': its input is not the very output" in message
  assert "'bad_axis': its axis=1 is not the output-feature axis of 'Conv_1'" in message
  assert "'bad_transposed': 'ConvTranspose_0' has transpose_kernel=True" in message
  assert 'ok_bn' not in message
  assert 'strict=False' in message


def test_output_used_twice_is_not_folded():
  x = _inputs((8, 3))
  variables = _variables(Twice(), x, 1)
  with pytest.raises(ValueError, match="'bn': the output of 'dense' is also used elsewhere"):
    folding.fold(Twice(), variables, x, train=False)
  apply_fn, params = folding.fold(Twice(), variables, x, strict=False, train=False)
  assert set(params) == {'dense', 'bn'}
  chex.assert_trees_all_close(
    apply_fn(params, x, train=False), Twice().apply(variables, x, train=False), atol=1e-6
  )


def test_layer_called_twice_is_not_folded():
  x = _inputs((8, 3))
  variables = _variables(Shared(), x, 1)
  with pytest.raises(ValueError, match="'bn': 'dense' is called 2 times"):
    folding.fold(Shared(), variables, x, train=False)


def test_training_mode_call_is_refused():
  x = _inputs((16, 8))
  variables = _variables(MLP(), x, 1)
  with pytest.raises(ValueError, match=r"'BatchNorm_0' is in training mode.*train=False"):
    folding.fold(MLP(), variables, x, train=True)
  apply_fn, params = folding.fold(MLP(), variables, x, train=False)
  with pytest.raises(ValueError, match="'BatchNorm_0' is folded into 'Dense_0'"):
    apply_fn(params, x, train=True)


def test_fold_into_dense_by_hand():
  kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  bias = jnp.array([0.5, -1.0])
  bn_params = {'scale': jnp.array([2.0, 0.5]), 'bias': jnp.array([1.0, 0.0])}
  bn_stats = {'mean': jnp.array([1.0, 2.0]), 'var': jnp.array([4.0, 1.0])}
  k, b = folding.fold_into_linear(kernel, bias, bn_params, bn_stats, epsilon=0.0)
  # multiplier = scale / sqrt(var) = [1, 0.5]
  chex.assert_trees_all_close(k, jnp.array([[1.0, 1.0], [3.0, 2.0]]))
  chex.assert_trees_all_close(b, jnp.array([(0.5 - 1.0) * 1 + 1.0, (-1.0 - 2.0) * 0.5]))


def _affine_model(use_bias: bool):
  """A linear layer folding has never seen (not a Flax class), then BN; a new class per call."""

  class Affine(nn.Module):
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
      kernel = self.param('kernel', nn.initializers.zeros, (x.shape[-1], self.features))
      y = x @ kernel
      bias = self.param('bias', nn.initializers.zeros, (self.features,)) if self.use_bias else None
      return y if bias is None else y + bias[None]

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return JBN(use_running_average=not train)(Affine(4, use_bias, name='affine')(x))

  return Affine, Model()


@pytest.mark.parametrize('use_bias', [True, False])
def test_a_registered_linear_layer_of_the_users_folds(use_bias):
  affine, model = _affine_model(use_bias)
  x = _inputs((16, 3))
  variables = _variables(model, x, 1)
  with pytest.raises(ValueError, match="'BatchNorm_0': its input is not the very output"):
    folding.fold(model, variables, x, train=False)
  assert folding.register_linear(affine) is affine
  apply_fn, params = folding.fold(model, variables, x, train=False)
  assert set(params) == {'affine'}
  assert _has_rsqrt(functools.partial(model.apply, train=False), variables, x)
  assert not _has_rsqrt(functools.partial(apply_fn, train=False), params, x)
  chex.assert_trees_all_close(
    apply_fn(params, x, train=False), model.apply(variables, x, train=False), atol=1e-5, rtol=1e-5
  )


def test_register_linear_refuses_what_is_no_flax_layer():
  with pytest.raises(TypeError, match=r'flax\.linen\.Module or flax\.nnx\.Module class'):
    folding.register_linear(jnp.dot)
