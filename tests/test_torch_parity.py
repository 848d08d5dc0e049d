"""Parity with PyTorch: `torch.nn.functional.batch_norm` and ``nn.BatchNorm1d/2d``.

PyTorch's conventions, in jaxbn's terms: its ``momentum`` is the weight of the
new batch (``1 - momentum`` here), it stores the unbiased batch variance in the
running variance (``unbiased_running_var=True``), and its ``momentum=None`` is
the cumulative average (``momentum=None`` with ``count``). Activations are
NCHW in PyTorch and NHWC here. Everything runs in float64 on both sides, so
differences are rounding of 1e-15, and a wrong convention shows as 1e-2 or more.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized

import jaxbn

torch.set_num_threads(1)  # the test session runs one worker per core
TOL = dict(rtol=1e-10, atol=1e-12)
SHAPES = {'dense': (16, 5), 'conv': (8, 6, 6, 3)}


def to_torch(x: np.ndarray) -> torch.Tensor:
  """NHWC (or (N, C)) NumPy array as a float64 NCHW (or (N, C)) tensor."""
  x = np.asarray(x, np.float64)
  return torch.from_numpy(np.moveaxis(x, -1, 1).copy() if x.ndim == 4 else x)


def from_torch(t: torch.Tensor) -> np.ndarray:
  x = t.detach().numpy()
  return np.moveaxis(x, 1, -1) if x.ndim == 4 else x


def batches(shape, num, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(2.0, 3.0, shape) for _ in range(num)]


class FunctionalParityTest(chex.TestCase):
  """`jaxbn.batch_norm` against `torch.nn.functional.batch_norm`."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=('dense', 'conv'), momentum=(0.9, 0.5, None))
  def test_training_steps_outputs_and_running_statistics(self, kind, momentum):
    c = SHAPES[kind][-1]
    rng = np.random.default_rng(1)
    scale, bias = rng.normal(1.0, 0.2, c), rng.normal(0.0, 0.5, c)
    t_mean, t_var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    with jax.enable_x64(True):
      mean, var = jnp.zeros(c), jnp.ones(c)

      @self.variant
      def step(x, mean, var, count):
        return jaxbn.batch_norm(
          x,
          scale,
          bias,
          mean,
          var,
          use_running_average=False,
          momentum=momentum,
          count=count,
          unbiased_running_var=True,
          epsilon=1e-5,
        )

      for count, x in enumerate(batches(SHAPES[kind], 4)):
        y, mean, var = step(jnp.asarray(x), mean, var, count)
        # PyTorch's cumulative average divides by its num_batches_tracked,
        # i.e. count + 1 here.
        factor = 1.0 / (count + 1) if momentum is None else 1.0 - momentum
        want = torch.nn.functional.batch_norm(
          to_torch(x),
          t_mean,
          t_var,
          torch.from_numpy(scale),
          torch.from_numpy(bias),
          training=True,
          momentum=factor,
          eps=1e-5,
        )
        chex.assert_trees_all_close(np.asarray(y), from_torch(want), **TOL)
        chex.assert_trees_all_close(
          (np.asarray(mean), np.asarray(var)), (t_mean.numpy(), t_var.numpy()), **TOL
        )

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('dense', 'conv')
  def test_inference_uses_the_running_statistics(self, kind):
    c = SHAPES[kind][-1]
    rng = np.random.default_rng(2)
    (x,) = batches(SHAPES[kind], 1, seed=3)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    scale, bias = rng.normal(size=c), rng.normal(size=c)
    with jax.enable_x64(True):
      y, _, _ = self.variant(
        lambda *a: jaxbn.batch_norm(*a, use_running_average=True, epsilon=1e-3)
      )(jnp.asarray(x), scale, bias, mean, var)
    want = torch.nn.functional.batch_norm(
      to_torch(x),
      torch.from_numpy(mean),
      torch.from_numpy(var),
      torch.from_numpy(scale),
      torch.from_numpy(bias),
      training=False,
      eps=1e-3,
    )
    chex.assert_trees_all_close(np.asarray(y), from_torch(want), **TOL)

  @parameterized.product(kind=('dense', 'conv'), use_running_average=(False, True))
  def test_gradients_match_autograd(self, kind, use_running_average):
    c = SHAPES[kind][-1]
    rng = np.random.default_rng(4)
    (x,) = batches(SHAPES[kind], 1, seed=5)
    cotangent = rng.normal(size=x.shape)
    scale, bias = rng.normal(1.0, 0.2, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)

    with jax.enable_x64(True):

      def f(x, scale, bias):
        return jaxbn.batch_norm(
          x, scale, bias, mean, var, use_running_average=use_running_average
        ).y

      _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
      got = jax.tree.map(np.asarray, vjp(jnp.asarray(cotangent)))

    inputs = [to_torch(x), torch.from_numpy(scale), torch.from_numpy(bias)]
    for t in inputs:
      t.requires_grad_(True)
    y = torch.nn.functional.batch_norm(
      inputs[0],
      torch.from_numpy(mean),
      torch.from_numpy(var),
      inputs[1],
      inputs[2],
      training=not use_running_average,
    )
    (y * to_torch(cotangent)).sum().backward()
    want = (from_torch(inputs[0].grad), inputs[1].grad.numpy(), inputs[2].grad.numpy())
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.parametrize(
  'kind, torch_layer', [('dense', torch.nn.BatchNorm1d), ('conv', torch.nn.BatchNorm2d)]
)
@pytest.mark.parametrize('torch_momentum', [0.1, None])
def test_module_trains_and_evaluates_as_torch_batch_norm(kind, torch_layer, torch_momentum):
  """`jaxbn.BatchNorm` with PyTorch's conventions = ``nn.BatchNorm1d/2d`` over several steps."""
  c = SHAPES[kind][-1]
  layer = torch_layer(c, momentum=torch_momentum, eps=1e-5).double()
  rng = np.random.default_rng(6)
  with torch.no_grad():  # non-trivial affine parameters, the same on both sides
    layer.weight.copy_(torch.from_numpy(rng.normal(1.0, 0.2, c)))
    layer.bias.copy_(torch.from_numpy(rng.normal(size=c)))
  module = jaxbn.BatchNorm(
    momentum=None if torch_momentum is None else 1.0 - torch_momentum,
    epsilon=1e-5,
    unbiased_running_var=True,
  )
  data = batches(SHAPES[kind], 4, seed=7)
  with jax.enable_x64(True):
    variables = module.init(jax.random.key(0), jnp.asarray(data[0]), use_running_average=True)
    # A float64 model: the module creates its running averages in float32.
    stats = jax.tree.map(lambda v: v.astype(jnp.result_type(v, jnp.float64)), variables)
    params = {'scale': layer.weight.detach().numpy(), 'bias': layer.bias.detach().numpy()}
    variables = {'batch_stats': stats['batch_stats'], 'params': params}
    train = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False, mutable=True))
    for x in data:
      y, updates = train(variables, jnp.asarray(x))
      variables = {**variables, **updates}
      layer.train()
      chex.assert_trees_all_close(np.asarray(y), from_torch(layer(to_torch(x))), **TOL)
    stats = variables['batch_stats']
    chex.assert_trees_all_close(
      (np.asarray(stats['mean']), np.asarray(stats['var'])),
      (layer.running_mean.numpy(), layer.running_var.numpy()),
      **TOL,
    )
    if torch_momentum is None:
      assert int(stats['count']) == int(layer.num_batches_tracked) == len(data)
    x = batches(SHAPES[kind], 1, seed=8)[0]
    y = module.apply(variables, jnp.asarray(x), use_running_average=True)
  layer.eval()
  chex.assert_trees_all_close(np.asarray(y), from_torch(layer(to_torch(x))), **TOL)
