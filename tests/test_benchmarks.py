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


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


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
      '--out', str(tmp_path))  # fmt: skip
  results = json.loads((tmp_path / 'results.json').read_text())
  jax_row, torch_row = results['rows']
  assert jax_row['processes'][0]['isa'].startswith('XLA max ISA AVX2')
  if shutil.which('objdump'):
    assert ', 0 AVX-512 operands' in jax_row['processes'][0]['isa']
  assert torch_row['processes'][0]['isa'] == 'ATen CPU capability AVX2'
  assert torch_row['ratio_to_torch_nn_batchnorm']['median'] == 1.0
  assert results['environment']['ATEN_CPU_CAPABILITY'] == 'avx2'
  assert results['provenance']['cpu']['model_name']
  assert 'jaxbn LeNet, norm=none' in (tmp_path / 'table.md').read_text()
