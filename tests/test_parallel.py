"""Data-parallel training (d2l_lenet.parallel) against single-device references.

Host CPU devices are set by XLA_FLAGS before JAX starts, so
`test_on_8_host_devices` runs this module again in a subprocess with 8 of
them; the tests marked `on_8_devices` run there (and are deselected in a
session with fewer devices); the others run only in the ordinary session.
"""

import os
import pathlib
import re
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from configs import lenet_bn
from d2l_lenet import parallel, settings, steps, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
# tests/conftest.py deselects (rather than skips) the tests of the other session.
on_8_devices = pytest.mark.on_8_devices
in_main_session = pytest.mark.main_session
ON_8_DEVICES_COUNT = 11  # tests and parametrizations marked on_8_devices
# Unequal real examples per device for a global batch of 32 (4 per device);
# device 3 holds none.
REAL_PER_DEVICE = (4, 1, 3, 0, 2, 4, 1, 2)
# Float32 tolerance for parameters after two steps at the config's learning
# rate 1.0: merely permuting the batch on one device moves them by up to
# 1e-6 (jaxbn) or 4e-6 (flax's one-pass variance); wrong statistics move them
# by 1e-2 or more.
TOLERANCE = {'rtol': 1e-5, 'atol': 2e-5}


def config_for(**overrides):
  """configs/lenet_bn.py with ``overrides`` of dotted fields, e.g. ``{'bn.stats': 'x'}``."""
  config = lenet_bn.get_config()
  config.update_from_flattened_dict(overrides)
  return config


def fake_batch(n=32, seed=0):
  # Zero-mean images. On [0, 1] images some of conv1's channels have a mean
  # large against their spread, where flax.linen.BatchNorm's one-pass variance
  # E[x^2] - E[x]^2 loses most of its digits (flax issue 1491): merely
  # reordering its sums (8 devices vs 1) then moves the parameters after two
  # steps at lr 1.0 by 1e-2, as much as wrong statistics do (here 2e-6).
  rng = np.random.default_rng(seed)
  return {
    'image': rng.uniform(-1.0, 1.0, size=(n, 28, 28, 1)).astype(np.float32),
    'label': rng.integers(0, 10, n).astype(np.int32),
  }


def unequal_mask():
  return np.concatenate([np.arange(4) < r for r in REAL_PER_DEVICE])


def model_for(config, mesh=None):
  """``config``'s model with its BN layers set for ``mesh`` (None: no mesh), as in the trainer."""
  axis_name = None if mesh is None else parallel.bn_axis_name(mesh, config.bn.stats)
  return settings.build_model(config, axis_name)


def state_for(config, mesh=None):
  return steps.create_train_state(jax.random.key(0), model_for(config, mesh), config.learning_rate)


def run_parallel(config, batches, mesh=None):
  """`parallel.make_train_step` over ``batches``; returns (state, per-step metrics)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  step = parallel.make_train_step(mesh, config.bn.stats)
  state = parallel.replicate(mesh, state_for(config, mesh))
  metrics = []
  for batch in batches:
    state, m = step(state, parallel.shard(mesh, batch))
    metrics.append(m)
  return jax.device_get((state, metrics))


def run_single(config, batches):
  """The plain `steps.train_step` on one device over the whole ``batches``."""
  state = state_for(config)
  step = jax.jit(steps.train_step)
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append(m)
  return jax.device_get((state, metrics))


def assert_states_close(a, b, **tolerance):
  chex.assert_trees_all_close((a.params, a.batch_stats), (b.params, b.batch_stats), **tolerance)
  assert int(a.step) == int(b.step)


@in_main_session
@pytest.mark.slow  # spawns a process
def test_on_8_host_devices():
  """Runs this module's 8-device tests in a subprocess with 8 host CPU devices."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={NUM_DEVICES}',
  )
  result = subprocess.run(
    [sys.executable, '-m', 'pytest', __file__, '-q', '-p', 'no:cacheprovider', '--durations=5'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  print(result.stdout[-3000:])
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
  # Every 8-device test ran there: none was skipped or deselected.
  ran = int(re.search(r'(\d+) passed', result.stdout).group(1))
  assert ran == ON_8_DEVICES_COUNT and 'skipped' not in result.stdout, result.stdout[-2000:]


@in_main_session
def test_one_device_step_is_the_single_device_step():
  """On one device the mesh's step is `steps.train_step` itself: the same bits."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = [fake_batch(16, seed=i) for i in range(2)]
  got, got_metrics = run_parallel(config_for(), batches, mesh=mesh)
  want, want_metrics = run_single(config_for(), batches)
  assert_states_close(got, want, rtol=0, atol=0)
  chex.assert_trees_all_equal(got_metrics, want_metrics)


def train_steps_on(mesh, config, data, indices):
  """`parallel.make_train_steps` on ``mesh`` over ``indices`` (S, B) into ``data``."""
  images, labels = parallel.replicate(mesh, (data['image'], data['label']))
  indices = parallel.replicate(mesh, indices)
  train_steps = parallel.make_train_steps(mesh, config.bn.stats)
  state = parallel.replicate(mesh, state_for(config, mesh))
  return jax.device_get(train_steps(state, images, labels, indices))


@in_main_session
def test_one_device_train_steps_are_exactly_the_single_device_steps():
  """What the trainer runs on one device: `steps.train_steps`, to the last bit."""
  data = fake_batch(16)
  indices = np.arange(16, dtype=np.int32).reshape(1, 16)
  got, got_metrics = train_steps_on(
    parallel.make_mesh(jax.devices()[:1]), config_for(), data, indices
  )
  want, want_metrics = jax.device_get(
    jax.jit(steps.train_steps)(state_for(config_for()), data['image'], data['label'], indices)
  )
  assert_states_close(got, want, rtol=0, atol=0)
  chex.assert_trees_all_equal(got_metrics, want_metrics)


def test_the_model_for_the_mesh_keeps_the_config_options():
  """`settings.build_model` with the mesh's `parallel.bn_axis_name`: options kept, axis added."""
  mesh = parallel.make_mesh()
  norm = model_for(config_for(**{'bn.virtual_batch_size': 2}), mesh).norm
  assert norm.keywords['virtual_batch_size'] == 2 and norm.keywords['momentum'] == 0.9
  assert norm.keywords['axis_name'] == (parallel.DATA if mesh.size > 1 else None)
  assert parallel.bn_axis_name(mesh, 'per_device') is None


@on_8_devices
@pytest.mark.parametrize('norm', ['jaxbn', 'flax'])
def test_global_statistics_equal_the_single_device_step(norm):
  """Two steps on 8 devices (4 examples each) = two steps on one device, whole batch."""
  batches = [fake_batch(seed=i) for i in range(2)]
  got, got_metrics = run_parallel(config_for(norm=norm), batches)
  want, want_metrics = run_single(config_for(norm=norm), batches)
  assert_states_close(got, want, **TOLERANCE)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-5)


@on_8_devices
def test_train_steps_over_indices_equal_single_device_steps():
  """The trainer's path: replicated data, index rows cut into blocks, steps in a scan."""
  num_steps = 2
  data = fake_batch(64)
  indices = np.random.default_rng(1).permutation(64)[: num_steps * 32].reshape(num_steps, 32)
  got_state, got_metrics = train_steps_on(parallel.make_mesh(), config_for(), data, indices)
  want_state, want_metrics = jax.device_get(
    jax.jit(steps.train_steps)(
      state_for(config_for()), data['image'], data['label'], indices.astype(np.int32)
    )
  )
  chex.assert_shape(got_metrics['loss'], (num_steps,))
  assert_states_close(got_state, want_state, **TOLERANCE)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-5)


def per_shard_reference_step(state, batch, num_shards):
  """One step in which each of ``num_shards`` blocks of the batch is normalised on its own.

  The model is vmapped over the blocks (BN reduces only over each block);
  the loss is the mean over all examples and the new running averages the
  mean of the blocks' running averages.
  """
  blocks = jax.tree.map(lambda x: x.reshape(num_shards, -1, *x.shape[1:]), batch)

  def loss_fn(params):
    def apply(images):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      return state.apply_fn(variables, images, train=True, mutable=['batch_stats'])

    logits, updates = jax.vmap(apply)(blocks['image'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, blocks['label'])
    return losses.mean(), updates['batch_stats']

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  stats = jax.tree.map(lambda s: s.mean(0), stats)
  return state.apply_gradients(grads=grads, batch_stats=stats), loss


@on_8_devices
def test_per_device_statistics_normalise_each_shard_on_its_own():
  config = config_for(**{'bn.stats': 'per_device'})
  batches = [fake_batch(seed=i) for i in range(2)]
  got, got_metrics = run_parallel(config, batches)
  want = state_for(config)
  reference = jax.jit(per_shard_reference_step, static_argnums=2)
  for batch, metrics in zip(batches, got_metrics, strict=True):
    want, loss = reference(want, batch, NUM_DEVICES)
    np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  # (With global statistics the parameters end up 0.5 away from this reference.)
  assert_states_close(got, jax.device_get(want), **TOLERANCE)


@on_8_devices
def test_masked_statistics_are_those_of_the_real_examples():
  """jaxbn.BatchNorm with axis_name over unequal shards = float64 NumPy over the real rows."""
  rng = np.random.default_rng(0)
  mask = unequal_mask()
  x = rng.normal(3.0, 2.0, size=(32, 5, 5, 3)).astype(np.float32)
  x[~mask] = 1e4  # padding far from the data: it must not enter the statistics
  bn = jaxbn.BatchNorm(use_running_average=False, momentum=0.9, axis_name=parallel.DATA)
  variables = bn.init(jax.random.key(0), x[:4])

  def apply(variables, x, mask):
    return bn.apply(variables, x, mask=mask.reshape(-1, 1, 1, 1), mutable=['batch_stats'])

  sharded = jax.shard_map(
    apply,
    mesh=parallel.make_mesh(),
    in_specs=(P(), P(parallel.DATA), P(parallel.DATA)),
    out_specs=(P(parallel.DATA), P()),
  )
  y, updates = jax.device_get(jax.jit(sharded)(variables, x, mask))
  real = x[mask].astype(np.float64)
  mean, var = real.mean((0, 1, 2)), real.var((0, 1, 2))
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(y[mask], (real - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def masked_batches(num_steps=2):
  """Global batches of 32 with unequal real examples per device; padding far from the data."""
  mask = unequal_mask()
  batches = []
  for i in range(num_steps):
    batch = fake_batch(seed=i)
    batch['image'][~mask] = 100.0
    batches.append({**batch, 'mask': mask})
  return batches


def real_examples(batches):
  return [{k: b[k][b['mask']] for k in ('image', 'label')} for b in batches]


@on_8_devices
def test_masked_step_equals_the_single_device_step_on_the_real_examples():
  """A padded global batch with unequal real examples per device trains as the real ones alone."""
  settings.validate_config(config_for(batch_size=32), NUM_DEVICES, masked=True)
  batches = masked_batches()
  got, got_metrics = run_parallel(config_for(), batches)
  want, want_metrics = run_single(config_for(), real_examples(batches))
  assert_states_close(got, want, **TOLERANCE)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-5)


@on_8_devices
def test_flax_batchnorm_with_masks_and_global_statistics_is_wrong_and_refused():
  """flax issue 2417: the combination that `settings.validate_config` refuses is wrong."""
  config = config_for(norm='flax', batch_size=32)
  with pytest.raises(settings.ConfigError, match='flax issue 2417'):
    settings.validate_config(config, NUM_DEVICES, masked=True)
  # flax.linen.BatchNorm averages the devices' masked means (device 3 has no
  # real example), not the mean of the real examples.
  batches = masked_batches(num_steps=1)
  got, _ = run_parallel(config, batches)
  want, _ = run_single(config, real_examples(batches))
  got_mean, want_mean = got.batch_stats['bn1']['mean'], want.batch_stats['bn1']['mean']
  assert not np.allclose(got_mean, want_mean, **TOLERANCE)


@on_8_devices
def test_sharded_evaluation_equals_single_device_evaluation():
  state = state_for(config_for())
  data = fake_batch(50, seed=3)
  mesh = parallel.make_mesh()
  # Batches of 20 grow to 24, divisible by the 8 devices.
  batches = steps.pad_and_batch(data['image'], data['label'], 20, num_shards=mesh.size)
  got = jax.jit(steps.evaluate)(parallel.replicate(mesh, state), *parallel.shard(mesh, batches, 1))
  want = jax.jit(steps.evaluate)(state, *steps.pad_and_batch(data['image'], data['label'], 20))
  chex.assert_trees_all_close(jax.device_get(got), jax.device_get(want), rtol=1e-5)


@on_8_devices
def test_batch_size_not_divisible_by_the_devices_is_a_config_error(tmp_path):
  with pytest.raises(settings.ConfigError, match='batch_size=12 is not divisible by the 8 devices'):
    trainer.train_and_evaluate(config_for(batch_size=12), tmp_path)


@on_8_devices
def test_virtual_batch_not_dividing_each_device_block_is_a_config_error(tmp_path):
  # 32 examples over 8 devices: blocks of 4, which virtual batches of 8 cannot split.
  config = config_for(batch_size=32, **{'bn.virtual_batch_size': 8})
  settings.validate_config(config)  # 8 divides the global batch
  with pytest.raises(settings.ConfigError, match='divide the 4 examples of each of the 8'):
    trainer.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'config.json').exists()  # refused before anything was written


@in_main_session
@pytest.mark.parametrize(
  'address, processes, process_id, expected',
  [
    ('auto', 0, -1, dict(coordinator_address=None, num_processes=None, process_id=None)),
    ('host0:1234', 4, 2, dict(coordinator_address='host0:1234', num_processes=4, process_id=2)),
  ],
)
def test_initialize_distributed_hands_the_cluster_settings_to_jax(
  monkeypatch, address, processes, process_id, expected
):
  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  config = lenet_bn.get_config().distributed
  config.update(coordinator_address=address, num_processes=processes, process_id=process_id)
  parallel.initialize_distributed(config)
  assert calls == [expected]
  config.coordinator_address = ''  # one process: nothing to start
  parallel.initialize_distributed(config)
  assert len(calls) == 1
