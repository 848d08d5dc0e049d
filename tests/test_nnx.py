"""Specification of `jaxbn.nnx.BatchNorm`, a drop-in replacement for `flax.nnx.BatchNorm`.

Where the options overlap, `flax.nnx.BatchNorm` is the reference: the same
constructor, state, outputs, running-statistics updates and gradients, in
every mode switch and NNX transform users train with. The extras
(``momentum=None``, ``unbiased_running_var``, ghost batches, renorm's warm-up)
are checked against float64 NumPy.

The SPMD and pmap tests need 8 host devices, set by XLA_FLAGS before JAX starts:
`test_on_8_host_devices` runs this module's ``on_8_devices`` tests in a
subprocess that has them (tests/conftest.py deselects them here).
"""

import inspect
import os
import pathlib
import re
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import nnx as jnnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
ON_8_DEVICES_COUNT = 2  # tests marked on_8_devices


def _data(shape, seed, dtype=np.float32, axis=-1):
  """A batch whose features have distinct means (-3..3) and spreads (0.5..2)."""
  rng = np.random.default_rng(seed)
  ndim = len(shape)
  axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  keep = tuple(shape[a] if a in axes else 1 for a in range(ndim))
  x = rng.uniform(-3, 3, keep) + rng.uniform(0.5, 2, keep) * rng.standard_normal(shape)
  return jnp.asarray(x, dtype)


def _np_stats(x, axis=-1):
  """Float64 per-feature (mean, biased var, values per feature)."""
  x = np.asarray(x, np.float64)
  axes = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  red = tuple(a for a in range(x.ndim) if a not in axes)
  return x.mean(red), x.var(red), int(np.prod([x.shape[a] for a in red]))


def _randomize(model, seed, stats=True):
  """Random scale, bias (and running stats) in place, the same for any module; dtypes kept."""
  rng = np.random.default_rng(seed)
  draw = dict(
    scale=lambda s: rng.uniform(0.5, 1.5, s),
    bias=rng.standard_normal,
    mean=rng.standard_normal,
    var=lambda s: rng.uniform(0.5, 2.0, s),
  )
  for name in ('scale', 'bias') + (('mean', 'var') if stats else ()):
    variable = getattr(model, name)
    if variable is not None:
      variable[...] = jnp.asarray(draw[name](variable.shape), variable.dtype)
  return model


def _described(state):
  """Each variable of a State as (type, shape, dtype): the state tree's layout."""
  return jax.tree.map(
    lambda v: (type(v).__name__, jnp.shape(v[...]), jnp.asarray(v[...]).dtype),
    state,
    is_leaf=lambda v: isinstance(v, nnx.Variable),
  )


def _values(state):
  return nnx.to_pure_dict(state)


# ---------------------------------------------------------------------------
# Against flax.nnx.BatchNorm.


def _modes(model, mode):
  """(train, evaluate) callables for one of the ways NNX users switch modes."""
  if mode == 'call':
    return (
      lambda x, **kw: model(x, use_running_average=False, **kw),
      lambda x: model(x, use_running_average=True),
    )
  if mode == 'ctor':  # built with use_running_average=False; the call overrides it
    return model, lambda x: model(x, use_running_average=True)
  if mode == 'methods':

    def train(x, **kw):
      model.train()
      return model(x, **kw)

    def evaluate(x):
      model.eval()
      return model(x)

    return train, evaluate
  assert mode == 'view'
  return (
    nnx.view(model, use_running_average=False),
    nnx.view(model, use_running_average=True),
  )


_FLAX_CASES = (
  dict(testcase_name='defaults_rank2', shape=(8, 3)),
  dict(
    testcase_name='ctor_momentum0.9_eps1e-3_nhwc',
    shape=(4, 5, 3, 6),
    momentum=0.9,
    epsilon=1e-3,
    mode='ctor',
  ),
  dict(
    testcase_name='methods_no_bias_axis_minus2_rank3',
    shape=(6, 4, 5),
    axis=-2,
    use_bias=False,
    mode='methods',
  ),
  dict(testcase_name='view_no_scale_rank5', shape=(2, 3, 2, 4, 3), use_scale=False, mode='view'),
  dict(
    testcase_name='two_pass_no_scale_no_bias_nhwc',
    shape=(4, 5, 3, 6),
    use_fast_variance=False,
    use_scale=False,
    use_bias=False,
  ),
  dict(testcase_name='axis1_nchw_momentum0.5', shape=(4, 6, 5, 3), axis=1, momentum=0.5),
  dict(
    testcase_name='dtype_and_param_dtype_bfloat16',
    shape=(8, 3),
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    tol=3e-2,
  ),
  dict(testcase_name='input_bfloat16_nhwc', shape=(4, 5, 3, 6), x_dtype=jnp.bfloat16, tol=2e-2),
  dict(
    testcase_name='float16_everything',
    shape=(6, 5, 4),
    x_dtype=jnp.float16,
    dtype=jnp.float16,
    param_dtype=jnp.float16,
    tol=1e-2,
  ),
  dict(testcase_name='integer_input_promoted', shape=(8, 3), x_dtype=jnp.int32),
  dict(
    testcase_name='no_promotion_dtype_bfloat16',
    shape=(8, 3),
    dtype=jnp.bfloat16,
    promote_dtype=lambda args, dtype=None: args,
    tol=2e-2,
  ),
)


class FlaxParityTest(chex.TestCase):
  """Same constructor, state, outputs, updates and gradients as flax.nnx.BatchNorm."""

  def _train_then_eval(self, cls, shape, x_dtype, mode, kwargs, mask=None, steps=3):
    """Builds, randomizes params, trains on ``steps`` batches, evaluates: (before, ys, y, state)."""
    axis = kwargs.get('axis', -1)
    features = int(np.prod([shape[a] for a in ((axis,) if isinstance(axis, int) else axis)]))
    ctor = dict(use_running_average=False) if mode == 'ctor' else {}
    model = _randomize(cls(features, rngs=nnx.Rngs(0), **ctor, **kwargs), 2)
    graphdef, state = nnx.split(model)
    xs = [_data(shape, k, axis=axis).astype(x_dtype) for k in range(steps)]

    @self.variant
    def train_then_eval(state, xs, mask):
      model = nnx.merge(graphdef, state)
      train, evaluate = _modes(model, mode)
      ys = [train(x, **({} if mask is None else dict(mask=mask))) for x in xs]
      return ys, evaluate(xs[0]), nnx.state(model)

    # A snapshot: without jit, merge reuses (and training mutates) these variables.
    before = (_described(state), _values(state))
    return (before, *train_then_eval(state, xs, mask))

  def _assert_same(self, got, ref, tol):
    (before, *outputs, state), (ref_before, *ref_outputs, ref_state) = got, ref
    # Identical state trees: names, variable types, shapes, dtypes; same initial values.
    self.assertEqual(before[0], ref_before[0])
    chex.assert_trees_all_equal(before[1], ref_before[1])
    self.assertEqual(_described(state), _described(ref_state))
    # Outputs in training and inference (in their dtype's precision), and the
    # running stats after training (float32 from the same statistics, whatever
    # the dtype).
    chex.assert_trees_all_equal_dtypes(outputs, ref_outputs)
    chex.assert_trees_all_close(outputs, ref_outputs, atol=tol, rtol=tol)
    chex.assert_trees_all_close(_values(state), _values(ref_state), atol=1e-5, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_FLAX_CASES)
  def test_matches_flax(self, shape, x_dtype=jnp.float32, mode='call', tol=1e-5, **kwargs):
    ref = self._train_then_eval(nnx.BatchNorm, shape, x_dtype, mode, kwargs)
    got = self._train_then_eval(jnnx.BatchNorm, shape, x_dtype, mode, kwargs)
    self._assert_same(got, ref, tol)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('float32', jnp.float32, None),
    ('dtype_bfloat16', jnp.float32, jnp.bfloat16),
    ('float16', jnp.float16, jnp.float16),
  )
  def test_inference_is_flaxs_bit_for_bit(self, param_dtype, dtype):
    # The same formula in the same order, on the running averages cast to ``dtype``.
    x = _data((6, 2, 4), 0)
    outputs = {}
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = cls(4, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0))
      model = _randomize(model, 2)
      model.mean[...] = 3.0 + model.mean[...]  # not a round number in bfloat16 or float16
      evaluate = lambda g, s, x: nnx.merge(g, s)(x, use_running_average=True)
      outputs[cls] = self.variant(evaluate, static_argnums=0)(*nnx.split(model), x)
    chex.assert_trees_all_equal(outputs[jnnx.BatchNorm], outputs[nnx.BatchNorm])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('rows', (6, 5, 1), True), ('entries', (6, 5, 3), True), ('entries_two_pass', (6, 5, 3), False)
  )
  def test_mask_matches_flax(self, mask_shape, use_fast_variance):
    mask = np.random.default_rng(1).random(mask_shape) < 0.5
    mask[:2] = True
    kwargs = dict(momentum=0.8, use_fast_variance=use_fast_variance)
    ref = self._train_then_eval(nnx.BatchNorm, (6, 5, 3), jnp.float32, 'call', kwargs, mask)
    got = self._train_then_eval(jnnx.BatchNorm, (6, 5, 3), jnp.float32, 'call', kwargs, mask)
    self._assert_same(got, ref, 1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    dict(testcase_name='training_nhwc', use_running_average=False, shape=(4, 3, 3, 5)),
    dict(
      testcase_name='training_nchw_two_pass',
      use_running_average=False,
      shape=(4, 5, 3, 3),
      axis=1,
      use_fast_variance=False,
    ),
    dict(testcase_name='inference', use_running_average=True, shape=(6, 4)),
  )
  def test_gradients_match_flax(self, use_running_average, shape, **kwargs):
    axis = kwargs.get('axis', -1)
    x = _data(shape, 0, axis=axis)
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    grads = {}
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _randomize(cls(shape[axis], momentum=0.9, rngs=nnx.Rngs(0), **kwargs), 2)
      graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

      def loss(params, stats, x, graphdef=graphdef):
        model = nnx.merge(graphdef, params, stats)
        return jnp.sum(w * model(x, use_running_average=use_running_average))

      grads[cls] = self.variant(jax.grad(loss, argnums=(0, 1, 2)))(params, stats, x)
    chex.assert_trees_all_close(grads[jnnx.BatchNorm], grads[nnx.BatchNorm], atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_gradient_through_the_updated_running_stats(self):
    # A loss that trains on one batch and then evaluates another with the
    # running averages just updated: as in Flax, the second term has no
    # gradient with respect to the first batch.
    x1, x2 = _data((6, 4), 0), _data((6, 4), 1)
    grads = {}
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _randomize(cls(4, momentum=0.5, rngs=nnx.Rngs(0)), 2)
      graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

      def loss(params, stats, x1, x2, graphdef=graphdef):
        model = nnx.merge(graphdef, params, stats)
        y1 = model(x1, use_running_average=False)
        y2 = model(x2, use_running_average=True)
        return jnp.sum(jnp.sin(y1)) + jnp.sum(y2**2)

      grads[cls] = self.variant(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, stats, x1, x2)
    chex.assert_trees_all_close(grads[jnnx.BatchNorm], grads[nnx.BatchNorm], atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tuple_axes(self):
    # Flax keeps a flat (num_features,) state for tuple axes and normalizes with
    # it in inference (its training update does not broadcast); jaxbn.nnx uses
    # the same layout and trains as jaxbn.BatchNorm (linen) does.
    x = _data((4, 6, 5, 3), 0, axis=(1, 3))
    models = {
      cls: _randomize(cls(18, axis=(1, 3), momentum=0.8, rngs=nnx.Rngs(0)), 2)
      for cls in (nnx.BatchNorm, jnnx.BatchNorm)
    }
    self.assertEqual(
      _described(nnx.state(models[jnnx.BatchNorm])), _described(nnx.state(models[nnx.BatchNorm]))
    )
    evaluate = self.variant(
      lambda graphdef, state, x: nnx.merge(graphdef, state)(x, use_running_average=True),
      static_argnums=0,
    )
    y = {cls: evaluate(*nnx.split(m), x) for cls, m in models.items()}
    chex.assert_trees_all_close(y[jnnx.BatchNorm], y[nnx.BatchNorm], atol=1e-5, rtol=1e-5)

    model = models[jnnx.BatchNorm]
    linen = jaxbn.BatchNorm(axis=(1, 3), momentum=0.8)
    as_linen = lambda v: jnp.reshape(v[...], (6, 3))
    variables = {
      'params': {'scale': as_linen(model.scale), 'bias': as_linen(model.bias)},
      'batch_stats': {'mean': as_linen(model.mean), 'var': as_linen(model.var)},
    }
    want, updates = linen.apply(variables, x, use_running_average=False, mutable=['batch_stats'])

    @self.variant(static_argnums=0)
    def train(graphdef, state, x):
      model = nnx.merge(graphdef, state)
      return model(x, use_running_average=False), nnx.state(model, nnx.BatchStat)

    got, stats = train(*nnx.split(model), x)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
      jax.tree.map(lambda v: v.reshape(6, 3), _values(stats)),
      updates['batch_stats'],
      atol=1e-6,
      rtol=1e-6,
    )

  def test_random_initializers_and_metadata_as_flax(self):
    kwargs = dict(
      scale_init=nnx.initializers.uniform(),
      bias_init=nnx.initializers.normal(),
      scale_metadata={'tag': 'gamma'},
      bias_metadata={'tag': 'beta'},
      param_dtype=jnp.bfloat16,
    )
    ref = nnx.BatchNorm(5, rngs=nnx.Rngs(3), **kwargs)
    got = jnnx.BatchNorm(5, rngs=nnx.Rngs(3), **kwargs)
    self.assertEqual(_described(nnx.state(got)), _described(nnx.state(ref)))
    chex.assert_trees_all_equal(_values(nnx.state(got)), _values(nnx.state(ref)))
    self.assertEqual((got.scale.tag, got.bias.tag), ('gamma', 'beta'))

  def test_same_constructor_attributes_and_call_as_flax(self):
    theirs = list(inspect.signature(nnx.BatchNorm.__init__).parameters.values())
    ours = list(inspect.signature(jnnx.BatchNorm.__init__).parameters.values())
    # Flax's parameters first, with the same names, kinds and defaults; then
    # jaxbn's, keyword-only.
    strip = lambda p: (p.name, p.kind, p.default)
    self.assertEqual([strip(p) for p in ours[: len(theirs)]], [strip(p) for p in theirs])
    extras = ours[len(theirs) :]
    self.assertIn('unbiased_running_var', [p.name for p in extras])
    self.assertTrue(all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras))
    self.assertEqual(
      [strip(p) for p in inspect.signature(jnnx.BatchNorm.__call__).parameters.values()],
      [strip(p) for p in inspect.signature(nnx.BatchNorm.__call__).parameters.values()],
    )
    # The attributes Flax keeps, with the same values; the extras beside them.
    ref, model = (cls(3, rngs=nnx.Rngs(0)) for cls in (nnx.BatchNorm, jnnx.BatchNorm))
    static = lambda m: {
      k: v for k, v in vars(m).items() if not (k.startswith('_') or isinstance(v, nnx.Variable))
    }
    self.assertLessEqual(static(ref).keys(), static(model).keys())
    for name, value in static(ref).items():
      self.assertEqual(getattr(model, name), value, name)
    for p in extras:
      self.assertEqual(getattr(model, p.name), p.default, p.name)

  def test_mode_switches(self):
    x = _data((6, 3), 0)
    model = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    self.assertIs(model.use_running_average, False)
    model.eval()
    self.assertIs(model.use_running_average, True)
    model.train()
    self.assertIs(model.use_running_average, False)
    # A view shares the variables and leaves the original's mode alone.
    view = nnx.view(model, use_running_average=True)
    self.assertEqual((view.use_running_average, model.use_running_average), (True, False))
    view(x)
    chex.assert_trees_all_equal(model.mean[...], np.zeros(3, np.float32))
    model(x)
    self.assertIs(view.mean, model.mean)
    self.assertIn('use_running_average', nnx.view_info(model))

  def test_no_mode_raises_as_flax(self):
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = cls(3, use_running_average=None, rngs=nnx.Rngs(0))
      with self.assertRaisesRegex(ValueError, r'No `use_running_average` argument'):
        model(jnp.ones((4, 3)))


# ---------------------------------------------------------------------------
# A thin front end: batch_norm's results, bit for bit.


class FunctionalTest(chex.TestCase):
  """The module declares state and passes every option on to `jaxbn.batch_norm`."""

  @parameterized.named_parameters(
    dict(testcase_name='defaults'),
    dict(testcase_name='two_pass_eps1e-2_axis1', use_fast_variance=False, epsilon=1e-2, axis=1),
    dict(testcase_name='cumulative_unbiased', momentum=None, unbiased_running_var=True),
    dict(testcase_name='ghost_renorm', virtual_batch_size=2, renorm_clip=(1.5, 0.5)),
    dict(testcase_name='mask_no_float32_reductions', mask=True, force_float32_reductions=False),
  )
  def test_training_step_is_batch_norms(self, mask=False, **kwargs):
    kwargs = dict(dict(momentum=0.99), **kwargs)
    axis = kwargs.get('axis', -1)
    # Far from the running mean (0): the variance formulas round differently.
    x = 4.0 + _data((8, 3, 3), 0, axis=axis)
    mask = (np.arange(8) % 3 > 0)[:, None, None] if mask else None
    model = _randomize(jnnx.BatchNorm(3, rngs=nnx.Rngs(0), **kwargs), 2)
    count = None if model.count is None else model.count[...]
    params_and_stats = [v[...] for v in (model.scale, model.bias, model.mean, model.var)]
    want = jax.jit(
      lambda x, scale, bias, mean, var, count, mask: jaxbn.batch_norm(
        x,
        scale,
        bias,
        mean,
        var,
        use_running_average=False,
        count=count,
        mask=mask,
        **kwargs,
      )
    )(x, *params_and_stats, count, mask)
    y = nnx.jit(lambda model, x, mask: model(x, mask=mask))(model, x, mask)
    chex.assert_trees_all_equal((y, model.mean[...], model.var[...]), tuple(want))


# ---------------------------------------------------------------------------
# Beyond flax: float64 NumPy references.


def _train(model, xs, **kwargs):
  """Trains ``model`` on each batch under nnx.jit; returns the outputs."""
  step = nnx.jit(lambda model, x: model(x, use_running_average=False, **kwargs))
  return [step(model, x) for x in xs]


class ExtrasTest(chex.TestCase):
  """momentum=None, unbiased_running_var, ghost batches and renorm's warm-up."""

  @parameterized.named_parameters(('biased', False), ('unbiased', True))
  def test_cumulative_average_is_the_mean_of_the_batch_statistics(self, unbiased_running_var):
    model = jnnx.BatchNorm(
      3, axis=1, momentum=None, unbiased_running_var=unbiased_running_var, rngs=nnx.Rngs(0)
    )
    self.assertEqual(_described(nnx.state(model))['count'], ('BatchStat', (), jnp.int32))
    rng = np.random.default_rng(0)
    batches = [((k + 1) * rng.standard_normal((4, 3, 2)) - k).astype(np.float32) for k in range(4)]
    means, variances = [], []
    for k, x in enumerate(batches):
      _train(model, [x])
      self.assertEqual(int(model.count[...]), k + 1)
      m, v, n = _np_stats(x, axis=1)
      means.append(m)
      variances.append(v * n / (n - 1) if unbiased_running_var else v)
      chex.assert_trees_all_close(
        (model.mean[...], model.var[...]),
        (np.mean(means, 0), np.mean(variances, 0)),
        rtol=1e-5,
        atol=1e-6,
      )
    # Inference neither uses nor changes the count or the averages.
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    model.eval()
    model(batches[0])
    chex.assert_trees_all_equal(_values(nnx.state(model, nnx.BatchStat)), _values(before))

  def test_unbiased_running_var(self):
    x = _data((4, 3, 2, 2), 0, axis=1)  # NCHW: n = 4 * 2 * 2 = 16 values per channel
    unbiased = jnnx.BatchNorm(3, axis=1, momentum=0.9, unbiased_running_var=True, rngs=nnx.Rngs(0))
    biased = jnnx.BatchNorm(3, axis=1, momentum=0.9, rngs=nnx.Rngs(0))
    (y,), (biased_y,) = _train(unbiased, [x]), _train(biased, [x])
    mean, var, n = _np_stats(x, axis=1)
    self.assertEqual(n, 16)
    chex.assert_trees_all_close(unbiased.mean[...], 0.1 * mean, atol=1e-6)
    chex.assert_trees_all_close(unbiased.var[...], 0.9 + 0.1 * var * 16 / 15, rtol=1e-5)
    chex.assert_trees_all_close(biased.var[...], 0.9 + 0.1 * var, rtol=1e-5)
    # Only the stored variance changes: the output normalises with the biased one.
    chex.assert_trees_all_close(y, biased_y, atol=1e-6)

  def test_momentum_is_the_decay_of_the_running_average(self):
    model = jnnx.BatchNorm(3, momentum=0.75, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    xs = [_data((8, 3), k) for k in range(3)]
    ys = _train(model, xs)
    mean, var = np.zeros(3), np.ones(3)
    for x, y in zip(xs, ys, strict=True):
      m, v, _ = _np_stats(x)
      chex.assert_trees_all_close(y, (np.asarray(x) - m) / np.sqrt(v + 1e-5), atol=1e-5)
      mean, var = 0.75 * mean + 0.25 * m, 0.75 * var + 0.25 * v
    chex.assert_trees_all_close((model.mean[...], model.var[...]), (mean, var), rtol=1e-5)

  def test_ghost_batches(self):
    model = jnnx.BatchNorm(3, momentum=0.5, virtual_batch_size=2, rngs=nnx.Rngs(0))
    _randomize(model, 1, stats=False)
    x = _data((8, 2, 3), 0)
    (y,) = _train(model, [x])
    groups = np.asarray(x, np.float64).reshape(4, 2 * 2, 3)
    m, v = groups.mean(1, keepdims=True), groups.var(1, keepdims=True)
    scale, bias = np.asarray(model.scale[...]), np.asarray(model.bias[...])
    want = ((groups - m) / np.sqrt(v + 1e-5) * scale + bias).reshape(8, 2, 3)
    chex.assert_trees_all_close(y, want, atol=1e-5)
    chex.assert_trees_all_close(
      (model.mean[...], model.var[...]),
      (0.5 * m.mean((0, 1)), 0.5 + 0.5 * v.mean((0, 1))),
      rtol=1e-5,
    )
    # Inference normalises the whole batch with the running averages.
    model.eval()
    mean, var = np.asarray(model.mean[...]), np.asarray(model.var[...])
    chex.assert_trees_all_close(
      model(x), (np.asarray(x) - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5
    )

  def test_renorm_warmup_counts_training_steps(self):
    rmax, dmax, warmup = 3.0, 2.0, 4
    model = jnnx.BatchNorm(
      3,
      momentum=0.9,
      renorm_clip=(rmax, dmax),
      renorm_warmup_steps=warmup,
      use_scale=False,
      use_bias=False,
      rngs=nnx.Rngs(0),
    )
    self.assertEqual(_described(nnx.state(model))['renorm_steps'], ('BatchStat', (), jnp.int32))
    step = nnx.jit(lambda model, x: model(x))
    for k in range(warmup + 2):
      x = 4.0 + 5.0 * _data((8, 3), k)  # far from the running mean and var: r, d clip
      mean, var = np.asarray(model.mean[...], np.float64), np.asarray(model.var[...], np.float64)
      y = step(model, x)
      self.assertEqual(int(model.renorm_steps[...]), k + 1)
      m, v, _ = _np_stats(x)
      progress = min(k / warmup, 1.0)
      r_max, d_max = 1 + (rmax - 1) * progress, dmax * progress
      sigma = np.sqrt(var + 1e-5)
      r = np.clip(np.sqrt(v + 1e-5) / sigma, 1 / r_max, r_max)
      d = np.clip((m - mean) / sigma, -d_max, d_max)
      want = (np.asarray(x) - m) / np.sqrt(v + 1e-5) * r + d
      chex.assert_trees_all_close(y, want, atol=1e-4, rtol=1e-5)
    # Inference does not count.
    model.eval()
    model(x)
    self.assertEqual(int(model.renorm_steps[...]), warmup + 2)

  def test_half_precision_statistics_stay_float32(self):
    model = jnnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    x = _data((8, 3, 3, 4), 0)
    (y,) = _train(model, [x.astype(jnp.bfloat16)])
    self.assertEqual((model.mean.dtype, model.var.dtype, y.dtype), (jnp.float32,) * 3)
    unrounded = jnnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    _train(unrounded, [x])
    chex.assert_trees_all_close(
      _values(nnx.state(model)), _values(nnx.state(unrounded)), atol=2e-2, rtol=2e-2
    )
    # Without float32 reductions the statistics keep param_dtype.
    half = jnnx.BatchNorm(
      4, param_dtype=jnp.bfloat16, force_float32_reductions=False, rngs=nnx.Rngs(0)
    )
    _train(half, [x.astype(jnp.bfloat16)])
    self.assertEqual((half.mean.dtype, half.var.dtype), (jnp.bfloat16, jnp.bfloat16))


class ErrorTest(parameterized.TestCase):
  def test_complex_input_is_normalized_as_the_linen_module_does(self):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3)) + 2 - 1j, jnp.complex64)
    model = jnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    linen = jaxbn.BatchNorm(momentum=0.9, use_running_average=False)
    variables = linen.init(jax.random.key(0), x)
    want, updates = linen.apply(variables, x, mutable=['batch_stats'])
    chex.assert_trees_all_close(model(x), want, rtol=1e-6, atol=1e-6)
    self.assertEqual((model.mean[...].dtype, model.var[...].dtype), (jnp.complex64, jnp.float32))
    chex.assert_trees_all_close(
      (model.mean[...], model.var[...]),
      (updates['batch_stats']['mean'], updates['batch_stats']['var']),
      rtol=1e-6,
    )

  def test_wrong_number_of_features(self):
    model = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r'has shape \(3,\).*needs shape \(5,\)'):
      model(jnp.ones((4, 5)))

  def test_axis_out_of_range(self):
    with self.assertRaisesRegex(ValueError, r'axis=2 is out of range.*rank 2'):
      jnnx.BatchNorm(3, axis=2, rngs=nnx.Rngs(0))(jnp.ones((4, 3)))


# ---------------------------------------------------------------------------
# One value per feature (a batch of one): what Flax computes, with a warning.


def _single_value_warnings(record):
  return [str(w.message) for w in record if issubclass(w.category, jaxbn.SingleValueWarning)]


class _MLP(nnx.Module):
  """Linear, BN, Linear, BN for (N, 3) inputs; the BN class is an argument (Flax's or jaxbn's)."""

  def __init__(self, norm, *, rngs):
    self.linear1 = nnx.Linear(3, 4, rngs=rngs)
    self.bn1 = _randomize(norm(4, momentum=0.9, rngs=rngs), 1)
    self.linear2 = nnx.Linear(4, 5, rngs=rngs)
    self.bn2 = _randomize(norm(5, momentum=0.9, rngs=rngs), 2)

  def __call__(self, x):
    return self.bn2(self.linear2(self.bn1(self.linear1(x))))


_CONSOLE = dict(force_terminal=False, no_color=True, width=200)


class SingleValueTest(chex.TestCase):
  """A batch of one: flax.nnx.BatchNorm's outputs and updates, one warning per layer and trace."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('dense', (1, 5), 0, True),
    ('conv', (1, 1, 1, 5), 0, True),
    ('dense_axis_name_of_1', (1, 5), 1, True),
    ('conv_axis_name_of_1', (1, 1, 1, 5), 1, True),
    ('conv_axis_name_of_3', (1, 1, 1, 5), 3, False),
  )
  def test_matches_flax(self, shape, devices, warns):
    # devices > 0: an nnx.vmap of that many shards with axis_name, each a batch of one.
    x = _data((max(devices, 1), *shape), 0)
    axis_name = 'batch' if devices else None
    results, warned = {}, {}
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _randomize(cls(5, momentum=0.9, axis_name=axis_name, rngs=nnx.Rngs(0)), 2)
      graphdef, state = nnx.split(model)

      def step(state, x, graphdef=graphdef):
        model = nnx.merge(graphdef, state)
        if devices:
          y = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='batch')(model, x)
        else:
          y = model(x[0])
        return y, nnx.state(model)

      with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        y, state = self.variant(step)(state, x)
      results[cls] = (y, _values(state))
      warned[cls] = _single_value_warnings(record)
    self.assertEqual(warned[nnx.BatchNorm], [])
    self.assertLen(warned[jnnx.BatchNorm], 1 if warns else 0)
    got, want = results[jnnx.BatchNorm], results[nnx.BatchNorm]
    self.assertEqual(jax.tree.map(jnp.shape, got), jax.tree.map(jnp.shape, want))
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-6)
    if warns:  # the output is the bias alone
      y, bias = got[0], got[1]['bias']
      chex.assert_trees_all_close(y, jnp.broadcast_to(bias, y.shape), atol=1e-6)

  def test_warning_names_each_layer_once_per_trace(self):
    model = _MLP(jnnx.BatchNorm, rngs=nnx.Rngs(0))
    x = _data((1, 3), 0)

    @nnx.jit
    def step(model, x):
      return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)

    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter('always')
      step(model, x)
      step(model, x + 1.0)  # the same trace
      messages = _single_value_warnings(record)
      model.eval()
      step(model, x)  # a new trace, in inference mode
      self.assertEqual(_single_value_warnings(record), messages)
    self.assertLen(messages, 2)
    for features, message in zip((4, 5), messages, strict=True):
      self.assertIn(f'BatchNorm(num_features={features}) in training mode', message)
      self.assertIn(f'shape (1, {features})', message)
      self.assertIn('Use a larger batch, or use_running_average=True', message)

  def test_tabulate_with_a_batch_of_one_is_flaxs_table(self):
    tables = {}
    for norm in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _MLP(norm, rngs=nnx.Rngs(0))
      with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        tables[norm] = nnx.tabulate(model, jnp.ones((1, 3)), console_kwargs=_CONSOLE)
      # A training-mode call, as Flax's: each layer warns.
      self.assertLen(_single_value_warnings(record), 0 if norm is nnx.BatchNorm else 2)
    self.assertIn('bn2', tables[jnnx.BatchNorm])
    self.assertEqual(tables[jnnx.BatchNorm], tables[nnx.BatchNorm])

  def test_per_example_vmap_matches_flax(self):
    # Per-example outputs, running statistics and gradients: each example is a
    # batch of one (shape (3,)), the model broadcast and cloned in each.
    x = _data((6, 3), 0)

    @nnx.vmap(in_axes=(None, 0))
    def per_example(model, x):
      model = nnx.clone(model)
      loss = lambda m: jnp.sum(m(x) ** 2 + m(x))
      grads = nnx.grad(loss)(model)
      return model(x), _values(nnx.state(model, nnx.BatchStat)), _values(grads)

    results = {}
    for norm in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _MLP(norm, rngs=nnx.Rngs(0))
      with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        results[norm] = per_example(model, x)
      # One warning per call of a layer at trace time: 3 calls of each of the 2 layers.
      self.assertLen(_single_value_warnings(record), 0 if norm is nnx.BatchNorm else 6)
    got, want = results[jnnx.BatchNorm], results[nnx.BatchNorm]
    self.assertEqual(jax.tree.map(jnp.shape, got), jax.tree.map(jnp.shape, want))
    y, stats, grads = got
    self.assertEqual(y.shape, (6, 5))
    chex.assert_trees_all_close((y, stats), want[:2], atol=1e-5, rtol=1e-6)
    # The gradients of the bias alone: 2 * bias + 1 for bn2's bias, 0 elsewhere
    # up to the rounding of two cancelling terms (each ~ 1 / sqrt(epsilon)).
    chex.assert_trees_all_close(grads, want[2], atol=1e-3)
    chex.assert_trees_all_close(grads['bn2']['bias'], want[2]['bn2']['bias'], rtol=1e-6)


# ---------------------------------------------------------------------------
# Where users train: NNX transforms, the optimizer, the functional pattern.


class CNN(nnx.Module):
  """Conv -> batch norm -> relu -> global mean pool -> dense, for (N, 6, 6, 1) images."""

  def __init__(self, norm, *, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.norm = norm(4, momentum=0.9, rngs=rngs)
    self.linear = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.linear(nnx.relu(self.norm(self.conv(x))).mean((1, 2)))


def _images(n, seed):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, 6, 6, 1)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.integers(0, 3, n).astype(np.int32))


def _loss(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def _make_train_step():
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    traces.append(1)
    loss, grads = nnx.value_and_grad(_loss)(model, x, labels)
    optimizer.update(model, grads)
    return loss

  return train_step, traces


def _trained(norm, batches):
  model = CNN(norm, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9), wrt=nnx.Param)
  train_step, traces = _make_train_step()
  model.train()
  losses = [train_step(model, optimizer, *batch) for batch in batches]
  model.eval()
  return model, losses, nnx.jit(lambda model, x: model(x))(model, batches[0][0]), len(traces)


class TransformsTest(chex.TestCase):
  def test_train_step_with_optimizer_matches_flax(self):
    batches = [_images(8, k) for k in range(3)]
    ref_model, ref_losses, ref_logits, _ = _trained(nnx.BatchNorm, batches)
    model, losses, logits, traces = _trained(jnnx.BatchNorm, batches)
    self.assertEqual(traces, 1)  # the step compiled once
    self.assertLess(float(losses[-1]), float(losses[0]))
    self.assertEqual(_described(nnx.state(model)), _described(nnx.state(ref_model)))
    chex.assert_trees_all_close(
      (losses, logits, _values(nnx.state(model))),
      (ref_losses, ref_logits, _values(nnx.state(ref_model))),
      atol=1e-5,
      rtol=1e-5,
    )
    # The running averages moved; no optimizer state was kept for them.
    self.assertFalse(np.allclose(model.norm.mean[...], 0.0))

  def test_eval_shape_builds_abstract_modules_and_output_shapes(self):
    # flax issue 4734: shapes of modules holding BatchNorm without computing arrays.
    abstract = nnx.eval_shape(lambda: CNN(jnnx.BatchNorm, rngs=nnx.Rngs(0)))
    concrete = CNN(jnnx.BatchNorm, rngs=nnx.Rngs(0))
    shapes = lambda state: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    self.assertEqual(shapes(_values(nnx.state(abstract))), shapes(_values(nnx.state(concrete))))
    for leaf in jax.tree.leaves(nnx.state(abstract)):  # no array was computed
      self.assertIsInstance(leaf, jax.ShapeDtypeStruct)
    # The output shape of a training-mode call, leaving the running stats alone.
    out = nnx.eval_shape(
      lambda m, x: m(x), concrete, jax.ShapeDtypeStruct((5, 6, 6, 1), jnp.float32)
    )
    self.assertEqual((out.shape, out.dtype), ((5, 3), jnp.float32))
    chex.assert_trees_all_equal(concrete.norm.mean[...], np.zeros(4, np.float32))

    class Inferred(nnx.Module):
      """Sizes its head from the shape of a block holding BatchNorm."""

      def __init__(self, rngs):
        self.block = nnx.Sequential(
          nnx.Conv(1, 2, (3, 3), padding='VALID', rngs=rngs), jnnx.BatchNorm(2, rngs=rngs)
        )
        out = nnx.eval_shape(lambda b, x: b(x), self.block, jnp.zeros((2, 6, 6, 1)))
        self.head = nnx.Linear(int(np.prod(out.shape[1:])), 3, rngs=rngs)

    model = nnx.eval_shape(lambda: Inferred(nnx.Rngs(0)))
    self.assertEqual(model.head.kernel.shape, (32, 3))
    chex.assert_trees_all_equal(Inferred(nnx.Rngs(0)).block.layers[1].mean[...], np.zeros(2))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_axis_name_gives_the_whole_batch_statistics(self):
    # flax issue 4760: 3 shards of 4 examples, synchronized over the vmapped axis.
    x = _data((3, 4, 5), 0)
    w = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    results = {}
    for cls in (nnx.BatchNorm, jnnx.BatchNorm):
      model = _randomize(cls(5, momentum=0.9, axis_name='batch', rngs=nnx.Rngs(0)), 2)
      whole = _randomize(cls(5, momentum=0.9, rngs=nnx.Rngs(0)), 2)
      graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

      def loss(params, stats, x, graphdef=graphdef):
        model = nnx.merge(graphdef, params, stats)
        shard = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0), axis_name='batch')
        y = shard(model, x)
        return jnp.sum(w * y), (y, nnx.state(model, nnx.BatchStat))

      loss_grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
      (grads, _), (y, new_stats) = self.variant(loss_grad)(params, stats, x)
      whole_graphdef, whole_params, whole_stats = nnx.split(whole, nnx.Param, nnx.BatchStat)

      def whole_loss(params, stats, x, graphdef=whole_graphdef):
        model = nnx.merge(graphdef, params, stats)
        y = model(x.reshape(12, 5)).reshape(3, 4, 5)
        return jnp.sum(w * y), (y, nnx.state(model, nnx.BatchStat))

      (want_grads, _), want = jax.grad(whole_loss, argnums=(0, 1), has_aux=True)(
        whole_params, whole_stats, x
      )
      chex.assert_trees_all_close(
        (_values(grads), y, _values(new_stats)),
        (_values(want_grads), want[0], _values(want[1])),
        atol=1e-5,
        rtol=1e-5,
      )
      results[cls] = (y, _values(new_stats))
    chex.assert_trees_all_close(results[jnnx.BatchNorm], results[nnx.BatchNorm], atol=1e-5)

  def test_split_merge_in_jit_and_scan(self):
    xs = jnp.stack([_data((6, 4), k) for k in range(4)])
    eager = jnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0))
    eager_ys = [eager(x) for x in xs]
    graphdef, state = nnx.split(jnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0)))

    def step(state, x):
      model = nnx.merge(graphdef, state)
      y = model(x)
      return nnx.state(model), y

    final, ys = jax.jit(lambda state, xs: jax.lax.scan(step, state, xs))(state, xs)
    chex.assert_trees_all_close(ys, jnp.stack(eager_ys), atol=1e-6)
    chex.assert_trees_all_close(_values(final), _values(nnx.state(eager)), atol=1e-6)
    self.assertEqual(int(final['count'][...]), 4)
    # One jitted step at a time gives the same.
    state = nnx.split(jnnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0)))[1]
    jitted = jax.jit(step)
    for x in xs:
      state, _ = jitted(state, x)
    chex.assert_trees_all_close(_values(state), _values(final), atol=1e-6)


# ---------------------------------------------------------------------------
# SPMD jax.jit over a batch sharded across 8 host devices.


@pytest.mark.on_8_devices
def test_spmd_step_over_a_sharded_batch_equals_the_one_device_step():
  assert jax.device_count() == NUM_DEVICES
  # Auto axes: XLA's SPMD partitioner inserts the collectives (what users of jax.jit get).
  mesh = jax.make_mesh((NUM_DEVICES,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batches = [_images(16, k) for k in range(2)]  # 2 examples per device
  sharded = [jax.device_put(b, NamedSharding(mesh, P('data'))) for b in batches]
  results = []
  for data in (batches, sharded):
    model = CNN(jnnx.BatchNorm, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    train_step, _ = _make_train_step()
    losses = [train_step(model, optimizer, *batch) for batch in data]
    results.append(jax.device_get((losses, _values(nnx.state(model)))))
  assert sharded[0][0].sharding.spec == P('data')
  chex.assert_trees_all_close(results[1], results[0], atol=1e-5, rtol=1e-5)
  # The running mean after one step is that of the global batch (mean 0 before),
  # reduced across the devices.
  model = CNN(jnnx.BatchNorm, rngs=nnx.Rngs(0))
  features = nnx.jit(lambda m, x: m.conv(x))(model, batches[0][0])
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))  # only BN reduces the batch
  assert 'all-reduce' in forward.lower(state, sharded[0][0]).compile().as_text()
  nnx.jit(lambda m, x: m(x))(model, sharded[0][0])
  chex.assert_trees_all_close(
    model.norm.mean[...], 0.1 * _np_stats(features)[0], atol=1e-6, rtol=1e-5
  )


@pytest.mark.on_8_devices
def test_axis_index_groups_under_pmap_give_each_groups_statistics():
  # nnx.vmap has no axis_index_groups; pmap over 8 devices, two groups of 4.
  x = _data((NUM_DEVICES, 3, 5), 0) + jnp.repeat(jnp.arange(2.0), 4)[:, None, None]
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  results = {}
  for cls in (nnx.BatchNorm, jnnx.BatchNorm):
    model = cls(5, momentum=0.5, axis_name='b', axis_index_groups=groups, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(_randomize(model, 2))

    def step(state, x, graphdef=graphdef):
      model = nnx.merge(graphdef, state)
      return model(x), nnx.state(model, nnx.BatchStat)

    y, stats = jax.pmap(step, axis_name='b', in_axes=(None, 0))(state, x)
    for group in groups:
      half = _randomize(cls(5, momentum=0.5, rngs=nnx.Rngs(0)), 2)  # the same, unsynchronized
      want_y = half(x[np.array(group)].reshape(12, 5)).reshape(4, 3, 5)
      chex.assert_trees_all_close(y[np.array(group)], want_y, atol=1e-5, rtol=1e-5)
      for name in ('mean', 'var'):
        want = np.broadcast_to(getattr(half, name)[...], (4, 5))
        chex.assert_trees_all_close(stats[name][...][np.array(group)], want, atol=1e-6, rtol=1e-5)
    results[cls] = (y, _values(stats))
  chex.assert_trees_all_close(results[jnnx.BatchNorm], results[nnx.BatchNorm], atol=1e-5)


@pytest.mark.main_session
@pytest.mark.slow
def test_on_8_host_devices():
  """Runs this module's 8-device tests in a subprocess with 8 host CPU devices."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={NUM_DEVICES}',
  )
  command = [sys.executable, '-m', 'pytest', __file__, '-m', 'on_8_devices', '-q']
  result = subprocess.run(
    [*command, '-p', 'no:cacheprovider'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
  ran = int(re.search(r'(\d+) passed', result.stdout).group(1))
  assert ran == ON_8_DEVICES_COUNT and 'skipped' not in result.stdout, result.stdout[-2000:]


if __name__ == '__main__':
  absltest.main()
