"""Training pieces: the pure train step, evaluation, shuffling, config and workdir checks."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lenet_bn
from jaxbn import models, trainer, training, workdir


def tiny_config(**overrides):
  config = lenet_bn.get_config()
  config.update(overrides)
  return config


def fake_batch(n=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    'image': jax.random.uniform(k1, (n, 28, 28, 1)),
    'label': jax.random.randint(k2, (n,), 0, 10),
  }


@pytest.mark.parametrize('norm', models.NORMS)
def test_train_step_is_pure_compiles_once_and_updates_stats(norm):
  chex.clear_trace_counter()
  state = training.create_train_state(tiny_config(norm=norm), jax.random.key(0))
  step = jax.jit(chex.assert_max_traces(training.train_step, n=1))
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
  states = {
    n: training.create_train_state(tiny_config(norm=n), jax.random.key(0))
    for n in ('jaxbn', 'flax')
  }
  chex.assert_trees_all_close(states['jaxbn'].params, states['flax'].params)
  step = jax.jit(training.train_step)
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
  state = training.create_train_state(tiny_config(), jax.random.key(0))
  batch = fake_batch(n=32)
  indices = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
  scanned, metrics = jax.jit(training.train_steps)(state, batch['image'], batch['label'], indices)
  chex.assert_shape(metrics['loss'], (4,))
  looped = state
  for i, idx in enumerate(indices):
    looped, m = jax.jit(training.train_step)(
      looped, {'image': batch['image'][idx], 'label': batch['label'][idx]}
    )
    np.testing.assert_allclose(metrics['loss'][i], m['loss'], rtol=1e-5)
  chex.assert_trees_all_close(scanned.params, looped.params, rtol=1e-4, atol=1e-5)


def test_evaluate_over_padded_batches_equals_one_batch():
  state = training.create_train_state(tiny_config(), jax.random.key(0))
  state, _ = jax.jit(training.train_step)(state, fake_batch(n=64))
  batch = fake_batch(n=23, seed=3)
  padded = training.pad_and_batch(batch['image'], batch['label'], 10)
  chex.assert_shape(padded[0], (3, 10, 28, 28, 1))
  assert int(padded[2].sum()) == 23
  metrics = jax.jit(training.evaluate)(state, *padded)
  whole = training.eval_step(state, batch)
  np.testing.assert_allclose(metrics['accuracy'], whole['correct'] / 23, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], whole['loss_sum'] / 23, rtol=1e-5)


def test_shuffled_batches_are_distinct_indices_and_depend_on_the_key():
  a = training.shuffled_batches(jax.random.key(0), 1000, 64)
  b = training.shuffled_batches(jax.random.key(1), 1000, 64)
  chex.assert_shape(a, (15, 64))
  assert len(np.unique(a)) == 15 * 64 and a.max() < 1000
  assert not np.array_equal(a, b)


@pytest.mark.parametrize(
  'overrides, pattern',
  [
    ({'norm': 'group'}, r"config.norm='group' is unknown"),
    ({'model': 'resnet'}, r"config.model='resnet' is unknown"),
    ({'learning_rate': 0.0}, r'config.learning_rate=0.0 must be positive'),
    ({'batch_size': -4}, r'config.batch_size=-4 must be positive'),
    ({'num_epochs': 0}, r'config.num_epochs=0 must be positive'),
    ({'batch_size': 1}, r'batch_size=1 with batch norm'),
    ({'bn_momentum': 1.5}, r'bn_momentum=1.5 must be in \[0, 1\]'),
  ],
)
def test_bad_config_values_are_named(overrides, pattern):
  with pytest.raises(trainer.ConfigError, match=pattern):
    trainer.validate_config(tiny_config(**overrides))


def test_batch_size_one_is_fine_without_batch_norm():
  trainer.validate_config(tiny_config(norm='none', batch_size=1))


def test_workdir_refuses_another_config_but_accepts_more_epochs(tmp_path):
  workdir.prepare(tmp_path, tiny_config())
  workdir.prepare(tmp_path, tiny_config(num_epochs=20))  # resuming for longer is fine
  with pytest.raises(workdir.WorkdirError, match=r'learning_rate: 1.0 -> 0.5'):
    workdir.prepare(tmp_path, tiny_config(learning_rate=0.5))
  assert json.loads((tmp_path / 'config.json').read_text())['num_epochs'] == 20


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(workdir.WorkdirError, match=r'Cannot write to workdir .*file/run'):
    workdir.prepare(blocker / 'run', tiny_config())
