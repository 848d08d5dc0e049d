"""Where a figure came from: the command, the commit, the machine and the packages.

Speeds differ several-fold between CPUs of the same nominal kind (an AMD EPYC
with AVX-512 runs jaxbn's LeNet several times faster than one with AVX2 only), and training
at a high learning rate rounds differently on each: a figure without its CPU,
its commit and its command cannot be checked. `record` gathers all of it for
a results file; the benchmarks (benchmarks/) and the experiments (experiments/)
store it next to what they measure.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The instruction sets that decide which kernels XLA:CPU and PyTorch generate.
ISA_FLAGS = ('sse4', 'avx', 'fma', 'f16c', 'amx')
PACKAGES = (
  'jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'flax', 'optax', 'chex', 'numpy',
  'torch', 'tensorflow-datasets',
)  # fmt: skip
ENVIRONMENT = ('XLA_FLAGS', 'ATEN_CPU_CAPABILITY', 'JAX_PLATFORMS', 'OMP_NUM_THREADS')


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
  """Model name, vendor, family/model/stepping and ISA flags of the first CPU.

  ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None; on systems
  without it only ``platform.processor()`` is known). ``isa`` keeps the flags
  that start with one of `ISA_FLAGS` (``avx2``, ``fma``, every ``avx512*``...).
  """
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path('/proc/cpuinfo').read_text()
    except OSError:
      cpuinfo = ''
  fields = {}
  for line in cpuinfo.split('\n\n', 1)[0].splitlines():
    key, _, value = line.partition(':')
    fields[key.strip()] = value.strip()
  flags = fields.get('flags', '').split()
  return {
    'model_name': fields.get('model name') or platform.processor() or platform.machine(),
    'vendor': fields.get('vendor_id'),
    'family': fields.get('cpu family'),
    'model': fields.get('model'),
    'stepping': fields.get('stepping'),
    'isa': sorted(f for f in flags if f.startswith(ISA_FLAGS)),
  }


def describe_cpu(info: dict[str, Any] | None = None) -> str:
  """One line, e.g. ``'AMD EPYC (family 25 model 17 stepping 1; avx2 avx512f fma), 2 cores'``."""
  info = cpu_info() if info is None else info
  isa = [f for f in info['isa'] if f in ('avx2', 'fma') or f.startswith(('avx512f', 'amx'))]
  return (
    f'{info["model_name"]} (family {info["family"]} model {info["model"]} stepping '
    f'{info["stepping"]}; {" ".join(isa) or "no AVX2"}), {len(os.sched_getaffinity(0))} cores'
  )


def git_commit(root: pathlib.Path = ROOT) -> str | None:
  """``HEAD``'s hash, with ``+dirty`` when tracked files differ from it; None outside git.

  Files under results/ do not count: they are what the commands write, and
  ``make bench`` runs three of them in turn.
  """
  try:
    run = lambda *args: subprocess.run(
      ['git', *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    commit = run('rev-parse', 'HEAD')
    changed = run('status', '--porcelain', '--untracked-files=no', '--', '.', ':(exclude)results')
    return commit + ('+dirty' if changed else '')
  except (OSError, subprocess.CalledProcessError):
    return None


def package_versions() -> dict[str, str | None]:
  """Installed versions of `PACKAGES` (None where one is not installed)."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def record(command: list[str] | None = None) -> dict[str, Any]:
  """Everything a results file needs to be checked: command, commit, date, machine, packages.

  ``command`` defaults to this process's ``sys.argv``.
  """
  command = sys.argv if command is None else command
  return {
    'command': ' '.join([pathlib.Path(sys.executable).name, *command]),
    'commit': git_commit(),
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'cpu': cpu_info(),
    'cpu_description': describe_cpu(),
    'cores': len(os.sched_getaffinity(0)),
    'load_average': os.getloadavg(),
    'python': platform.python_version(),
    'packages': package_versions(),
    'environment': {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
  }
