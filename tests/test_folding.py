"""Folding BN into the preceding layer: the model without BN computes the same outputs."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from jaxbn import folding, training
from jaxbn.models import LeNet, norm_layer


@pytest.mark.parametrize('norm', ['jaxbn', 'flax'])
def test_folded_lenet_equals_lenet_bn_in_inference(norm):
  images = jax.random.uniform(jax.random.key(0), (64, 28, 28, 1))
  model = LeNet(norm=norm_layer(norm, momentum=0.9))
  variables = model.init(jax.random.key(1), images[:2], train=False)
  # Train a few steps so that the running statistics and BN params are not trivial.
  state = training.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=optax.sgd(0.5),
  )
  step = jax.jit(training.train_step)
  for i in range(4):
    labels = jax.random.randint(jax.random.key(10 + i), (64,), 0, 10)
    state, _ = step(state, {'image': images, 'label': labels})
  stats = state.batch_stats['bn1']
  assert float(jnp.abs(stats['mean']).max()) > 1e-3

  expected = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, images, train=False
  )
  folded = folding.fold_batch_norms(state.params, state.batch_stats)
  assert not any(k.startswith('bn') for k in folded)
  got = LeNet(norm=None).apply({'params': folded}, images, train=False)
  chex.assert_trees_all_close(got, expected, atol=2e-5, rtol=2e-5)


def test_fold_into_dense_by_hand():
  kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  bias = jnp.array([0.5, -1.0])
  bn_params = {'scale': jnp.array([2.0, 0.5]), 'bias': jnp.array([1.0, 0.0])}
  bn_stats = {'mean': jnp.array([1.0, 2.0]), 'var': jnp.array([4.0, 1.0])}
  k, b = folding.fold_into_linear(kernel, bias, bn_params, bn_stats, epsilon=0.0)
  # multiplier = scale / sqrt(var) = [1, 0.5]
  chex.assert_trees_all_close(k, jnp.array([[1.0, 1.0], [3.0, 2.0]]))
  chex.assert_trees_all_close(b, jnp.array([(0.5 - 1.0) * 1 + 1.0, (-1.0 - 2.0) * 0.5]))
