"""The fast formulations in `jaxbn.models` compute what the straightforward ones do.

Each reformulation made for speed (convolutions as matrix products, pooling
with an elementwise gradient, the first layer in NCHW) is checked against the
plain Flax formulation, `ReferenceLeNet` below (``nn.Conv``, a reshape-and-max
pooling, NHWC throughout), in values and gradients, and over a few training
steps. Everything runs jitted, as training does: XLA:CPU has compiled some
fused formulations to wrong gradients that were right op by op.

Max-pooling makes gradients discontinuous: when the two largest values of a
window differ by a rounding error, which one gets the gradient depends on the
order of the sums before it. float32 checks therefore stick to single steps,
and the multi-step check runs in float64, where such near-ties do not occur.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxbn import models, training
from jaxbn.linen import BatchNorm

# Results of differently ordered sums. Unit inputs are N(0, 1), so float32
# sums of tens of terms carry absolute errors near 1e-6. The model's gradients
# are at most 0.2, and those that should be 0 (conv biases under batch norm)
# are rounding noise.
UNIT_TOL = dict(rtol=1e-4, atol=1e-4)
TOL = {jnp.float32: dict(rtol=1e-4, atol=1e-5), jnp.float64: dict(rtol=1e-9, atol=1e-12)}


def lax_conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def reshape_max_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ReferenceLeNet(nn.Module):
  """LeNet-BN as first written: nn.Conv, reshape-and-max pooling, NHWC."""

  norm: str = 'jaxbn'

  @nn.compact
  def __call__(self, x, train):
    init = nn.initializers.xavier_uniform()
    conv = functools.partial(nn.Conv, kernel_size=(5, 5), padding='VALID', kernel_init=init)

    def norm(h):
      if self.norm == 'none':
        return h
      module = BatchNorm if self.norm == 'jaxbn' else nn.BatchNorm
      return module(use_running_average=not train, momentum=0.9, epsilon=1e-5)(h)

    x = reshape_max_pool(nn.sigmoid(norm(conv(6)(x))))
    x = reshape_max_pool(nn.sigmoid(norm(conv(16)(x))))
    x = x.reshape(x.shape[0], -1)
    x = nn.sigmoid(norm(nn.Dense(120, kernel_init=init)(x)))
    x = nn.sigmoid(norm(nn.Dense(84, kernel_init=init)(x)))
    return nn.Dense(10, kernel_init=init)(x)


def images(n, seed=0):
  """(n, 28, 28, 1) images in [0, 1] with a zero background, as Fashion-MNIST has."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.uniform(k1, (n, 28, 28, 1))
  return jnp.where(jax.random.uniform(k2, x.shape) < 0.4, 0.0, x)


def value_and_vjp(f, *args, seed=1):
  """f(*args) and its VJP with a random cotangent, jitted."""

  def run(*args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(jax.random.normal(jax.random.key(seed), y.shape))

  return jax.jit(run)(*args)


@pytest.mark.parametrize('channels_first', [False, True])
@pytest.mark.parametrize(
  'x_shape, k_shape, block',
  [
    ((2, 12, 12, 6), (5, 5, 6, 16), 4),
    ((3, 28, 28, 1), (5, 5, 1, 6), 8),
    ((2, 9, 11, 2), (3, 4, 2, 5), 4),
  ],
)
def test_conv_valid_equals_lax_conv(x_shape, k_shape, block, channels_first):
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), k_shape)
  layout = (lambda y: jnp.transpose(y, (0, 3, 1, 2))) if channels_first else (lambda y: y)
  got = value_and_vjp(lambda x, k: models.conv_valid(x, k, block, channels_first), x, kernel)
  want = value_and_vjp(lambda x, k: layout(lax_conv(x, k)), x, kernel)
  chex.assert_trees_all_close(got, want, **UNIT_TOL)


@pytest.mark.parametrize('layout', ['NHWC', 'NCHW'])
def test_max_pool_equals_reshape_max_with_ties(layout):
  # Values on a coarse grid, so that windows hold two, three or four maxima;
  # a sigmoid before the pool, as in the model, fuses with it.
  x = jnp.round(jax.random.normal(jax.random.key(0), (4, 8, 12, 3)) * 2) / 2
  to, back, axes = (lambda v: v, lambda v: v, (1, 2))
  if layout == 'NCHW':
    to, back, axes = (lambda v: v.transpose(0, 3, 1, 2), lambda v: v.transpose(0, 2, 3, 1), (2, 3))
  got = value_and_vjp(lambda x: back(models.max_pool_2x2(to(nn.sigmoid(x)), axes)), x)
  want = value_and_vjp(lambda x: reshape_max_pool(nn.sigmoid(x)), x)
  chex.assert_trees_all_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
@pytest.mark.parametrize('norm', models.NORMS)
def test_lenet_equals_reference_in_values_stats_and_gradients(norm, dtype):
  model, reference = models.LeNet(norm=norm), ReferenceLeNet(norm=norm)
  variables = model.init(jax.random.key(0), images(1), train=False)
  chex.assert_trees_all_equal(variables, reference.init(jax.random.key(0), images(1), train=False))
  with jax.enable_x64(dtype == jnp.float64):
    variables = jax.tree.map(lambda v: v.astype(dtype), variables)
    x, labels = images(32).astype(dtype), jnp.arange(32) % 10

    def loss(module, params):
      logits, updates = module.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (
        logits,
        updates,
      )

    got, want = (
      jax.jit(jax.value_and_grad(functools.partial(loss, m), has_aux=True))(variables['params'])
      for m in (model, reference)
    )
    chex.assert_trees_all_close(got, want, **TOL[dtype])
    infer = lambda m: jax.jit(functools.partial(m.apply, train=False))(variables, x)
    chex.assert_trees_all_close(infer(model), infer(reference), **TOL[dtype])


def test_training_steps_equal_reference_steps():
  """Three SGD steps (lr 1.0) of `training.train_step` on batches of 256, in float64."""
  model, reference = models.LeNet(), ReferenceLeNet()
  variables = model.init(jax.random.key(0), images(1), train=False)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    states = [
      training.TrainState.create(
        apply_fn=m.apply,
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        tx=optax.sgd(1.0),
      )
      for m in (model, reference)
    ]
    step = jax.jit(training.train_step)
    for i in range(3):
      batch = {'image': images(256, seed=10 + i).astype(jnp.float64), 'label': jnp.arange(256) % 10}
      (states[0], got), (states[1], want) = (step(s, batch) for s in states)
      chex.assert_trees_all_close(got, want, **TOL[jnp.float64])
    for name in ('params', 'batch_stats'):
      chex.assert_trees_all_close(
        getattr(states[0], name), getattr(states[1], name), **TOL[jnp.float64]
      )
  np.testing.assert_array_equal(states[0].step, 3)
