"""The XLA:CPU layers of `d2l_lenet.kernels` compute what the standard Flax layers do.

The banded convolution and the pool with an elementwise gradient are checked
against ``lax.conv_general_dilated`` / ``nn.Conv`` and a reshape-and-max pool
(whose gradient is autodiff's), and LeNet built from them
(``conv_impl='banded'``) against LeNet built from ``nn.Conv`` and
``nn.max_pool`` (``conv_impl='standard'``), in values and gradients, and over
a few training steps. Everything runs jitted, as training does: XLA:CPU has compiled some
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
from flax import nnx

from d2l_lenet import kernels, models, steps

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


@pytest.mark.parametrize(
  'x_shape, k_shape, block, with_bias',
  [
    ((2, 12, 12, 6), (5, 5, 6, 16), 4, True),
    ((3, 28, 28, 1), (5, 5, 1, 6), 8, True),
    ((2, 9, 11, 2), (3, 4, 2, 5), 4, False),
  ],
)
def test_conv_valid_equals_lax_conv(x_shape, k_shape, block, with_bias):
  # The input and bias gradients come from the custom window transpose and
  # the bias broadcast; a random cotangent checks them against autodiff's.
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), k_shape)
  bias = jax.random.normal(jax.random.key(2), k_shape[-1:]) if with_bias else None
  got = value_and_vjp(lambda x, k, b: kernels.conv_valid(x, k, b, block=block), x, kernel, bias)
  want = value_and_vjp(
    lambda x, k, b: lax_conv(x, k) + (0 if b is None else b.reshape(1, 1, 1, -1)), x, kernel, bias
  )
  chex.assert_trees_all_close(got, want, **UNIT_TOL)


BANDED_OPTIONS = [
  dict(features=4, kernel_size=(5, 3), padding='VALID'),
  dict(features=4, kernel_size=(5, 3), padding=((0, 0), (0, 0)), use_bias=False),
]
# Convolutions that conv_valid does not compute, and what the error names.
OTHER_OPTIONS = [
  (dict(features=4, kernel_size=(3, 3), padding='SAME'), "padding='VALID'"),
  (dict(features=4, kernel_size=(3, 3), padding='VALID', strides=2), 'strides 1'),
  (dict(features=6, kernel_size=(3, 3), padding='VALID', feature_group_count=3), 'feature_group'),
]


def nnx_convs(options):
  """NNXBandedConv and nnx.Conv with ``options`` (linen's names), initialized alike."""
  options = dict(options)
  features = options.pop('features')
  return [
    conv(3, features, **options, rngs=nnx.Rngs(1)) for conv in (kernels.NNXBandedConv, nnx.Conv)
  ]


@pytest.mark.parametrize('options', BANDED_OPTIONS)
def test_banded_conv_is_a_drop_in_for_nn_conv(options):
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  variables = nn.Conv(**options).init(jax.random.key(1), x)
  chex.assert_trees_all_equal(kernels.BandedConv(**options).init(jax.random.key(1), x), variables)
  got = value_and_vjp(lambda v, x: kernels.BandedConv(**options).apply(v, x), variables, x)
  want = value_and_vjp(lambda v, x: nn.Conv(**options).apply(v, x), variables, x)
  chex.assert_trees_all_close(got, want, **UNIT_TOL)


@pytest.mark.parametrize('options', BANDED_OPTIONS)
def test_nnx_banded_conv_is_a_drop_in_for_nnx_conv(options):
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
  layer, reference = nnx_convs(options)
  params = nnx.state(reference)
  chex.assert_trees_all_equal(nnx.state(layer), params)

  def apply(module):
    graph = nnx.graphdef(module)
    return value_and_vjp(lambda p, x: nnx.merge(graph, p)(x), params, x)

  chex.assert_trees_all_close(apply(layer), apply(reference), **UNIT_TOL)


@pytest.mark.parametrize('options, needs', OTHER_OPTIONS)
def test_banded_convs_refuse_other_convolutions_by_name(options, needs):
  x = jnp.zeros((2, 12, 12, 3))
  with pytest.raises(ValueError, match=f'BandedConv computes only .*{needs}.*Use flax'):
    kernels.BandedConv(**options).init(jax.random.key(1), x)
  with pytest.raises(ValueError, match=f'NNXBandedConv computes only .*{needs}'):
    nnx_convs(options)[0](x)


@pytest.mark.parametrize('layout', ['NHWC', 'NCHW'])
def test_max_pool_equals_nn_max_pool_with_ties(layout):
  # Values on a coarse grid, so that windows hold two, three or four maxima;
  # a sigmoid before the pool, as in the model, fuses with it.
  x = jnp.round(jax.random.normal(jax.random.key(0), (4, 8, 12, 3)) * 2) / 2
  to, back, axes = (lambda v: v, lambda v: v, (1, 2))
  if layout == 'NCHW':
    to, back, axes = (lambda v: v.transpose(0, 3, 1, 2), lambda v: v.transpose(0, 2, 3, 1), (2, 3))
  got = value_and_vjp(lambda x: back(kernels.max_pool_2x2(to(nn.sigmoid(x)), axes)), x)
  want = value_and_vjp(lambda x: reshape_max_pool(nn.sigmoid(x)), x)
  chex.assert_trees_all_close(got, want, rtol=0, atol=0)
  # nn.max_pool's values; its gradient (select-and-scatter) gives a tied
  # window's cotangent to one maximum, so only the values are compared.
  pooled = nn.max_pool(nn.sigmoid(x), (2, 2), strides=(2, 2))
  chex.assert_trees_all_close(got[0], pooled, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
@pytest.mark.parametrize('norm', models.NORMS)
def test_banded_lenet_equals_standard_lenet_in_values_stats_and_gradients(norm, dtype):
  norm = models.norm_layer(norm, momentum=0.9)
  model = models.LeNet(norm=norm, conv_impl='banded')
  reference = models.LeNet(norm=norm, conv_impl='standard')
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


def test_training_steps_equal_standard_steps():
  """Three SGD steps (lr 1.0) of `steps.train_step` on batches of 256, in float64."""
  model, reference = models.LeNet(conv_impl='banded'), models.LeNet(conv_impl='standard')
  variables = model.init(jax.random.key(0), images(1), train=False)
  with jax.enable_x64(True):
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    states = [
      steps.TrainState.create(
        apply_fn=m.apply,
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        tx=optax.sgd(1.0),
      )
      for m in (model, reference)
    ]
    step = jax.jit(steps.train_step)
    for i in range(3):
      batch = {'image': images(256, seed=10 + i).astype(jnp.float64), 'label': jnp.arange(256) % 10}
      (states[0], got), (states[1], want) = (step(s, batch) for s in states)
      chex.assert_trees_all_close(got, want, **TOL[jnp.float64])
    for name in ('params', 'batch_stats'):
      chex.assert_trees_all_close(
        getattr(states[0], name), getattr(states[1], name), **TOL[jnp.float64]
      )
  np.testing.assert_array_equal(states[0].step, 3)


def test_auto_picks_the_banded_forms_on_cpu_only(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert models.resolve_conv_impl('auto') == 'banded'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert models.resolve_conv_impl('auto') == 'standard'
  assert models.resolve_conv_impl('banded') == 'banded'
  with pytest.raises(ValueError, match="conv_impl='fast' is not one of"):
    models.resolve_conv_impl('fast')


def test_bfloat16_lenet_computes_in_bfloat16_and_returns_float32_logits():
  x = images(8)
  logits = {}
  for impl in ('banded', 'standard'):
    model = models.LeNet(dtype=jnp.bfloat16, conv_impl=impl)
    variables = model.init(jax.random.key(0), x, train=False)
    chex.assert_trees_all_equal_dtypes(
      variables['params'], jax.tree.map(jnp.float32, variables['params'])
    )
    logits[impl], state = model.apply(
      variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
    )
    (conv1,) = state['intermediates']['conv1']['__call__']
    assert conv1.dtype == jnp.bfloat16 and logits[impl].dtype == jnp.float32
  chex.assert_trees_all_close(logits['banded'], logits['standard'], atol=5e-2)
