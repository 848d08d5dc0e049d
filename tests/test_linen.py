"""Specification of `jaxbn.BatchNorm`, a drop-in replacement for `flax.linen.BatchNorm`.

Where the options overlap, `flax.linen.BatchNorm` is the reference: the same
variables, outputs, running-statistics updates and gradients. The extras
(``momentum=None``, ``unbiased_running_var``) are checked against NumPy.
"""

import dataclasses
import inspect
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import jaxbn


def _data(shape, seed, dtype=np.float32, axis=-1):
  """A batch whose features have distinct means (-3..3) and spreads (0.5..2)."""
  rng = np.random.default_rng(seed)
  ndim = len(shape)
  axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  keep = tuple(shape[a] if a in axes else 1 for a in range(ndim))
  x = rng.uniform(-3, 3, keep) + rng.uniform(0.5, 2, keep) * rng.standard_normal(shape)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    x = x + 1j * (rng.uniform(-3, 3, keep) + rng.standard_normal(shape))
  return jnp.asarray(x, dtype)


def _np_stats(x, axis=-1):
  """Float64 per-feature (mean, biased var, values per feature)."""
  x = np.asarray(x, np.float64)
  ndim = x.ndim
  axes = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  red = tuple(a for a in range(ndim) if a not in axes)
  return x.mean(red), x.var(red), int(np.prod([x.shape[a] for a in red]))


def _randomize(variables, seed):
  """Random scale, bias and running stats (same for any module), keeping dtypes."""
  rng = np.random.default_rng(seed)
  draw = dict(
    scale=lambda s: rng.uniform(0.5, 1.5, s),
    bias=rng.standard_normal,
    mean=rng.standard_normal,
    var=lambda s: rng.uniform(0.5, 2.0, s),
  )
  return {
    col: {
      name: jnp.asarray(draw[name](v.shape), v.dtype) if name in draw else v
      for name, v in sorted(tree.items())
    }
    for col, tree in sorted(variables.items())
  }


def _shapes_and_dtypes(tree):
  return jax.tree.map(lambda a: (jnp.shape(a), jnp.asarray(a).dtype), tree)


# ---------------------------------------------------------------------------
# Against flax.linen.BatchNorm.

_FLAX_CASES = (
  dict(testcase_name='defaults_rank2', shape=(8, 3)),
  dict(
    testcase_name='ctor_momentum0.9_eps1e-3_nhwc',
    shape=(4, 5, 3, 6),
    momentum=0.9,
    epsilon=1e-3,
    ura='ctor',
  ),
  dict(
    testcase_name='ctor_no_bias_axis_minus2_rank3',
    shape=(6, 4, 5),
    axis=-2,
    use_bias=False,
    ura='ctor',
  ),
  dict(testcase_name='no_scale_rank5', shape=(2, 3, 2, 4, 3), use_scale=False),
  dict(
    testcase_name='two_pass_no_scale_no_bias_nhwc',
    shape=(4, 5, 3, 6),
    use_fast_variance=False,
    use_scale=False,
    use_bias=False,
  ),
  dict(testcase_name='axis1_nchw', shape=(4, 6, 5, 3), axis=1, momentum=0.5),
  dict(testcase_name='tuple_axes', shape=(4, 6, 5, 3), axis=(1, 3)),
  dict(
    testcase_name='dtype_and_param_dtype_bfloat16',
    shape=(8, 3),
    dtype=jnp.bfloat16,
    param_dtype=jnp.bfloat16,
    tol=2e-2,
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
  dict(testcase_name='no_float32_reductions', shape=(8, 3), force_float32_reductions=False),
  dict(testcase_name='complex64_nhwc', shape=(4, 5, 3, 6), x_dtype=jnp.complex64, momentum=0.9),
  dict(
    testcase_name='complex64_two_pass_rank2',
    shape=(8, 3),
    x_dtype=jnp.complex64,
    use_fast_variance=False,
  ),
)


class FlaxParityTest(chex.TestCase):
  """Same variables, outputs, updates and gradients as flax.linen.BatchNorm."""

  def _train_then_eval(self, cls, shape, x_dtype, ura, kwargs):
    """init on x0, train step on x1, eval on x0: (init variables, y_train, updates, y_eval)."""
    x0 = _data(shape, 0, x_dtype, kwargs.get('axis', -1))
    x1 = _data(shape, 1, x_dtype, kwargs.get('axis', -1))
    if ura == 'call':
      train_model = eval_model = cls(**kwargs)
      train_kw, eval_kw = dict(use_running_average=False), dict(use_running_average=True)
    else:
      train_model = cls(use_running_average=False, **kwargs)
      eval_model = cls(use_running_average=True, **kwargs)
      train_kw = eval_kw = {}
    init = train_model.init(jax.random.key(0), x0, **train_kw)

    @self.variant
    def train_then_eval(variables, x0, x1):
      y_train, updates = train_model.apply(variables, x1, mutable=['batch_stats'], **train_kw)
      y_eval = eval_model.apply({**variables, **updates}, x0, **eval_kw)
      return y_train, updates, y_eval

    # Random params (so that scale and bias matter); init running stats.
    variables = {**init, **{k: v for k, v in _randomize(init, 2).items() if k == 'params'}}
    return (init, *train_then_eval(variables, x0, x1))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_FLAX_CASES)
  def test_matches_flax(self, shape, x_dtype=jnp.float32, ura='call', tol=1e-5, **kwargs):
    ref = self._train_then_eval(nn.BatchNorm, shape, x_dtype, ura, kwargs)
    got = self._train_then_eval(jaxbn.BatchNorm, shape, x_dtype, ura, kwargs)
    # Identical variable trees: names, shapes, dtypes and initial values.
    chex.assert_trees_all_equal_structs(got[0], ref[0])
    self.assertEqual(_shapes_and_dtypes(got[0]), _shapes_and_dtypes(ref[0]))
    chex.assert_trees_all_equal(got[0], ref[0])
    # Outputs (training and inference) and updated running stats.
    self.assertEqual(_shapes_and_dtypes(got[1:]), _shapes_and_dtypes(ref[1:]))
    chex.assert_trees_all_close(got[1:], ref[1:], atol=tol, rtol=tol)

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
    x = _data(shape, 0, axis=kwargs.get('axis', -1))
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    grads = {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      model = cls(momentum=0.9, **kwargs)
      variables = _randomize(model.init(jax.random.key(0), x, use_running_average=True), 2)

      def loss(params, x, model=model, variables=variables):
        y, _ = model.apply(
          {**variables, 'params': params},
          x,
          use_running_average=use_running_average,
          mutable=['batch_stats'],
        )
        return jnp.sum(w * y)

      grads[cls] = self.variant(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
    chex.assert_trees_all_close(grads[jaxbn.BatchNorm], grads[nn.BatchNorm], atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_complex_gradients_match_flax(self):
    x = _data((8, 3), 0, dtype=jnp.complex64)
    w = _data((8, 3), 1, dtype=jnp.complex64)
    grads = {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      model = cls(momentum=0.9, use_running_average=False)
      variables = _randomize(model.init(jax.random.key(0), x), 2)

      def loss(params, x, model=model, variables=variables):
        y, _ = model.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.real(w * y))

      grads[cls] = self.variant(jax.grad(loss, argnums=(0, 1)))(variables['params'], x)
    chex.assert_trees_all_close(grads[jaxbn.BatchNorm], grads[nn.BatchNorm], atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('call', 'call', 0.9), ('ctor', 'ctor', 0.9), ('cumulative', 'call', None)
  )
  def test_init_does_not_update_running_stats(self, ura, momentum):
    x = 5.0 + 3.0 * _data((8, 2, 4), 0)  # far from mean 0, var 1
    variables = {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      kwargs = {} if cls is nn.BatchNorm else dict(momentum=momentum)
      if ura == 'call':
        init = lambda key, x, cls=cls, kwargs=kwargs: cls(**kwargs).init(
          key, x, use_running_average=False
        )
      else:
        init = lambda key, x, cls=cls, kwargs=kwargs: cls(use_running_average=False, **kwargs).init(
          key, x
        )
      variables[cls] = self.variant(init)(jax.random.key(0), x)
    stats = variables[jaxbn.BatchNorm]['batch_stats']
    chex.assert_trees_all_equal(stats['mean'], np.zeros(4, np.float32))
    chex.assert_trees_all_equal(stats['var'], np.ones(4, np.float32))
    if momentum is None:
      count = stats.pop('count')
      self.assertEqual((count.shape, count.dtype, int(count)), ((), jnp.int32, 0))
    chex.assert_trees_all_equal(variables[jaxbn.BatchNorm], variables[nn.BatchNorm])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('rows', (6, 5, 1), True), ('entries', (6, 5, 3), True), ('entries_two_pass', (6, 5, 3), False)
  )
  def test_mask_matches_flax(self, mask_shape, use_fast_variance):
    x = _data((6, 5, 3), 0)
    mask = np.random.default_rng(1).random(mask_shape) < 0.5
    mask[:2] = True
    outputs = {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      model = cls(momentum=0.8, use_fast_variance=use_fast_variance)
      variables = _randomize(model.init(jax.random.key(0), x, use_running_average=True), 2)
      outputs[cls] = self.variant(
        lambda v, x, m, model=model: model.apply(
          v, x, use_running_average=False, mask=m, mutable=['batch_stats']
        )
      )(variables, x, mask)
    chex.assert_trees_all_close(
      outputs[jaxbn.BatchNorm], outputs[nn.BatchNorm], atol=1e-5, rtol=1e-5
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_axis_name_under_vmap_matches_flax_and_the_whole_batch(self):
    # 3 shards of 4 examples, synchronised over the vmapped axis 'batch'.
    x = _data((3, 4, 5), 0)
    outputs = {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      model = cls(momentum=0.9, axis_name='batch')
      # init outside the named axis: the axis name is ignored during init.
      variables = _randomize(model.init(jax.random.key(0), x[0], use_running_average=False), 2)
      shard = lambda x, model=model, variables=variables: model.apply(
        variables, x, use_running_average=False, mutable=['batch_stats']
      )
      y, updates = self.variant(jax.vmap(shard, axis_name='batch'))(x)
      whole_y, whole_updates = cls(momentum=0.9).apply(
        variables, x.reshape(12, 5), use_running_average=False, mutable=['batch_stats']
      )
      chex.assert_trees_all_close(y, whole_y.reshape(3, 4, 5), atol=1e-5)
      chex.assert_trees_all_close(
        updates, jax.tree.map(lambda a: np.broadcast_to(a, (3, *a.shape)), whole_updates), atol=1e-6
      )
      outputs[cls] = (y, updates)
    chex.assert_trees_all_close(outputs[jaxbn.BatchNorm], outputs[nn.BatchNorm], atol=1e-5)

  def test_same_attributes_defaults_and_call_signature_as_flax(self):
    fields = lambda cls: [f for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]
    theirs, ours = fields(nn.BatchNorm), fields(jaxbn.BatchNorm)
    # Flax's attributes come first, in the same order (positional use works),
    # with the same defaults; the extras come after.
    self.assertEqual([f.name for f in ours[: len(theirs)]], [f.name for f in theirs])
    for a, b in zip(theirs, ours, strict=False):
      self.assertEqual(a.default, b.default, a.name)
    self.assertIn('unbiased_running_var', [f.name for f in ours[len(theirs) :]])
    self.assertEqual(
      list(inspect.signature(jaxbn.BatchNorm.__call__).parameters),
      list(inspect.signature(nn.BatchNorm.__call__).parameters),
    )


# ---------------------------------------------------------------------------
# Beyond flax.


class ExtrasTest(chex.TestCase):
  """momentum=None (cumulative average with a count) and unbiased_running_var."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('biased', False), ('unbiased', True))
  def test_cumulative_average_counts_batches(self, unbiased_running_var):
    model = jaxbn.BatchNorm(momentum=None, unbiased_running_var=unbiased_running_var, axis=1)
    rng = np.random.default_rng(0)
    batches = [((k + 1) * rng.standard_normal((4, 3, 2)) - k).astype(np.float32) for k in range(3)]
    variables = model.init(jax.random.key(0), batches[0], use_running_average=False)
    train = self.variant(
      lambda v, x: model.apply(v, x, use_running_average=False, mutable=['batch_stats'])
    )
    means, variances = [], []
    for k, x in enumerate(batches):
      _, updates = train(variables, x)
      variables = {**variables, **updates}
      stats = variables['batch_stats']
      self.assertEqual(stats['count'].dtype, jnp.int32)
      self.assertEqual(int(stats['count']), k + 1)
      m, v, n = _np_stats(x, axis=1)
      means.append(m)
      variances.append(v * n / (n - 1) if unbiased_running_var else v)
      chex.assert_trees_all_close(
        (stats['mean'], stats['var']), (np.mean(means, 0), np.mean(variances, 0)), rtol=1e-5
      )
    # Inference neither uses nor changes the count.
    _, updates = self.variant(
      lambda v, x: model.apply(v, x, use_running_average=True, mutable=['batch_stats'])
    )(variables, batches[0])
    chex.assert_trees_all_equal(updates['batch_stats'], variables['batch_stats'])

  @chex.variants(with_jit=True, without_jit=True)
  def test_unbiased_running_var(self):
    x = _data((4, 3, 2, 2), 0, axis=1)  # NCHW: n = 4 * 2 * 2 = 16 values per channel
    apply = lambda model: self.variant(
      lambda v, x: model.apply(v, x, use_running_average=False, mutable=['batch_stats'])
    )
    unbiased = jaxbn.BatchNorm(momentum=0.9, axis=1, unbiased_running_var=True)
    variables = unbiased.init(jax.random.key(0), x, use_running_average=False)
    y, updates = apply(unbiased)(variables, x)
    mean, var, n = _np_stats(x, axis=1)
    self.assertEqual(n, 16)
    stats = updates['batch_stats']
    chex.assert_trees_all_close(stats['mean'], 0.1 * mean, atol=1e-6)
    chex.assert_trees_all_close(stats['var'], 0.9 + 0.1 * var * 16 / 15, rtol=1e-5)
    # Only the stored variance changes: the output normalises with the biased one.
    biased_y, _ = apply(jaxbn.BatchNorm(momentum=0.9, axis=1))(variables, x)
    chex.assert_trees_all_close(y, biased_y, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('bfloat16', jnp.bfloat16, 2e-2), ('float16', jnp.float16, 5e-3))
  def test_half_precision_input(self, dtype, tol):
    model = jaxbn.BatchNorm(momentum=0.9)
    x32 = _data((8, 3, 3, 4), 0)
    x = x32.astype(dtype)
    variables = _randomize(model.init(jax.random.key(0), x, use_running_average=False), 2)
    self.assertEqual(
      set(jax.tree.leaves(jax.tree.map(lambda a: a.dtype, variables))), {jnp.dtype(jnp.float32)}
    )
    train = self.variant(
      lambda v, x: model.apply(v, x, use_running_average=False, mutable=['batch_stats'])
    )
    y, updates = train(variables, x)
    # float32 stats; float32 params promote the output, as in flax.
    self.assertEqual(
      _shapes_and_dtypes(updates['batch_stats']), _shapes_and_dtypes(variables['batch_stats'])
    )
    self.assertEqual(y.dtype, jnp.float32)
    # The float32 computation on the same values, and close to the unrounded input.
    same = train(variables, x.astype(jnp.float32))
    chex.assert_trees_all_close((y, updates), same, atol=1e-6, rtol=1e-6)
    unrounded = train(variables, x32)
    chex.assert_trees_all_close((y, updates), unrounded, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# One value per feature (a batch of one): what Flax computes, with a warning.


def _single_value_warnings(record):
  return [str(w.message) for w in record if issubclass(w.category, jaxbn.SingleValueWarning)]


class _Block(nn.Module):
  """Dense, BN, Dense, BN; the BN layer is a field (Flax's or jaxbn's)."""

  norm: type[nn.Module]

  @nn.compact
  def __call__(self, x, train):
    for name in ('bn1', 'bn2'):
      x = nn.Dense(4)(x)
      x = self.norm(use_running_average=not train, momentum=0.9, name=name)(x)
    return x


class _Model(nn.Module):
  """One `_Block`, named ``block``: its BN layers are ``block/bn1`` and ``block/bn2``."""

  norm: type[nn.Module]

  @nn.compact
  def __call__(self, x, train):
    return _Block(self.norm, name='block')(x, train)


class SingleValueTest(chex.TestCase):
  """A batch of one: flax.linen.BatchNorm's outputs and updates, one warning per layer and trace."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ('dense', (1, 5), 0, True),
    ('conv', (1, 1, 1, 5), 0, True),
    ('dense_axis_name_of_1', (1, 5), 1, True),
    ('conv_axis_name_of_1', (1, 1, 1, 5), 1, True),
    ('conv_axis_name_of_3', (1, 1, 1, 5), 3, False),
  )
  def test_matches_flax(self, shape, devices, warns):
    # devices > 0: a vmap of that many shards with axis_name, each a batch of one.
    x = _data((max(devices, 1), *shape), 0)
    axis_name = 'batch' if devices else None
    outputs, warned = {}, {}
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      model = cls(momentum=0.9, axis_name=axis_name)
      # init in training mode on the batch of one itself (the axis name is
      # not used by init, as in Flax).
      variables = _randomize(model.init(jax.random.key(0), x[0], use_running_average=False), 2)
      step = lambda x, model=model, variables=variables: model.apply(
        variables, x, use_running_average=False, mutable=['batch_stats']
      )
      step = jax.vmap(step, axis_name=axis_name) if devices else lambda x, step=step: step(x[0])
      with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter('always')
        outputs[cls] = self.variant(step)(x)
      warned[cls] = _single_value_warnings(record)
    self.assertEqual(warned[nn.BatchNorm], [])
    self.assertLen(warned[jaxbn.BatchNorm], 1 if warns else 0)
    self.assertEqual(
      _shapes_and_dtypes(outputs[jaxbn.BatchNorm]), _shapes_and_dtypes(outputs[nn.BatchNorm])
    )
    chex.assert_trees_all_close(
      outputs[jaxbn.BatchNorm], outputs[nn.BatchNorm], atol=1e-5, rtol=1e-6
    )
    if warns:  # the output is the bias alone
      y, bias = outputs[jaxbn.BatchNorm][0], variables['params']['bias']
      chex.assert_trees_all_close(y, jnp.broadcast_to(bias, y.shape), atol=1e-6)

  def test_warning_names_each_layer_once_per_trace(self):
    model = _Model(jaxbn.BatchNorm)
    x = _data((1, 3), 0)
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter('always')
      # init in training mode on a batch of one learns nothing and says nothing.
      variables = model.init(jax.random.key(0), x, train=True)
      self.assertEqual(_single_value_warnings(record), [])

      def loss(params, x):
        y, updates = model.apply(
          {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        return jnp.sum(y**2), updates

      step = jax.jit(jax.value_and_grad(loss, has_aux=True))
      step(variables['params'], x)
      step(variables['params'], x + 1.0)  # the same trace
      messages = _single_value_warnings(record)
    self.assertLen(messages, 2)
    for name, message in zip(('block/bn1', 'block/bn2'), messages, strict=True):
      self.assertIn(f"BatchNorm at '{name}' in training mode", message)
      self.assertIn('shape (1, 4)', message)
      self.assertIn('Use a larger batch, or use_running_average=True', message)

  def test_tabulate_with_a_batch_of_one_is_flaxs_table(self):
    # nn.tabulate runs init: no warning (pytest's filterwarnings=error).
    tables = {
      norm: nn.tabulate(
        _Model(norm), jax.random.key(0), console_kwargs=dict(width=200, no_color=True)
      )(jnp.ones((1, 3)), train=True)
      for norm in (nn.BatchNorm, jaxbn.BatchNorm)
    }
    self.assertIn('block/bn2', tables[jaxbn.BatchNorm])
    self.assertEqual(tables[jaxbn.BatchNorm], tables[nn.BatchNorm])


class ErrorTest(parameterized.TestCase):
  """Mistakes fail with a message naming the problem; init with one example does not."""

  @parameterized.named_parameters(
    ('call', dict(), dict(use_running_average=False)),
    ('ctor', dict(use_running_average=False), dict()),
    ('cumulative', dict(momentum=None), dict(use_running_average=False)),
  )
  def test_init_with_a_single_example_is_flaxs(self, ctor_kw, call_kw):
    x = 1.0 + _data((1, 3), 0)  # the usual dummy input of model.init
    y, variables = jaxbn.BatchNorm(**ctor_kw).init_with_output(jax.random.key(0), x, **call_kw)
    stats = variables['batch_stats']
    self.assertEqual(int(stats.pop('count', 0)), 0)
    flax_kw = {k: v for k, v in ctor_kw.items() if k != 'momentum'}
    want_y, want = nn.BatchNorm(**flax_kw).init_with_output(jax.random.key(0), x, **call_kw)
    chex.assert_trees_all_equal(variables, want)
    self.assertEqual(_shapes_and_dtypes(variables), _shapes_and_dtypes(want))
    # Training mode on the batch itself: the bias, 0 (not x normalised by mean 0, var 1).
    chex.assert_trees_all_equal(y, want_y, jnp.zeros((1, 3)))

  def test_axis_out_of_range(self):
    with self.assertRaisesRegex(ValueError, r'axis=2 is out of range.*rank 2'):
      jaxbn.BatchNorm(axis=2).init(jax.random.key(0), jnp.ones((4, 3)), use_running_average=False)

  def test_integer_input(self):
    with self.assertRaisesRegex(TypeError, r'floating-point.*int32'):
      jaxbn.BatchNorm().init(
        jax.random.key(0), jnp.ones((4, 3), jnp.int32), use_running_average=False
      )

  @parameterized.parameters(1.5, -0.5)
  def test_momentum_out_of_range(self, momentum):
    with self.assertRaisesRegex(ValueError, r'momentum=.* outside \[0, 1\]'):
      jaxbn.BatchNorm(momentum=momentum).init(
        jax.random.key(0), jnp.ones((4, 3)), use_running_average=False
      )

  def test_wrong_running_stats_shape(self):
    # Running stats of 3 features applied to an input with 5.
    model = jaxbn.BatchNorm(use_scale=False, use_bias=False)
    variables = model.init(jax.random.key(0), jnp.ones((4, 3)), use_running_average=True)
    with self.assertRaisesRegex(ValueError, r'mean has shape \(3,\).*needs shape \(5,\)'):
      model.apply(variables, jnp.ones((4, 5)), use_running_average=True)

  @parameterized.named_parameters(
    ('both', dict(use_running_average=True), dict(use_running_average=False)),
    ('neither', dict(), dict()),
  )
  def test_use_running_average_given_once_as_in_flax(self, ctor_kw, call_kw):
    for cls in (nn.BatchNorm, jaxbn.BatchNorm):
      with self.assertRaisesRegex(ValueError, r'use_running_average'):
        cls(**ctor_kw).init(jax.random.key(0), jnp.ones((4, 3)), **call_kw)


class TracerLeakTest(absltest.TestCase):
  """No tracer escapes jit, grad or vmap (e.g. through module state)."""

  def test_no_leaked_tracers(self):
    model = jaxbn.BatchNorm(momentum=None, axis_name='batch')
    x = _data((2, 4, 3), 0)
    with jax.checking_leaks():
      variables = jax.jit(lambda k, x: model.init(k, x, use_running_average=False))(
        jax.random.key(0), x[0]
      )

      def loss(params, x):
        y, updates = model.apply(
          {**variables, 'params': params}, x, use_running_average=False, mutable=['batch_stats']
        )
        return jnp.sum(y**2), updates

      grad = jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0), axis_name='batch')
      grads, updates = jax.jit(grad)(variables['params'], x)
    chex.assert_tree_all_finite((grads, updates))
    np.testing.assert_array_equal(updates['batch_stats']['count'], [1, 1])


if __name__ == '__main__':
  absltest.main()
