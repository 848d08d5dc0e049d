"""The experiments of docs/why.md: their quick modes end to end, and the trainer they share."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from d2l_lenet import models, study

ROOT = pathlib.Path(__file__).resolve().parents[1]

# script, its table's rows, its figure
QUICK = {
  'covariate_shift': (2, 'covariate_shift.png'),  # lr 1.0: no BN, noisy BN
  'smoothness': (1, 'smoothness.png'),  # lr 1.0: BN
  'learning_rates': (4, 'learning_rates.png'),  # BN and no BN, each after epoch 1 and the last
  'exercises': (1, 'exercises.png'),  # dropout and BN
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(QUICK))
def test_quick_mode_writes_results_table_and_figure(name, tmp_path):
  rows, png = QUICK[name]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, f'experiments/{name}.py', '--quick', '--out', str(tmp_path)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  record = results['provenance']
  assert record['commit'] and record['cpu']['model_name'] and record['wall_seconds'] > 0
  assert results['settings']['seeds'] == [0]
  table = (tmp_path / 'table.md').read_text()
  assert table.startswith(f'Measured at commit {record["commit"][:12]} on ')
  assert table.count('\n| ') == rows + 1  # the header and a row per run
  assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def tiny_data():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(1024 + 512, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=1024 + 512).astype(np.int32)
  return study.Data(images[:1024], labels[:1024], images[1024:], labels[1024:])


def test_train_probes_every_k_steps_on_the_loss_it_trains_on(tiny_data):
  def probe(loss_fn, params, learning_rate):
    return {'loss': loss_fn(params), 'lr': learning_rate}

  run = study.train(
    models.LeNet(), tiny_data, learning_rate=0.5, epochs=2, probe=probe, probe_every=3
  )
  # 4 steps per epoch: probes after steps 3 and 4 (the epoch's end), then 7 and 8.
  assert [p['step'] for p in run['probes']] == [3, 4, 7, 8]
  assert all(p['lr'] == 0.5 for p in run['probes'])
  # The probe's loss is the next batch's training loss: near ln 10 on random labels.
  assert all(1.5 < p['loss'] < 4.0 for p in run['probes'])
  assert [e['epoch'] for e in run['epochs']] == [1, 2] and not run['diverged']
  assert 0.0 <= run['epochs'][-1]['test_accuracy'] <= 1.0


def test_train_stops_when_the_loss_is_not_finite(tiny_data):
  run = study.train(models.LeNet(norm=None), tiny_data, learning_rate=math.inf, epochs=3)
  assert run['diverged'] and len(run['epochs']) == 1


def test_learning_rate_is_an_argument_not_a_constant(tiny_data):
  before = study._chunk._cache_size()
  for lr in (0.1, 0.2):
    study.train(models.LeNet(norm=None), tiny_data, learning_rate=lr, epochs=1)
  assert study._chunk._cache_size() - before <= 1  # one compilation serves both rates


def test_save_writes_json_without_nan(tmp_path):
  text = study.save(tmp_path, {'x': [1.0, math.nan]}, ['| a |'], 'a note', study.begin())
  assert json.loads((tmp_path / 'results.json').read_text())['x'] == [1.0, None]
  assert text.endswith('a note.\n\n| a |')
  jax.clear_caches()
