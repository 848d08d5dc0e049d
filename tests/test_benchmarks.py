"""The benchmark scripts run end to end (tiny sizes): a refactoring cannot break them silently."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # processes that compile the model


def run(*args, ok=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def test_devices_benchmark_writes_its_table(tmp_path):
  run('benchmarks/devices.py', '--devices', '1', '2', '--steps', '2', '--repeats', '1',
      '--out', str(tmp_path))  # fmt: skip
  results = json.loads((tmp_path / 'results.json').read_text())
  assert [r['devices'] for r in results['rows']] == [1, 2]
  assert results['provenance']['cpu']['model_name']
  assert (tmp_path / 'table.md').read_text().count('\n| ') == 3  # header and two rows


def test_throughput_benchmark_writes_its_tables(tmp_path):
  run('benchmarks/throughput.py', '--skip-torch', '--epochs', '0', '--steps', '2',
      '--repeats', '1', '--warmup', '1', '--out', str(tmp_path))  # fmt: skip
  results = json.loads((tmp_path / 'results.json').read_text())
  assert {r['variant'] for r in results['rows']} >= {'jaxbn LeNet, norm=jaxbn (NNX)'}
  assert 'jaxbn LeNet, norm=flax' in (tmp_path / 'table.md').read_text()


def test_separate_processes_benchmark_restricts_both_frameworks_to_avx2(tmp_path):
  run('benchmarks/separate.py', '--isa', 'avx2', '--passes', '1', '--rounds', '1', '--steps', '2',
      '--warmup', '1', '--variants', 'jaxbn LeNet, norm=none', 'torch nn.BatchNorm',
      '--scripts', '1', '--epochs', '1', '--out', str(tmp_path))  # fmt: skip
  results = json.loads((tmp_path / 'results.json').read_text())
  jax_row, torch_row = results['rows']
  assert jax_row['processes'][0]['isa'].startswith('XLA max ISA AVX2')
  if shutil.which('objdump'):
    assert ', 0 AVX-512 operands' in jax_row['processes'][0]['isa']
  assert torch_row['processes'][0]['isa'] == 'ATen CPU capability AVX2'
  assert torch_row['ratio_to_torch_nn_batchnorm']['median'] == 1.0
  # One pass is nn.BatchNorm, the JAX variant, nn.BatchNorm: the ratio is over both neighbours.
  before, after = (p['examples_per_sec'] for p in torch_row['processes'])
  assert jax_row['ratio_to_torch_nn_batchnorm']['median'] == pytest.approx(
    jax_row['examples_per_sec'] / (before * after) ** 0.5
  )
  assert results['environment']['ATEN_CPU_CAPABILITY'] == 'avx2'
  assert results['provenance']['cpu']['model_name']
  assert 'jaxbn LeNet, norm=none' in (tmp_path / 'table.md').read_text()
  scripts = results['end_to_end']['examples_per_sec_each_process']
  assert len(scripts['train.py']) == len(scripts['torch_lenet.py']) == 1
  ratio = results['end_to_end']['ratio']['median']
  assert ratio == pytest.approx(scripts['train.py'][0] / scripts['torch_lenet.py'][0])


def test_separate_processes_put_the_reference_around_each_variant(monkeypatch):
  monkeypatch.syspath_prepend(ROOT / 'benchmarks')
  import separate

  ref = separate.throughput.REFERENCE
  variants = ['a', ref, 'b', 'c']
  assert separate.pass_order(variants, 0) == [ref, 'a', ref, 'b', ref, 'c', ref]
  assert separate.pass_order(variants, 1) == [ref, 'c', ref, 'b', ref, 'a', ref]
  assert separate.pass_order(['a', 'b'], 1) == ['b', 'a']
  rate = lambda r: {'examples_per_sec': r}
  processes = [(ref, rate(4.0)), ('a', rate(12.0)), (ref, rate(9.0)), ('b', {'skipped': 'why'}),
               (ref, rate(1.0)), ('c', rate(2.0)), (ref, rate(4.0))]  # fmt: skip
  assert separate.bracketed_ratios(processes) == {'a': 2.0, 'c': 1.0}


# The fields of benchmarks/gpu_check.py's JSON, in a dry run as on a GPU.
GPU_CHECK_FIELDS = {
  'environment': {'jax_version', 'backend', 'devices', 'gpu', 'nvidia_smi'},
  'data': {'source', 'train_examples', 'test_examples', 'tensorflow_loaded'},
  'accelerator_tests': {
    'command', 'returncode', 'passed', 'failed', 'errors', 'skipped', 'seconds', 'output_tail'
  },
  'training': {
    'command', 'returncode', 'seconds', 'epochs', 'accuracy_floor', 'train_loss',
    'train_accuracy', 'test_accuracy', 'test_accuracy_each_epoch', 'examples_per_sec_each_epoch',
    'output_tail',
  },
  'throughput': {
    'batch_size', 'train_examples_on_device', 'steps_per_dispatch', 'steps_per_round', 'rounds',
    'target_examples_per_sec', 'reference_examples_per_sec', 'rows',
  },
  'checks': {'accelerator_tests', 'training', 'throughput_target'},
}  # fmt: skip


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
  """CI's run of `make gpu-check`: each stage at tiny sizes on the CPU, into one JSON."""
  run('benchmarks/gpu_check.py', '--dry-run', '--json', str(tmp_path / 'gpu.json'))
  results = json.loads((tmp_path / 'gpu.json').read_text())
  assert set(results) == {*GPU_CHECK_FIELDS, 'dry_run', 'ok', 'provenance', 'seconds'}
  for stage, fields in GPU_CHECK_FIELDS.items():
    assert set(results[stage]) == fields, stage
  assert results['dry_run'] and results['ok'] and results['provenance']['commit']
  assert results['environment']['backend'] == 'cpu' and results['environment']['gpu'] is None
  assert results['data']['train_examples'] == 512 and not results['data']['tensorflow_loaded']
  tests = results['accelerator_tests']  # collected, and skipped on the CPU
  assert tests['skipped'] > 0 and tests['passed'] == tests['failed'] == tests['errors'] == 0
  train = results['training']
  assert train['returncode'] == 0 and train['epochs'] == 1
  assert 0 <= train['test_accuracy'] <= 1 and len(train['examples_per_sec_each_epoch']) == 1
  rows = results['throughput']['rows']
  assert [(r['norm'], r['dtype']) for r in rows] == [
    ('jaxbn', 'float32'), ('flax', 'float32'), ('none', 'float32'), ('jaxbn', 'bfloat16')
  ]  # fmt: skip
  assert all(r['examples_per_sec'] > 0 and r['conv_impl'] == 'banded' for r in rows)
  assert results['checks']['throughput_target'] is False


def test_gpu_check_without_a_gpu_stops_and_says_so(tmp_path):
  result = run('benchmarks/gpu_check.py', '--json', str(tmp_path / 'gpu.json'), ok=False)
  assert 'no GPU found' in result.stderr and '--dry-run' in result.stderr
  assert not (tmp_path / 'gpu.json').exists()


def test_separate_processes_table_without_the_reference_says_so(monkeypatch):
  """--variants without 'torch nn.BatchNorm' (the script's own example): rates, no ratios."""
  monkeypatch.syspath_prepend(ROOT / 'benchmarks')
  import separate

  process = {'examples_per_sec': 10_000.0, 'rounds': [10_000.0], 'isa': 'XLA max ISA native'}
  results = {
    'provenance': {
      'commit': 'f' * 40,
      'cpu_description': 'a CPU',
      'packages': {'jax': '0.10.2', 'torch': None},
    },
    'isa': 'native',
    'passes': 1,
    'rounds_per_process': 1,
    'steps_per_round': 2,
    'batch_size': 256,
    'rows': [
      {'variant': 'jaxbn LeNet, norm=jaxbn', 'processes': [process], 'examples_per_sec': 1e4}
    ],
  }
  table = separate.markdown(results)
  row = '| jaxbn LeNet, norm=jaxbn | 10,000 | no `nn.BatchNorm` processes | XLA max ISA native |'
  assert row in table.splitlines()
