"""d2l_lenet.steps: the pure train step, its scan, evaluation, shuffling and padding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lenet_bn
from d2l_lenet import models, settings, steps


def state_for(norm='jaxbn', seed=0):
  config = lenet_bn.get_config()
  config.norm = norm
  return steps.create_train_state(
    jax.random.key(seed), settings.build_model(config), config.learning_rate
  )


def fake_batch(n=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    'image': jax.random.uniform(k1, (n, 28, 28, 1)),
    'label': jax.random.randint(k2, (n,), 0, 10),
  }


@pytest.mark.parametrize('norm', models.NORMS)
def test_train_step_is_pure_compiles_once_and_updates_stats(norm):
  chex.clear_trace_counter()
  state = state_for(norm)
  step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  new_state, metrics = step(state, fake_batch(seed=1))
  new_state, metrics = step(new_state, fake_batch(seed=2))
  assert set(metrics) == {'loss', 'accuracy'}
  chex.assert_shape([metrics['loss'], metrics['accuracy']], ())
  assert int(new_state.step) == 2
  # The input state is untouched (pure), and every parameter moved.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
  assert all(jax.tree.leaves(changed))
  if norm == 'none':
    assert new_state.batch_stats == {}
  else:
    bn = new_state.batch_stats['bn1']
    assert not np.allclose(bn['mean'], 0.0) and not np.allclose(bn['var'], 1.0)


def test_jaxbn_and_flax_norms_train_alike():
  """Same init, same batches: the from-scratch and Flax BN models stay together."""
  states = {n: state_for(n) for n in ('jaxbn', 'flax')}
  chex.assert_trees_all_close(states['jaxbn'].params, states['flax'].params)
  step = jax.jit(steps.train_step)
  for i in range(3):
    batch = fake_batch(n=32, seed=i)
    out = {n: step(s, batch) for n, s in states.items()}
    states = {n: s for n, (s, _) in out.items()}
    chex.assert_trees_all_close(out['jaxbn'][1], out['flax'][1], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(states['jaxbn'].params, states['flax'].params, rtol=1e-3, atol=1e-5)
  chex.assert_trees_all_close(
    states['jaxbn'].batch_stats, states['flax'].batch_stats, rtol=1e-3, atol=1e-5
  )


def test_scan_of_steps_equals_one_step_at_a_time():
  state = state_for()
  batch = fake_batch(n=32)
  indices = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
  scanned, metrics = jax.jit(steps.train_steps)(state, batch['image'], batch['label'], indices)
  chex.assert_shape(metrics['loss'], (4,))
  looped = state
  for i, idx in enumerate(indices):
    looped, m = jax.jit(steps.train_step)(
      looped, {'image': batch['image'][idx], 'label': batch['label'][idx]}
    )
    np.testing.assert_allclose(metrics['loss'][i], m['loss'], rtol=1e-5)
  chex.assert_trees_all_close(scanned.params, looped.params, rtol=1e-4, atol=1e-5)


def test_masked_step_equals_the_step_on_the_real_examples():
  """Padding (here far from the data) enters neither the loss nor the BN statistics."""
  state = state_for()
  batch = jax.tree.map(np.asarray, fake_batch(n=16, seed=4))
  mask = np.arange(16) % 3 != 0
  padded = {**batch, 'image': np.where(mask[:, None, None, None], batch['image'], 100.0)}
  step = jax.jit(steps.train_step)
  got = step(state, {**padded, 'mask': mask})
  want = step(state, {k: v[mask] for k, v in batch.items()})
  chex.assert_trees_all_close(got[1], want[1], rtol=1e-5)
  chex.assert_trees_all_close(
    (got[0].params, got[0].batch_stats), (want[0].params, want[0].batch_stats), atol=1e-5
  )


@pytest.mark.parametrize('num_shards, shape', [(1, (3, 10)), (4, (2, 12))])
def test_evaluate_over_padded_batches_equals_one_batch(num_shards, shape):
  state = state_for()
  state, _ = jax.jit(steps.train_step)(state, fake_batch(n=64))
  batch = fake_batch(n=23, seed=3)
  padded = steps.pad_and_batch(batch['image'], batch['label'], 10, num_shards=num_shards)
  chex.assert_shape(padded, [(*shape, 28, 28, 1), shape, shape])  # B a multiple of num_shards
  assert int(padded[2].sum()) == 23
  metrics = jax.jit(steps.evaluate)(state, *padded)
  whole = steps.eval_step(state, batch)
  np.testing.assert_allclose(metrics['accuracy'], whole['correct'] / 23, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], whole['loss_sum'] / 23, rtol=1e-5)


def test_shuffled_batches_are_distinct_indices_and_depend_on_the_key():
  a = steps.shuffled_batches(jax.random.key(0), 1000, 64)
  b = steps.shuffled_batches(jax.random.key(1), 1000, 64)
  chex.assert_shape(a, (15, 64))
  assert len(np.unique(a)) == 15 * 64 and a.max() < 1000
  assert not np.array_equal(a, b)


@pytest.mark.parametrize(
  'steps_per_epoch, wanted, chunk', [(234, 32, 26), (234, 0, 234), (10, 32, 10), (31, 8, 1)]
)
def test_steps_per_dispatch_divides_the_epoch(steps_per_epoch, wanted, chunk):
  assert steps.steps_per_dispatch(steps_per_epoch, wanted) == chunk
