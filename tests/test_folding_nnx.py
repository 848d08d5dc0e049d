"""`jaxbn.folding.fold` of Flax NNX models: a folded copy computes the eval-mode outputs.

Running statistics come from one training-mode call on another batch
(momentum 0) and BN scales and biases are random, so that nothing is the
identity; large epsilons make a wrong epsilon show.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from d2l_lenet import models
from jaxbn import folding
from jaxbn import nnx as jnnx

JBN = functools.partial(jnnx.BatchNorm, momentum=0.0)
FBN = functools.partial(nnx.BatchNorm, momentum=0.0)


def _inputs(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 2.0, size=shape), jnp.float32)


def _prepared(model, shape):
  """``model`` (in eval mode) with random BN scales and biases, statistics of another batch."""
  rng = np.random.default_rng(1)
  for _, layer in nnx.iter_modules(model):
    for name in ('scale', 'bias'):
      if isinstance(layer, jnnx.BatchNorm | nnx.BatchNorm) and getattr(layer, name) is not None:
        value = getattr(layer, name)
        value[...] = (name == 'scale') + 0.3 * rng.normal(size=value.shape)
  model.train()
  model(_inputs(shape, seed=2))
  model.eval()
  return model


class CNN(nnx.Module):
  """Conv/ConvTranspose/Linear, with and without bias, into both BN classes (one in a List)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = JBN(4, use_scale=False, epsilon=0.1, rngs=rngs)
    self.up = nnx.ConvTranspose(4, 3, (2, 2), strides=(2, 2), rngs=rngs)
    self.up_bn = FBN(3, use_bias=False, epsilon=0.5, rngs=rngs)
    self.head = nnx.List([nnx.Linear(3 * 12 * 12, 5, rngs=rngs), JBN(5, epsilon=0.2, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.relu(self.up_bn(self.up(x))).reshape(x.shape[0], -1)
    return self.head[1](self.head[0](x))


class Unfoldable(nnx.Module):
  """Each BN named ``bad_*`` cannot be folded; ``ok_bn`` can."""

  def __init__(self, rngs):
    self.bad_on_input = JBN(3, rngs=rngs)
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bad_after_relu = JBN(4, rngs=rngs)
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.bad_used_twice = FBN(4, rngs=rngs)
    self.ok_conv = nnx.Conv(4, 3, (1, 1), rngs=rngs)
    self.ok_bn = JBN(3, epsilon=0.3, rngs=rngs)

  def __call__(self, x):
    x = self.bad_after_relu(nnx.relu(self.conv(self.bad_on_input(x))))
    y = self.dense(x)
    return self.ok_bn(self.ok_conv(self.bad_used_twice(y) + y))


def _check_folded(model, x, folded_bns):
  folded = folding.fold(model, x)
  chex.assert_trees_all_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
  layers = dict(nnx.iter_modules(folded))
  assert {p for p, m in layers.items() if isinstance(m, folding.FoldedBatchNorm)} == folded_bns
  originals = dict(nnx.iter_modules(model))
  assert all(isinstance(originals[p], jnnx.BatchNorm | nnx.BatchNorm) for p in folded_bns)
  for m, bn_arithmetic in ((model, True), (folded, False)):
    graphdef, state = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(x))(state)
    assert ('rsqrt' in str(jaxpr)) == bn_arithmetic
  return folded


@pytest.mark.parametrize('norm', ['jaxbn', 'flax'])
def test_lenet(norm):
  model = models.NNXLeNet(models.norm_layer(norm, 'nnx', momentum=0.0), rngs=nnx.Rngs(0))
  x = _inputs((16, 28, 28, 1))
  _check_folded(_prepared(model, x.shape), x, {('bn1',), ('bn2',), ('bn3',), ('bn4',)})


def test_cnn_gets_biases_and_keeps_its_original():
  model = _prepared(CNN(nnx.Rngs(0)), (4, 6, 6, 2))
  x = _inputs((4, 6, 6, 2))
  folded = _check_folded(model, x, {('bn',), ('up_bn',), ('head', 1)})
  chex.assert_shape(folded.conv.bias[...], (4,))
  assert model.conv.bias is None and not model.conv.use_bias
  folded.train()
  with pytest.raises(ValueError, match=r"'bn' is folded into 'conv'.*inference only"):
    folded(x)


def test_names_each_unfoldable_layer_and_why():
  model = _prepared(Unfoldable(nnx.Rngs(0)), (4, 6, 6, 3))
  x = _inputs((4, 6, 6, 3))
  with pytest.raises(ValueError) as error:
    folding.fold(model, x)
  message = str(error.value)
  assert "'bad_on_input': its input is not the very output of a Linear" in message
  assert "'bad_after_relu': its input is not the very output" in message
  assert "'bad_used_twice': the output of 'dense' is also used elsewhere" in message
  assert 'ok_bn' not in message and 'strict=False' in message
  folded = folding.fold(model, x, strict=False)
  chex.assert_trees_all_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
  assert isinstance(folded.ok_bn, folding.FoldedBatchNorm)
  assert isinstance(folded.bad_used_twice, nnx.BatchNorm)


class TrainingCall(nnx.Module):
  """Its BN layer is called in training mode whatever the model's mode."""

  def __init__(self, rngs):
    self.dense, self.bn = nnx.Linear(3, 4, rngs=rngs), JBN(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.dense(x), use_running_average=False)


def test_training_mode_call_is_refused():
  with pytest.raises(ValueError, match=r"'bn' is in training mode"):
    folding.fold(TrainingCall(nnx.Rngs(0)), _inputs((4, 3)))


@pytest.mark.parametrize('use_bias', [True, False])
def test_a_registered_linear_layer_of_the_users_folds(use_bias):
  class Affine(nnx.Module):  # a linear layer folding has never seen (not a Flax class)
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))
      self.bias = nnx.Param(jax.random.normal(rngs.params(), (4,))) if use_bias else nnx.data(None)
      self.use_bias = use_bias

    def __call__(self, x):
      return x @ self.kernel[...] + (0.0 if self.bias is None else self.bias[...][None])

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.affine, self.bn = Affine(rngs), JBN(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.affine(x))

  x = _inputs((16, 3))
  model = _prepared(Model(nnx.Rngs(0)), x.shape)
  with pytest.raises(ValueError, match="'bn': its input is not the very output"):
    folding.fold(model, x)
  assert folding.register_linear(Affine) is Affine
  folded = _check_folded(model, x, {('bn',)})
  chex.assert_shape(folded.affine.bias[...], (4,))
