"""Reproducible runs, resuming after SIGKILL, corrupt checkpoints and numerical faults."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lenet_bn
from d2l_lenet import settings, steps, trainer, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {
  'num_epochs': 3,
  'batch_size': 64,
  'progress_bar': False,
  'data.num_train': 8192,
  'data.num_test': 1000,
}
TIMING = ('train_seconds', 'eval_seconds', 'examples_per_sec')

pytestmark = pytest.mark.slow


def command(run_dir, **extra):
  flags = {**OVERRIDES, **extra}
  return [
    sys.executable,
    str(ROOT / 'train.py'),
    '--config=configs/lenet_bn.py',
    f'--workdir={run_dir}',
    *(f'--config.{k}={v}' for k, v in flags.items()),
  ]


def run(run_dir, **extra):
  result = subprocess.run(
    command(run_dir, **extra), cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def metrics(run_dir):
  records = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def final_params(run_dir):
  config = lenet_bn.get_config()
  model = settings.build_model(config)
  template = steps.create_train_state(jax.random.key(0), model, config.learning_rate)
  epoch, state, skipped = workdir.Checkpoints(run_dir).restore_latest(template)
  assert not skipped
  return epoch, jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})


def assert_bit_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """An uninterrupted run of the short config."""
  run_dir = tmp_path_factory.mktemp('reference') / 'run'
  run(run_dir)
  return run_dir


def test_same_config_and_seed_give_bit_identical_runs(reference_run, tmp_path):
  run(tmp_path / 'again')
  assert metrics(tmp_path / 'again') == metrics(reference_run)
  assert_bit_identical(final_params(tmp_path / 'again'), final_params(reference_run))
  # And the seed matters.
  run(tmp_path / 'seed1', seed=1, num_epochs=1)
  assert metrics(tmp_path / 'seed1')[0] != metrics(reference_run)[0]


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(reference_run, tmp_path):
  run_dir = tmp_path / 'killed'
  process = subprocess.Popen(
    command(run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.monotonic() + 300
  metrics_file = run_dir / 'metrics.jsonl'
  while not (metrics_file.exists() and metrics_file.read_text().count('\n') >= 1):
    assert process.poll() is None, 'the run ended before it could be killed'
    assert time.monotonic() < deadline, 'no epoch finished in time'
    time.sleep(0.02)
  os.kill(process.pid, signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert len(metrics(run_dir)) < 3, 'killed too late: the run had finished'

  out = run(run_dir)
  assert 'resuming' in out
  assert metrics(run_dir) == metrics(reference_run)
  assert_bit_identical(final_params(run_dir), final_params(reference_run))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path):
  run_dir = tmp_path / 'corrupt'
  shutil.copytree(reference_run, run_dir)
  for f in (run_dir / 'checkpoints' / '3').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  out = run(run_dir)
  assert 'skipped unreadable checkpoint of epoch 3' in out
  assert 'resuming' in out and 'after epoch 2' in out
  assert 'epoch 3/3' in out  # epoch 3 trained again
  assert list((run_dir / 'checkpoints').glob('3.unreadable-*'))  # kept, moved aside
  assert metrics(run_dir) == metrics(reference_run)
  assert_bit_identical(final_params(run_dir), final_params(reference_run))


def test_exploding_learning_rate_stops_with_epoch_and_step(tmp_path):
  result = subprocess.run(
    command(tmp_path / 'run', learning_rate=1e38, norm='none', num_epochs=1),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode != 0
  assert 'The loss became' in result.stderr and 'at epoch 1, step' in result.stderr
  assert 'no checkpoint yet' in result.stderr and 'Traceback' not in result.stderr


def test_a_fault_in_epoch_two_keeps_epoch_one(tmp_path, monkeypatch):
  """The loss turns NaN at step 3 of epoch 2: epoch 1's checkpoint and metrics survive."""
  steps_per_epoch = 2048 // 64
  real_train_steps = steps.train_steps

  def faulty_train_steps(state, images, labels, batch_indices, **options):
    new_state, m = real_train_steps(state, images, labels, batch_indices, **options)
    poisoned = state.step + 1 + jnp.arange(len(m['loss'])) >= steps_per_epoch + 3
    return new_state, {**m, 'loss': jnp.where(poisoned, jnp.nan, m['loss'])}

  monkeypatch.setattr(steps, 'train_steps', faulty_train_steps)
  config = lenet_bn.get_config()
  config.update({'num_epochs': 3, 'batch_size': 64, 'progress_bar': False})
  config.data.update({'num_train': 2048, 'num_test': 500})
  with pytest.raises(FloatingPointError, match=r'loss became nan at epoch 2, step 3 of 32'):
    trainer.train_and_evaluate(config, tmp_path)
  assert [r['epoch'] for r in metrics(tmp_path)] == [1]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']
  assert (tmp_path / 'curves.png').exists()


def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_epoch(tmp_path, monkeypatch):
  """A NaN in the parameters (the loss still finite) in epoch 2: epoch 1's outputs survive."""
  real_train_steps = steps.train_steps

  def faulty_train_steps(state, images, labels, batch_indices, **options):
    new_state, m = real_train_steps(state, images, labels, batch_indices, **options)
    poisoned = new_state.step > 2048 // 64 + 3
    params = jax.tree.map(lambda p: jnp.where(poisoned, jnp.nan, p), new_state.params)
    return new_state.replace(params=params), m

  monkeypatch.setattr(steps, 'train_steps', faulty_train_steps)
  config = lenet_bn.get_config()
  config.update({'num_epochs': 3, 'batch_size': 64, 'progress_bar': False})
  config.data.update({'num_train': 2048, 'num_test': 500})
  pattern = r'parameters stopped being finite in epoch 2 .*step 64 of the run'
  with pytest.raises(FloatingPointError, match=pattern):
    trainer.train_and_evaluate(config, tmp_path)
  assert [r['epoch'] for r in metrics(tmp_path)] == [1]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']
