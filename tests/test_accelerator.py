"""jaxbn on the accelerator: the same numbers as on the CPU, with the GPU's own kernels.

Skipped on CPU (CI). `benchmarks/gpu_check.py` (``make gpu-check``) runs them
on a GPU machine; by hand: ``JAX_PLATFORMS=cuda,cpu pytest -m accelerator``
(the CPU platform is needed for the comparisons with the CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from d2l_lenet import models, parallel, steps

pytestmark = [
  pytest.mark.accelerator,
  pytest.mark.skipif(
    jax.default_backend() == 'cpu', reason='needs a GPU/TPU: run make gpu-check on a GPU machine'
  ),
]

# Float32 comparisons: full float32 products (no TF32) where the two sides differ in kernels.
highest = functools.partial(jax.default_matmul_precision, 'highest')


def lenet(conv_impl, dtype=None):
  norm = models.norm_layer('jaxbn', momentum=0.9, epsilon=1e-5)
  return models.LeNet(norm=norm, conv_impl=conv_impl, dtype=dtype)


def images(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(size=(n, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, n, np.int32)


def on(device, tree):
  return jax.device_put(tree, device)


def test_batch_norm_on_the_accelerator_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(50.0, 2.0, size=(64, 8, 8, 16))  # a large mean: the shifted variance
  scale, bias = rng.normal(size=16), rng.normal(size=16)
  running_mean, running_var = np.full(16, 49.0), np.ones(16)
  args = [a.astype(np.float32) for a in (x, scale, bias, running_mean, running_var)]
  out = jax.jit(functools.partial(jaxbn.batch_norm, use_running_average=False, momentum=0.9))(
    *on(jax.devices()[0], args)
  )
  assert out.y.devices() == {jax.devices()[0]} and out.y.dtype == jnp.float32
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  y = scale * (x - mean) / np.sqrt(var + 1e-5) + bias
  np.testing.assert_allclose(out.y, y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out.mean, 0.9 * running_mean + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(out.var, 0.9 * running_var + 0.1 * var, rtol=2e-5)


def test_lenet_auto_uses_standard_kernels_and_matches_banded_on_cpu():
  assert models.resolve_conv_impl('auto') == 'standard'
  cpu = jax.devices('cpu')[0]
  x, _ = images()
  variables = lenet('auto').init(jax.random.key(0), x[:1], train=False)

  def apply(model, device):
    fn = jax.jit(functools.partial(model.apply, mutable=['batch_stats']), static_argnums=2)
    with highest():
      return jax.device_get(fn(*on(device, (variables, x)), True))

  logits, stats = apply(lenet('auto'), jax.devices()[0])
  want, want_stats = apply(lenet('banded'), cpu)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  for got, expected in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def train_two_steps(model, device):
  """Two SGD steps at lr 1.0 on ``device``: (initial batch_stats, final state, losses)."""
  x, y = on(device, images(512))
  init = steps.create_train_state(jax.random.key(0), model, learning_rate=1.0)
  before, state = jax.device_get(init.batch_stats), on(device, init)
  train = parallel.make_train_steps(parallel.make_mesh([device]))
  indices = on(device, np.arange(512, dtype=np.int32).reshape(2, 256))
  with highest():
    state, metrics = train(state, x, y, indices)
  return before, state, metrics['loss']


def test_train_steps_on_the_accelerator_update_batch_stats_as_on_cpu():
  gpu, cpu = jax.devices()[0], jax.devices('cpu')[0]
  before, state, losses = train_two_steps(lenet('auto'), gpu)
  assert {leaf.devices().pop().platform for leaf in jax.tree.leaves(state)} == {gpu.platform}
  assert np.all(np.isfinite(losses)) and int(state.step) == 2
  stats, before = state.batch_stats['bn1'], before['bn1']
  assert not np.allclose(stats['mean'], before['mean'])
  assert not np.allclose(stats['var'], before['var'])
  _, cpu_state, cpu_losses = train_two_steps(lenet('banded'), cpu)
  np.testing.assert_allclose(losses, cpu_losses, rtol=1e-4)
  for got, want in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(cpu_state.params), strict=True
  ):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_bfloat16_lenet_keeps_float32_statistics_and_close_logits():
  x, _ = on(jax.devices()[0], images())
  variables = lenet('auto').init(jax.random.key(0), x[:1], train=False)
  outputs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    fn = jax.jit(functools.partial(lenet('auto', dtype).apply, train=True, mutable=['batch_stats']))
    outputs[dtype] = fn(variables, x)
  (logits, stats), (want, _) = outputs[jnp.bfloat16], outputs[jnp.float32]
  assert logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(logits, want, atol=0.1)
