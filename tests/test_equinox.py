"""`jaxbn.equinox`: parity with ``equinox.nn.BatchNorm``, its faults, training, precise BN, folding.

Equinox's faults (the issues named in `jaxbn.equinox`'s docstring) are tests
run on both layers, Equinox's case an expected failure (strict: it would
report Equinox's fix).
"""

import doctest
import functools
import importlib.util
import io
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

eqx = pytest.importorskip('equinox')

import jaxbn  # noqa: E402
import jaxbn.equinox  # noqa: E402
from jaxbn.equinox import BatchNorm, FoldedBatchNorm, fold_pair, precise_batch_stats  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Float32 agreement of two computations of the same batch norm (one-pass vs
# two-pass variance, other orders of summation).
TOL = {'rtol': 1e-5, 'atol': 1e-6}
GRAD_TOL = {'rtol': 1e-4, 'atol': 1e-5}


def layers(reason, raises=AssertionError):
  """Equinox's layer (failing as ``reason`` says, with ``raises``) and jaxbn's, to parametrize."""
  xfail = pytest.mark.xfail(strict=True, reason=reason, raises=raises)
  return [
    pytest.param(eqx.nn.BatchNorm, marks=xfail, id='equinox'),
    pytest.param(BatchNorm, id='jaxbn'),
  ]


def batched(layer, axis_name='batch'):
  """``layer`` over a batch on the named axis, the state shared (Equinox's usage)."""
  return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def normal(seed, shape, loc=0.0, scale=1.0):
  return loc + scale * jax.random.normal(jax.random.key(seed), shape)


def with_affine(bn, seed):
  """``bn`` with a random weight and bias (ones and zeros would hide their gradients)."""
  w, b = normal(seed, (2, bn.input_size))
  return eqx.tree_at(lambda m: (m.weight, m.bias), bn, (1.0 + 0.2 * w, b))


def clone(state):
  """A copy of an `eqx.nn.State` (each State is invalidated by the State made from it)."""
  return jax.tree.unflatten(*reversed(jax.tree.flatten(state)))


def state_values(bn, state):
  """The layer's state entries, as a tuple of arrays."""
  indices = (
    (bn.ema_first_time_index, bn.ema_state_index)
    if bn.mode == 'ema'
    else (bn.batch_counter, bn.batch_state_index)
  )
  return jax.tree.leaves([state.get(i) for i in indices])


# How a batch reaches the layer: its shape (batch axes first, then one
# example's (C, *spatial)) and the vmaps around the layer.
def one_name(bn_call):
  return batched(bn_call)


def two_names(bn_call):
  inner = jax.vmap(bn_call, axis_name='b', in_axes=(0, None), out_axes=(0, None))
  return jax.vmap(inner, axis_name='a', in_axes=(0, None), out_axes=(0, None))


def named_inner(bn_call):
  # As in Equinox's test: an unnamed vmap around the named one, each of its
  # entries a batch of its own, with a state of its own.
  return jax.vmap(batched(bn_call))


def over_pmap(bn_call):
  inner = jax.vmap(bn_call, axis_name='b', in_axes=(0, None), out_axes=(0, None))
  return jax.pmap(inner, axis_name='a', in_axes=(0, None), out_axes=(0, None))


LAYOUTS = {
  'dense': ((8, 3), 'batch', one_name),
  'conv': ((6, 3, 4, 2), 'batch', one_name),
  'two_names': ((2, 4, 3, 5), ('a', 'b'), two_names),
  'unnamed_outer': ((2, 5, 3, 4), 'batch', named_inner),
  'pmap': ((jax.device_count(), 4, 3, 2), ['a', 'b'], over_pmap),
}


def run_steps(bn, state, layout, steps=3):
  """Training steps on shifted batches: per step (y, state values, gradients)."""
  shape, _, wrap = LAYOUTS[layout]
  if wrap is named_inner:
    state = jax.tree.map(lambda v: jnp.stack([v] * shape[0]), state)

  def step(bn, state, x, cotangent):
    def loss(params, x):
      layer = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
      y, new_state = wrap(layer)(x, state)
      return jnp.sum(y * cotangent), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)((bn.weight, bn.bias), x)
    return y, new_state, grads

  step = step if wrap is over_pmap else eqx.filter_jit(step)
  results = []
  for i in range(steps):
    x = normal(10 + i, shape, loc=3.0 * i - 1.0, scale=1.0 + i)
    y, state, grads = step(bn, state, x, normal(20 + i, shape))
    results.append((y, state_values(bn, state), grads))
  return results, state


# Equinox's mode='ema' fails under pmap (test_ema_mode_under_pmap).
@pytest.mark.parametrize(
  ('layout', 'mode'),
  [
    (layout, mode)
    for mode in ('batch', 'ema')
    for layout in LAYOUTS
    if (layout, mode) != ('pmap', 'ema')
  ],
)
def test_training_matches_equinox(layout, mode):
  """Outputs, states and gradients (of x, weight, bias) step by step, under jit and vmap."""
  _, axis_name, _ = LAYOUTS[layout]
  runs = {}
  for cls in (eqx.nn.BatchNorm, BatchNorm):
    bn, state = eqx.nn.make_with_state(cls)(3, axis_name, momentum=0.9, mode=mode)
    runs[cls] = run_steps(with_affine(bn, 0), state, layout)[0]
  for (y, values, grads), (ref_y, ref_values, ref_grads) in zip(
    runs[BatchNorm], runs[eqx.nn.BatchNorm], strict=True
  ):
    chex.assert_trees_all_close(y, ref_y, **TOL)
    chex.assert_trees_all_close(values, ref_values, **TOL)
    chex.assert_trees_all_close(grads, ref_grads, **GRAD_TOL)


@pytest.mark.parametrize('mode', ['batch', 'ema'])
def test_inference_after_training_matches_equinox_state(mode):
  """Inference normalises with Equinox's state; in mode='batch' with the start taken out."""
  outputs = {}
  for cls in (eqx.nn.BatchNorm, BatchNorm):
    bn, state = eqx.nn.make_with_state(cls)(3, 'batch', momentum=0.9, mode=mode)
    bn = with_affine(bn, 0)
    _, state = run_steps(bn, state, 'conv')
    x = normal(5, (6, 3, 4, 2), loc=2.0)
    y, after = batched(eqx.nn.inference_mode(bn))(x, state)
    outputs[cls] = (y, state_values(bn, after))
  y, values = outputs[BatchNorm]
  ref_y, ref_values = outputs[eqx.nn.BatchNorm]
  chex.assert_trees_all_close(values, ref_values, **TOL)
  if mode == 'ema':
    chex.assert_trees_all_close(y, ref_y, **TOL)
    return
  counter, mean, var = ref_values
  w = 0.9**counter
  mean, var = mean / (1 - w), (var - w) / (1 - w)
  c = lambda v: np.asarray(v).reshape(1, 3, 1, 1)  # per channel, to (N, C, H, W)
  expected = (x - c(mean)) / np.sqrt(c(var) + 1e-5) * c(bn.weight) + c(bn.bias)
  chex.assert_trees_all_close(y, expected, **TOL)


def test_equinox_own_batch_norm_test():
  """equinox/tests/test_nn.py::test_batch_norm (mode='batch'), run on jaxbn's layer."""
  x0 = normal(0, (5,))
  x1, x2, x3 = normal(1, (10, 5)), normal(2, (10, 5, 6)), normal(3, (10, 5, 7, 8))
  bn = BatchNorm(5, 'batch', mode='batch')
  state = eqx.nn.State(bn)
  vbn = jax.jit(batched(bn))
  for x in (x1, x2, x3):
    out, state = vbn(x, state)
    assert out.shape == x.shape
    assert [v.shape for v in state.get(bn.batch_state_index)] == [(5,), (5,)]
  with pytest.raises(NameError):
    jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(x1, state)
  with pytest.raises(NameError):
    bn(x0, eqx.nn.State(bn))
  out, state = jax.vmap(
    jax.vmap(bn, axis_name='batch', in_axes=(1, None), out_axes=(1, None)), in_axes=(0, None)
  )(x2, eqx.nn.State(bn))
  assert out.shape == x2.shape
  assert state.get(bn.batch_state_index)[0].shape == (10, 5)
  vvbn = BatchNorm(6, ('batch1', 'batch2'), mode='batch')
  f = vvbn
  for axis_name in ('batch1', 'batch2'):
    f = jax.vmap(f, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))
  out, vvstate = f(x2, eqx.nn.State(vvbn))
  assert out.shape == x2.shape
  assert vvstate.get(vvbn.batch_state_index)[0].shape == (6,)
  x1alt = normal(5678, (10, 5))
  bn = BatchNorm(5, 'batch', channelwise_affine=False, mode='batch')
  state = eqx.nn.State(bn)
  vbn = jax.jit(batched(bn))
  out, state = vbn(x1alt, state)
  expected = (x1alt - x1alt.mean(0, keepdims=True)) / jnp.sqrt(x1alt.var(0, keepdims=True) + 1e-5)
  chex.assert_trees_all_close(out, expected, **TOL)
  out, state = vbn(x1, state)
  stats1 = state.get(bn.batch_state_index)
  out, state = vbn(3 * x1 + 10, state)
  stats2 = state.get(bn.batch_state_index)
  assert not np.allclose(stats1[0], stats2[0]) and not np.allclose(stats1[1], stats2[1])
  out, state = batched(eqx.nn.inference_mode(bn))(4 * x1 + 20, state)
  chex.assert_trees_all_equal(state.get(bn.batch_state_index), stats2)
  grad = jax.grad(lambda x: jnp.sum(vbn(x, state)[0] ** 3))(normal(6, (4, 5)))
  assert np.isfinite(grad).all()


# Equinox's faults.


@pytest.mark.filterwarnings('ignore:When `eqx.nn.BatchNorm')
@pytest.mark.parametrize(
  'cls', layers("equinox#659: without mode, 'ema' normalises with lagging running averages")
)
def test_default_mode_normalises_training_batches_with_their_statistics(cls):
  bn, state = eqx.nn.make_with_state(cls)(3, 'batch')
  for step in range(3):
    x = normal(step, (16, 3), loc=10.0 * step, scale=1.0 + step)
    y, state = jax.jit(batched(bn))(x, state)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-3)


@pytest.mark.parametrize(
  'cls', layers("equinox#955: mode='ema' starts its running variance at 0, not 1")
)
def test_untrained_model_in_inference_keeps_the_scale(cls):
  bn, state = eqx.nn.make_with_state(cls)(3, 'batch', mode='ema', inference=True)
  x = normal(0, (8, 3))
  y, _ = batched(bn)(x, state)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize('cls', [eqx.nn.BatchNorm, BatchNorm], ids=['equinox', 'jaxbn'])
def test_inference_before_any_training_step(cls):
  """equinox#1010 (fixed in Equinox 0.13.0): no division by zero before the first step."""
  bn, state = eqx.nn.make_with_state(cls)(3, 'foo', mode='batch', inference=True)
  x = normal(0, (5, 3))
  y, _ = jax.vmap(bn, in_axes=(0, None), axis_name='foo', out_axes=(0, None))(x, state)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize(
  'cls',
  layers(
    'equinox#1010, its fix: 1 / (1 - momentum**k) corrects the variance as if it started '
    'at 0, but it starts at 1'
  ),
)
@pytest.mark.parametrize('steps', [1, 3])
def test_inference_after_training_on_one_batch_normalises_it(cls, steps):
  bn, state = eqx.nn.make_with_state(cls)(3, 'batch', mode='batch')
  x = normal(0, (16, 3), loc=2.0, scale=3.0)
  for _ in range(steps):
    _, state = batched(bn)(x, state)
  y, _ = batched(eqx.nn.inference_mode(bn))(x, state)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-3)


@pytest.mark.parametrize(
  'cls',
  layers(
    "not found in Equinox's tracker (0.13.8): mode='ema' sets its first-time flag to a constant, "
    'which State.set rejects under pmap',
    raises=ValueError,
  ),
)
def test_ema_mode_under_pmap(cls):
  bn, state = eqx.nn.make_with_state(cls)(3, ('a', 'b'), mode='ema')
  results, _ = run_steps(bn, state, 'pmap', steps=2)
  y, (first_time, *stats), _ = results[-1]
  assert not first_time and np.isfinite(y).all() and np.isfinite(stats).all()


@pytest.mark.parametrize(
  'cls', layers('equinox#1074: axis_name is a pytree leaf, a str', raises=TypeError)
)
def test_device_put_of_a_model(cls):
  model, state = eqx.nn.make_with_state(cls)(3, 'batch', mode='batch')
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('devices',))
  placed = jax.device_put(model, jax.sharding.NamedSharding(mesh, P()))
  train = eqx.filter_jit(lambda m, s, x: batched(m)(x, s))
  x = normal(0, (8, 3), loc=1.0)
  y, placed_state = train(placed, clone(state), x)
  ref_y, ref_state = train(model, clone(state), x)
  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_close(state_values(model, placed_state), state_values(model, ref_state))
  # The inference flag, an array now, is traced: both of its values work.
  y, _ = train(eqx.tree_at(lambda m: m.inference, placed, jnp.asarray(True)), clone(ref_state), x)
  ref_y, _ = batched(eqx.nn.inference_mode(model))(x, clone(ref_state))
  chex.assert_trees_all_close(y, ref_y, **TOL)


def test_state_made_for_equinox_layer_serves():
  """make_with_state keys the state by class name and field: Equinox's state fits as it is."""
  x = normal(0, (8, 3), loc=1.0)
  ebn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, 'batch', mode='batch')
  _, state = batched(ebn)(x, state)
  bn, _ = eqx.nn.make_with_state(BatchNorm)(3, 'batch')
  ref_y, ref_state = batched(ebn)(x, clone(state))
  y, state = batched(bn)(x, state)
  chex.assert_trees_all_close(y, ref_y, **TOL)
  chex.assert_trees_all_close(state_values(bn, state), state_values(ebn, ref_state), **TOL)


@pytest.mark.parametrize('mode', ['batch', 'ema'])
def test_bfloat16_dtypes_match_equinox(mode):
  """dtype=bfloat16 keeps parameters and state in bfloat16; outputs have Equinox's dtype."""
  x = normal(0, (8, 3, 2), loc=1.0).astype(jnp.bfloat16)
  results = {}
  for cls in (eqx.nn.BatchNorm, BatchNorm):
    bn, state = eqx.nn.make_with_state(cls)(3, 'batch', dtype=jnp.bfloat16, mode=mode)
    y, state = batched(bn)(x, state)
    y_infer, _ = batched(eqx.nn.inference_mode(bn))(x, state)
    results[cls] = (y, y_infer, state_values(bn, state))
  for ours, theirs in zip(results[BatchNorm], results[eqx.nn.BatchNorm], strict=True):
    chex.assert_trees_all_equal_dtypes(ours, theirs)
  # Equinox's statistics are bfloat16 sums; jaxbn's float32.
  chex.assert_trees_all_close(results[BatchNorm][0], results[eqx.nn.BatchNorm][0], atol=3e-2)


@pytest.mark.parametrize('mode', ['batch', 'ema'])
def test_inference_returns_the_state_it_was_given(mode):
  """As Equinox's: inference leaves the state object valid (no vmap needed without statistics)."""
  bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch', mode=mode, inference=True)
  y, new_state = bn(jnp.ones((3, 2)), state)
  assert new_state is state and y.shape == (3, 2)
  state.get(bn.batch_state_index if mode == 'batch' else bn.ema_state_index)


def test_axis_name_list_is_kept_as_a_tuple():
  bn = BatchNorm(3, ['a', 'b'])
  assert bn.axis_name == ('a', 'b')
  hash(bn.axis_name)


def test_constructor_errors():
  with pytest.raises(ValueError, match='Invalid mode'):
    BatchNorm(3, 'batch', mode='batchnorm')
  with pytest.raises(ValueError, match='outside'):
    BatchNorm(3, 'batch', momentum=1.5)
  with pytest.raises(ValueError, match="mode='ema'"):
    BatchNorm(3, 'batch', mode='ema', momentum=None)
  bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch')
  with pytest.raises(ValueError, match=r'\(input_size, \*spatial\)'):
    bn(jnp.ones((4, 3)), state)


# jaxbn's options, against jaxbn.batch_norm over the whole (N, C, H, W) batch.

OPTIONS = {
  'plain': {},
  'cumulative': {'momentum': None},
  'unbiased': {'unbiased_running_var': True},
  'two_pass': {'use_fast_variance': False},
  'renorm': {'renorm_clip': (1.5, 0.5)},
  'renorm_warmup': {'renorm_clip': (1.5, 0.5), 'renorm_warmup_steps': 3},
}


@pytest.mark.parametrize('options', OPTIONS.values(), ids=OPTIONS)
def test_options_match_the_pure_function(options):
  momentum = options.get('momentum', 0.9)
  bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch', **{'momentum': 0.9, **options})
  bn = with_affine(bn, 0)
  mean, var = jnp.zeros(3), jnp.ones(3)
  for step in range(2):
    x = normal(step, (4, 3, 2, 2), loc=2.0 * step, scale=1.0 + step)
    y, state = eqx.filter_jit(lambda bn, s, x: batched(bn)(x, s))(bn, state, x)
    # The running statistics proper, without the start (0, 1) (with renorm).
    w = 0.0 if momentum is None or step == 0 else momentum**step
    running = (mean / (1 - w), (var - w) / (1 - w))
    kwargs = {k: v for k, v in options.items() if k != 'momentum'}
    if 'renorm_warmup_steps' in kwargs:
      warmup = kwargs.pop('renorm_warmup_steps')
      kwargs['renorm_clip'] = jaxbn.renorm_schedule(step, *kwargs['renorm_clip'], warmup)
    renorm = 'renorm_clip' in kwargs
    ref_y, new_mean, new_var = jaxbn.batch_norm(
      x,
      bn.weight,
      bn.bias,
      *(running if renorm else (mean, var)),
      use_running_average=False,
      axis=1,
      momentum=momentum,
      count=step,
      **kwargs,
    )
    if renorm:  # the hidden averages, from the batch statistics
      batch = jaxbn.batch_statistics(x, (0, 2, 3))
      new_mean, new_var = jaxbn.ema_update((mean, var), batch, momentum)
    mean, var = new_mean, new_var
    chex.assert_trees_all_close(y, ref_y, **TOL)
    chex.assert_trees_all_close(state.get(bn.batch_state_index), (mean, var), **TOL)
    assert int(state.get(bn.batch_counter)) == step + 1


def test_mask_leaves_padding_out_of_the_statistics():
  bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch', momentum=0.9)
  x = normal(0, (4, 3, 2, 2), loc=1.0)
  padded = jnp.concatenate([x, jnp.full((2, 3, 2, 2), 1e3)])
  mask = jnp.arange(6) < 4
  masked = jax.vmap(
    lambda x, m, s: bn(x, s, mask=m), axis_name='batch', in_axes=(0, 0, None), out_axes=(0, None)
  )
  y, masked_state = masked(padded, mask, clone(state))
  ref_y, ref_state = batched(bn)(x, clone(state))
  chex.assert_trees_all_close(y[:4], ref_y, **TOL)
  chex.assert_trees_all_close(state_values(bn, masked_state), state_values(bn, ref_state), **TOL)


# Drop-in training: the same model and step with either layer.


class CNN(eqx.Module):
  conv: eqx.nn.Conv2d
  bn: eqx.Module
  linear: eqx.nn.Linear

  def __init__(self, norm, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 4, 3, key=k1)
    self.bn = norm(4, 'batch', momentum=0.9, mode='batch')
    self.linear = eqx.nn.Linear(4, 2, key=k2)

  def __call__(self, x, state):
    h, state = self.bn(self.conv(x), state)
    return self.linear(jax.nn.relu(h).mean((1, 2))), state


def cnn_loss(model, state, images, labels):
  logits, state = batched(model)(images, state)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean(), state


@eqx.filter_jit
def cnn_train_step(model, state, images, labels):
  (loss, state), grads = eqx.filter_value_and_grad(cnn_loss, has_aux=True)(
    model, state, images, labels
  )
  return eqx.apply_updates(model, jax.tree.map(lambda g: -0.5 * g, grads)), state, loss


def test_cnn_trains_as_with_equinox_layer():
  images = normal(0, (32, 1, 6, 6))
  labels = (images.mean((1, 2, 3)) > 0).astype(jnp.int32)
  runs = {}
  for norm in (eqx.nn.BatchNorm, BatchNorm):
    model, state = eqx.nn.make_with_state(CNN)(norm, jax.random.key(1))
    losses = []
    for _ in range(10):
      model, state, loss = cnn_train_step(model, state, images, labels)
      losses.append(float(loss))
    runs[norm] = (losses, model, state)
  losses, model, state = runs[BatchNorm]
  ref_losses, ref_model, ref_state = runs[eqx.nn.BatchNorm]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
  assert losses[-1] < 0.9 * losses[0]
  params = lambda m: eqx.filter(m, eqx.is_inexact_array)
  chex.assert_trees_all_close(
    jax.tree.leaves(params(model)), jax.tree.leaves(params(ref_model)), rtol=1e-4, atol=1e-5
  )
  chex.assert_trees_all_close(
    state_values(model.bn, state), state_values(ref_model.bn, ref_state), rtol=1e-4, atol=1e-5
  )
  logits, _ = batched(eqx.nn.inference_mode(model))(images, state)
  assert np.isfinite(logits).all()


def test_sequential_passes_the_state():
  model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    [eqx.nn.Linear(2, 3, key=jax.random.key(0)), BatchNorm(3, 'batch'), eqx.nn.Lambda(jnp.tanh)]
  )
  y, state = batched(model)(normal(1, (4, 2)), state)
  assert y.shape == (4, 3) and int(state.get(model.layers[1].batch_counter)) == 1


# Precise statistics and folding.


class MLP(eqx.Module):
  fc1: eqx.nn.Linear
  bn1: BatchNorm
  fc2: eqx.nn.Linear
  bn2: BatchNorm

  def __init__(self, momentum, key, fc2_bias=True):
    k1, k2 = jax.random.split(key)
    self.fc1 = eqx.nn.Linear(4, 5, key=k1)
    self.bn1 = with_affine(BatchNorm(5, 'batch', momentum=momentum), 2)
    self.fc2 = eqx.nn.Linear(5, 3, use_bias=fc2_bias, key=k2)
    self.bn2 = with_affine(BatchNorm(3, 'batch', momentum=momentum), 3)

  def __call__(self, x, state):
    h, state = self.bn1(self.fc1(x), state)
    return self.bn2(self.fc2(jnp.tanh(h)), state)


def forward(model, state, x):
  return batched(model)(x, state)


def reference_precise(model, images, batch_size):
  """Each BN layer's batch statistics in training mode, averaged over batches (float64 NumPy)."""
  p = lambda a: np.asarray(a, np.float64)
  totals = [np.zeros((2, 5)), np.zeros((2, 3))]
  n = len(images) // batch_size
  for i in range(n):
    x = p(images[i * batch_size : (i + 1) * batch_size])
    h = x @ p(model.fc1.weight).T + p(model.fc1.bias)
    totals[0] += [h.mean(0), h.var(0)]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p(model.bn1.weight) + p(model.bn1.bias)
    h = np.tanh(h) @ p(model.fc2.weight).T + p(model.fc2.bias)
    totals[1] += [h.mean(0), h.var(0)]
  return [t / n for t in totals]


@pytest.mark.parametrize('momentum', [0.9, None])
@pytest.mark.parametrize('trained_steps', [0, 2])
def test_precise_batch_stats(momentum, trained_steps):
  model, state = eqx.nn.make_with_state(MLP)(momentum, jax.random.key(0))
  images = normal(1, (24, 4), loc=1.0)
  for i in range(trained_steps):
    _, state = forward(model, state, images[8 * i : 8 * (i + 1)])
  new_state = precise_batch_stats(forward, model, state, images, 8)
  for bn, expected in zip((model.bn1, model.bn2), reference_precise(model, images, 8), strict=True):
    chex.assert_trees_all_close(
      bn.running_statistics(new_state), tuple(expected), rtol=1e-5, atol=1e-6
    )
    assert int(new_state.get(bn.batch_counter)) == trained_steps
  # The old state is still valid and unchanged.
  assert int(state.get(model.bn1.batch_counter)) == trained_steps


def test_precise_batch_stats_refuses_what_it_does_not_support():
  images = normal(0, (8, 3))
  for norm, error in ((eqx.nn.BatchNorm, TypeError), (BatchNorm, ValueError)):
    model, state = eqx.nn.make_with_state(norm)(3, 'batch', mode='ema')
    with pytest.raises(error, match=r'BatchNorm|ema'):
      precise_batch_stats(forward, model, state, images, 4)


@pytest.mark.parametrize('fc2_bias', [True, False])
def test_fold_pair_matches_inference(fc2_bias):
  model, state = eqx.nn.make_with_state(MLP)(0.9, jax.random.key(0), fc2_bias)
  for i in range(2):
    _, state = forward(model, state, normal(i, (8, 4), loc=1.0))
  folded = eqx.tree_at(lambda m: (m.fc1, m.bn1), model, fold_pair(model.fc1, model.bn1, state))
  folded = eqx.tree_at(lambda m: (m.fc2, m.bn2), folded, fold_pair(folded.fc2, folded.bn2, state))
  assert isinstance(folded.bn2, FoldedBatchNorm)
  assert (folded.bn2.offset is None) == fc2_bias
  x = normal(5, (6, 4))
  y, _ = forward(eqx.nn.inference_mode(model), state, x)
  folded_y, _ = forward(eqx.nn.inference_mode(folded), state, x)
  chex.assert_trees_all_close(folded_y, y, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='inference only'):
    forward(eqx.nn.inference_mode(folded, False), state, x)


def test_fold_pair_of_a_convolution():
  conv = eqx.nn.Conv2d(2, 3, 3, key=jax.random.key(0))
  bn, state = eqx.nn.make_with_state(BatchNorm)(3, 'batch', momentum=0.5)
  bn = with_affine(bn, 1)
  x = normal(2, (4, 2, 5, 5), loc=1.0)
  _, state = jax.jit(batched(lambda x, s: bn(conv(x), s)))(x, state)
  new_conv, folded_bn = fold_pair(conv, bn, state)
  assert folded_bn.offset is None  # the conv's bias takes it
  y, _ = jax.jit(batched(lambda x, s: eqx.nn.inference_mode(bn)(conv(x), s)))(x, state)
  chex.assert_trees_all_close(jax.jit(jax.vmap(new_conv))(x), y, rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match='output channels'):
    fold_pair(eqx.nn.Conv2d(2, 4, 3, key=jax.random.key(1)), bn, state)
  with pytest.raises(TypeError, match=r'equinox\.nn\.BatchNorm'):
    fold_pair(conv, eqx.nn.BatchNorm(3, 'batch', mode='batch'), state)


# The module's face: docstrings, the how-to page, the example, imports.


def test_docstring_examples_pass():
  finder, out = doctest.DocTestFinder(), io.StringIO()
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in finder.find(jaxbn.equinox, globs=dict(vars(jaxbn.equinox))):
    runner.run(test, out=out.write)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0
  assert results.failed == 0, out.getvalue()


def test_howto_page_runs():
  text = (ROOT / 'docs/howto/equinox.md').read_text()
  blocks = re.findall(r'```\{code-cell\} ipython3\n(.*?)```', text, flags=re.S)
  assert len(blocks) >= 3
  namespace = {}
  exec(compile('\n'.join(blocks), 'docs/howto/equinox.md', 'exec'), namespace)
  assert np.isfinite(namespace['logits']).all()


def load_example():
  spec = importlib.util.spec_from_file_location('equinox_lenet', ROOT / 'examples/equinox_lenet.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # for the dataclass fields of its eqx.Modules
  spec.loader.exec_module(module)
  return module


def test_example_lenet_trains():
  example = load_example()
  args = ['--data', 'synthetic', '--steps', '2', '--batch-size', '8', '--train-size', '16']
  metrics = example.main([*args, '--test-size', '8', '--precise'])
  assert np.isfinite(metrics['loss']) and 0 <= metrics['precise_test_accuracy'] <= 1


def test_example_lenet_is_the_chapters_lenet():
  """The linen LeNet's weights in the Equinox LeNet: the same logits and running statistics."""
  from d2l_lenet.models import LeNet

  example = load_example()
  images = np.asarray(normal(0, (4, 28, 28, 1)))
  linen = LeNet(conv_impl='standard')
  variables = jax.jit(functools.partial(linen.init, train=False))(jax.random.key(1), images)
  train = functools.partial(linen.apply, train=True, mutable=['batch_stats'])
  logits, updates = jax.jit(train)(variables, images)
  p = variables['params']
  conv = lambda name: (p[name]['kernel'].transpose(3, 2, 0, 1), p[name]['bias'][:, None, None])
  # linen flattens (h, w, c) of NHWC; Equinox (c, h, w) of CHW.
  fc1 = p['fc1']['kernel'].reshape(4, 4, 16, 120).transpose(2, 0, 1, 3).reshape(256, 120)
  model, state = eqx.nn.make_with_state(example.LeNet)(jax.random.key(2))
  weights = {
    'conv1': conv('conv1'),
    'conv2': conv('conv2'),
    'fc1': (fc1.T, p['fc1']['bias']),
    'fc2': (p['fc2']['kernel'].T, p['fc2']['bias']),
    'fc3': (p['fc3']['kernel'].T, p['fc3']['bias']),
  }
  model = eqx.tree_at(
    lambda m: [getattr(getattr(m, n), a) for n in weights for a in ('weight', 'bias')],
    model,
    [v for pair in weights.values() for v in pair],
  )
  eqx_logits, state = eqx.filter_jit(example.forward)(model, state, images.transpose(0, 3, 1, 2))
  chex.assert_trees_all_close(eqx_logits, logits, rtol=1e-4, atol=1e-5)
  for i, bn in enumerate((model.bn1, model.bn2, model.bn3, model.bn4), start=1):
    stats = updates['batch_stats'][f'bn{i}']
    chex.assert_trees_all_close(
      state.get(bn.batch_state_index), (stats['mean'], stats['var']), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_import_jaxbn_without_equinox():
  code = textwrap.dedent(
    """
    import sys
    sys.modules['equinox'] = None  # as if Equinox were not installed
    import jaxbn
    assert sys.modules['equinox'] is None
    try:
      import jaxbn.equinox
    except ModuleNotFoundError as e:
      assert 'pip install "jaxbn[equinox]"' in str(e), e
    else:
      raise AssertionError('jaxbn.equinox imported without Equinox')
    """
  )
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  subprocess.run([sys.executable, '-c', code], check=True, env=env)
