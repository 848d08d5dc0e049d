"""`python train.py` end to end: real Fashion-MNIST (a subset), a real workdir, real errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train(*args, cwd=ROOT, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, str(ROOT / 'train.py'), *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def contents(directory):
  """Every path under ``directory`` with its bytes (files) and modification time."""
  return {p: (p.is_file() and p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob('*')}


@pytest.mark.slow
def test_trains_on_real_data_and_writes_every_output(tmp_path):
  workdir = tmp_path / 'run'
  flags = (
    '--config=configs/lenet_bn.py',
    f'--workdir={workdir}',
    '--config.num_epochs=2',
    '--config.batch_size=128',
    '--config.data.num_train=4096',
    '--config.data.num_test=2000',
    f'--config.data.data_dir={tmp_path / "data"}',
  )
  result = train(*flags)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'from IDX files' in out  # a fresh data_dir: built from the Debian files
  assert 'examples/sec on' in out and 'first BN layer gamma' in out
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in records] == [1, 2]
  final = records[-1]
  # It learned: ten classes, so chance is 0.1.
  assert final['test_accuracy'] > 0.5 and final['train_accuracy'] > 0.5
  assert final['train_loss'] < records[0]['train_loss']
  assert f'loss {final["train_loss"]:.3f}, train acc {final["train_accuracy"]:.3f}, ' in out
  assert json.loads((workdir / 'config.json').read_text())['norm'] == 'jaxbn'
  assert (workdir / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (workdir / 'checkpoints' / '2').is_dir()

  # Rerunning the finished run resumes from its checkpoint and trains nothing more.
  again = train(*flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming' in again.stdout and 'epoch 1/2' not in again.stdout
  assert 'from jaxbn cache' in again.stdout


def test_help_explains_the_command():
  result = train('--help')  # absl exits with 1 after --help
  assert 'python train.py --config configs/lenet_bn.py' in result.stdout
  assert '--workdir' in result.stdout


@pytest.mark.parametrize(
  'flag, expected',
  [
    ('--config.num_epoch=2', 'num_epoch'),  # a typo of num_epochs
    ('--config.learning_rate=-1.0', 'config.learning_rate=-1.0 must be a finite number > 0'),
    ('--config.norm=layer', "config.norm='layer' is unknown"),
    ('--config.bn.stats=sync', "config.bn.stats='sync' is unknown"),
    ('--config.data.num_train=100', 'config.batch_size=256 is larger than the 100 training'),
    ('--config.bn.momentun=0.5', 'momentun'),  # a typo in a nested field
    ('--config.batch_size=1', 'single value per feature'),
    # A value the flag parser cannot read as the field's type: absl's words, then the rule.
    ('--config.batch_size=abc', 'config.batch_size must be an integer >= 1'),
    # The three cases of issue 27, which once reached training.
    ('--config.bn.epsilon=-1', 'config.bn.epsilon=-1.0 must be a finite number > 0'),
    ('--config.steps_per_dispatch=-3', 'config.steps_per_dispatch=-3 must be an integer >= 1'),
    (
      '--config.distributed.num_processes=2',
      'config.distributed.num_processes=2 has no effect without '
      'config.distributed.coordinator_address',
    ),
  ],
)
def test_bad_flags_fail_with_one_line_and_leave_the_workdir_unchanged(tmp_path, flag, expected):
  workdir = tmp_path / 'run'  # as an earlier run left it
  (workdir / 'checkpoints' / '1').mkdir(parents=True)
  (workdir / 'checkpoints' / '1' / 'state').write_bytes(b'weights')
  (workdir / 'config.json').write_text('{"norm": "jaxbn"}\n')
  (workdir / 'metrics.jsonl').write_text('{"epoch": 1}\n')
  before = contents(workdir)
  result = train('--config=configs/lenet_bn.py', f'--workdir={workdir}', flag)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and expected in last_line, result.stderr[-2000:]
  assert contents(workdir) == before


def test_corrupt_idx_files_and_an_unwritable_workdir_fail_with_a_message(tmp_path):
  idx = tmp_path / 'idx'
  idx.mkdir()
  for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte'):
    (idx / f'{name}.gz').symlink_to(f'/usr/share/datasets/fashion-mnist/{name}.gz')
  (idx / 't10k-labels-idx1-ubyte.gz').write_bytes(b'not gzip at all')
  data_flags = [f'--config.data.idx_dir={idx}', f'--config.data.data_dir={tmp_path / "cache"}']
  result = train(
    '--config=configs/lenet_bn.py', f'--workdir={tmp_path / "run"}', *data_flags,
    '--config.data.download=False',
  )  # fmt: skip
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 't10k-labels-idx1-ubyte.gz is not a complete gzip file' in result.stderr

  blocker = tmp_path / 'a-file'
  blocker.write_text('')
  result = train('--config=configs/lenet_bn.py', f'--workdir={blocker / "run"}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert f'Cannot write to workdir {blocker / "run"}' in result.stderr
