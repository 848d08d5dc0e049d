"""Precise BN statistics: equal-weight averages of batch statistics, jaxbn and Flax layers."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from d2l_lenet import nnx_apply
from d2l_lenet.models import LeNet, NNXLeNet, norm_layer
from jaxbn import nnx as jnnx
from jaxbn import precise


class TwoLayer(nn.Module):
  """Dense -> BN -> tanh -> Dense -> BN, with the BN class and momentum chosen."""

  norm: type = jaxbn.BatchNorm
  momentum: float | None = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: self.norm(use_running_average=not train, momentum=self.momentum)
    x = jnp.tanh(bn()(nn.Dense(5)(x)))
    return bn()(nn.Dense(3)(x))


def test_equals_a_cumulative_average_over_the_same_batches():
  """jaxbn.BatchNorm(momentum=None) over the batches, weights fixed, is the reference."""
  x = jax.random.normal(jax.random.key(0), (40, 4)) * 3 + 1
  ema = TwoLayer(momentum=0.9)
  variables = ema.init(jax.random.key(1), x[:2], train=False)
  got = precise.precise_batch_stats(
    ema.apply, variables['params'], variables['batch_stats'], x, 8, train=True
  )

  cumulative = TwoLayer(momentum=None)
  stats = cumulative.init(jax.random.key(1), x[:2], train=False)['batch_stats']
  for i in range(5):
    _, updates = cumulative.apply(
      {'params': variables['params'], 'batch_stats': stats},
      x[i * 8 : (i + 1) * 8],
      train=True,
      mutable=['batch_stats'],
    )
    stats = updates['batch_stats']
  for layer in ('BatchNorm_0', 'BatchNorm_1'):
    assert int(stats[layer]['count']) == 5
    chex.assert_trees_all_close(got[layer]['mean'], stats[layer]['mean'], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got[layer]['var'], stats[layer]['var'], rtol=1e-5, atol=1e-6)


def test_first_layer_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(2), (30, 4)), np.float64)
  model = TwoLayer()
  variables = model.init(jax.random.key(3), jnp.asarray(x[:2], jnp.float32), train=False)
  got = precise.precise_batch_stats(
    model.apply,
    variables['params'],
    variables['batch_stats'],
    jnp.asarray(x, jnp.float32),
    10,
    train=True,
  )
  dense = variables['params']['Dense_0']
  h = x @ np.asarray(dense['kernel'], np.float64) + np.asarray(dense['bias'], np.float64)
  batches = h.reshape(3, 10, 5)
  np.testing.assert_allclose(
    got['BatchNorm_0']['mean'], batches.mean(1).mean(0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    got['BatchNorm_0']['var'], batches.var(1).mean(0), rtol=1e-5, atol=1e-6
  )


def test_flax_and_jaxbn_layers_give_the_same_statistics():
  images = jax.random.uniform(jax.random.key(4), (64, 28, 28, 1))
  results = {}
  for norm in ('jaxbn', 'flax'):
    model = LeNet(norm=norm_layer(norm, momentum=0.9))
    variables = model.init(jax.random.key(5), images[:2], train=False)
    results[norm] = precise.precise_batch_stats(
      model.apply, variables['params'], variables['batch_stats'], images, 16, train=True
    )
  chex.assert_trees_all_close(results['jaxbn'], results['flax'], rtol=1e-4, atol=1e-6)
  first = results['jaxbn']['bn1']
  chex.assert_shape([first['mean'], first['var']], (6,))
  assert not np.allclose(first['var'], 1.0)


def test_inference_mode_layers_are_left_alone():
  x = jax.random.normal(jax.random.key(6), (16, 4))
  model = TwoLayer()
  variables = model.init(jax.random.key(7), x[:2], train=False)
  stats = precise.layer_batch_statistics(model.apply, variables, x, train=False)
  assert stats == {}


def test_unbiased_layers_get_the_unbiased_variance():
  """A layer storing unbiased running variances gets n / (n - 1) times the batch variance."""
  x = np.asarray(jax.random.normal(jax.random.key(8), (2, 6, 3, 4)), np.float64) * 2 + 1
  model = jaxbn.BatchNorm(unbiased_running_var=True)
  variables = model.init(jax.random.key(9), jnp.asarray(x[0], jnp.float32), True)
  got = precise.precise_batch_stats(
    model.apply,
    variables['params'],
    variables['batch_stats'],
    jnp.asarray(x.reshape(12, 3, 4), jnp.float32),
    6,
    use_running_average=False,
  )
  # 18 values per feature in each batch of 6 examples of shape (3, 4).
  np.testing.assert_allclose(got['var'], x.var((1, 2), ddof=1).mean(0), rtol=1e-5)
  np.testing.assert_allclose(got['mean'], x.mean((1, 2)).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm', ['jaxbn', 'flax'])
def test_nnx_lenet_gets_the_statistics_of_the_linen_lenet_with_its_weights(norm):
  images = jax.random.uniform(jax.random.key(10), (48, 28, 28, 1))
  linen = LeNet(norm=norm_layer(norm, momentum=0.9))
  variables = linen.init(jax.random.key(11), images[:2], train=False)
  want = precise.precise_batch_stats(
    linen.apply, variables['params'], variables['batch_stats'], images, 16, train=True
  )
  model = nnx_apply.as_module(
    functools.partial(NNXLeNet, norm_layer(norm, 'nnx', momentum=0.9)), variables
  )
  model.eval()
  precise.precise_batch_stats_nnx(model, images, 16)
  chex.assert_trees_all_close(
    nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), want, rtol=1e-6, atol=1e-7
  )
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model, nnx.Param)), variables['params'])
  assert model.bn1.use_running_average  # the mode it had


class NNXTwoLayer(nnx.Module):
  """Linear -> BN -> tanh -> Linear -> BN, the BN layers in an nnx.List."""

  def __init__(self, momentum, rngs, **options):
    self.linears = nnx.List([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])
    bn = functools.partial(jnnx.BatchNorm, momentum=momentum, rngs=rngs, **options)
    self.bns = nnx.List([bn(5), bn(3)])

  def __call__(self, x):
    x = jnp.tanh(self.bns[0](self.linears[0](x)))
    return self.bns[1](self.linears[1](x))


@pytest.mark.parametrize('unbiased', [False, True])
def test_nnx_equals_a_cumulative_average_over_the_same_batches(unbiased):
  """jaxbn.nnx.BatchNorm(momentum=None) over the batches, weights fixed, is the reference."""
  x = jax.random.normal(jax.random.key(12), (40, 4)) * 3 + 1
  model = NNXTwoLayer(0.9, nnx.Rngs(0), unbiased_running_var=unbiased)
  cumulative = NNXTwoLayer(None, nnx.Rngs(0), unbiased_running_var=unbiased)
  cumulative.train()
  for i in range(5):
    cumulative(x[i * 8 : (i + 1) * 8])
  count_before = model.bns[0].count
  precise.precise_batch_stats_nnx(model, x, 8)
  for got, want in zip(model.bns, cumulative.bns, strict=True):
    assert int(want.count[...]) == 5
    chex.assert_trees_all_close(got.mean[...], want.mean[...], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got.var[...], want.var[...], rtol=1e-5, atol=1e-6)
  assert model.bns[0].count is count_before is None
  stats = precise.layer_batch_statistics_nnx(model, x[:8])
  assert set(stats) == {('bns', 0), ('bns', 1)}


class NNXFrozenSecond(NNXTwoLayer):
  """`NNXTwoLayer` with its second BN layer called in inference mode."""

  def __call__(self, x):
    x = jnp.tanh(self.bns[0](self.linears[0](x)))
    return self.bns[1](self.linears[1](x), use_running_average=True)


def test_nnx_inference_mode_calls_are_left_alone():
  model = NNXFrozenSecond(0.9, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(13), (16, 4))
  assert set(precise.layer_batch_statistics_nnx(model, x)) == {('bns', 0)}
  precise.precise_batch_stats_nnx(model, x, 8)
  chex.assert_trees_all_equal(model.bns[1].mean[...], jnp.zeros(3))
  assert not np.allclose(model.bns[0].mean[...], 0.0)
