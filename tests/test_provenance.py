"""Results provenance: the CPU, the commit and the packages are recorded as they are."""

import subprocess

from d2l_lenet import provenance

# The first processor of /proc/cpuinfo on an AVX2-only machine (Zen 1), cut short.
ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC 7551 32-Core Processor
stepping\t: 2
flags\t\t: fpu sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni

processor\t: 1
model name\t: another processor
flags\t\t: avx512f
"""


def test_cpu_info_reads_the_first_processor():
  info = provenance.cpu_info(ZEN1)
  assert info == {
    'model_name': 'AMD EPYC 7551 32-Core Processor',
    'vendor': 'AuthenticAMD',
    'family': '23',
    'model': '1',
    'stepping': '2',
    'isa': ['avx', 'avx2', 'f16c', 'fma', 'sse4_1', 'sse4_2'],
  }
  line = provenance.describe_cpu(info)
  assert line.startswith('AMD EPYC 7551 32-Core Processor (family 23 model 1 stepping 2; avx2 fma)')


def test_record_names_this_commit_and_machine():
  head = subprocess.run(
    ['git', 'rev-parse', 'HEAD'], cwd=provenance.ROOT, capture_output=True, text=True, check=True
  ).stdout.strip()
  record = provenance.record(['train.py', '--config', 'configs/lenet_bn.py'])
  assert record['commit'].removesuffix('+dirty') == head
  assert record['command'].endswith('train.py --config configs/lenet_bn.py')
  assert record['cores'] >= 1 and record['cpu']['model_name']
  assert record['packages']['jax'] and record['packages']['flax']


def test_commit_is_dirty_for_changed_code_not_for_changed_results(tmp_path):
  git = lambda *args: subprocess.run(['git', *args], cwd=tmp_path, check=True, capture_output=True)
  git('init', '-q')
  (tmp_path / 'results').mkdir()
  (tmp_path / 'results' / 'table.md').write_text('old\n')
  (tmp_path / 'code.py').write_text('x = 1\n')
  git('add', '.')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'start')
  clean = provenance.git_commit(tmp_path)
  assert len(clean) == 40
  (tmp_path / 'results' / 'table.md').write_text('new\n')
  assert provenance.git_commit(tmp_path) == clean
  (tmp_path / 'code.py').write_text('x = 2\n')
  assert provenance.git_commit(tmp_path) == clean + '+dirty'
