r"""Mutation testing: put deliberate bugs into a copy of jaxbn and check that a test fails.

  python tests/mutants.py              # every mutant (make mutants)
  python tests/mutants.py --list       # their names
  python tests/mutants.py --only data  # those whose name contains 'data'

Each mutant replaces one exact piece of code (it must occur once) in a fresh
copy of the repository and runs the tests that guard it; a mutant that no
test notices *survives*, which means a test is still to be written. Exits
non-zero if any mutant survives or no longer applies (its code has changed:
update the mutant with the code).

To add one: a `Mutant` with a name saying what the bug is, the file, the
original text, its replacement, and the test files to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COPIED = ('jaxbn', 'tests', 'configs', 'train.py', 'pyproject.toml', 'README.md')


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  original: str
  mutated: str
  tests: tuple[str, ...]


MUTANTS = (
  Mutant(
    'data: the cache is accepted on its shapes alone',
    'jaxbn/data.py',
    'hashlib.sha256(_idx_bytes(arrays[key])).hexdigest() != IDX_SHA256[name]',
    'False',
    ('tests/test_data.py',),
  ),
  Mutant(
    'data: a prepared tfds copy is downloaded again',
    'jaxbn/data.py',
    'return _load_tfds(data_dir, download=False)',
    'return _load_tfds(data_dir, download=True)',
    ('tests/test_data.py',),
  ),
  Mutant(
    'data: the IDX checksum is not checked',
    'jaxbn/data.py',
    'if digest != IDX_SHA256[name]:',
    'if False:',
    ('tests/test_data.py',),
  ),
  Mutant(
    'data: images are not scaled to [0, 1]',
    'jaxbn/data.py',
    'u8.astype(np.float32) / 255.0',
    'u8.astype(np.float32)',
    ('tests/test_data.py',),
  ),
  Mutant(
    'linen: init updates the running statistics',
    'jaxbn/linen.py',
    'if not initializing and not use_running_average:',
    'if not use_running_average:',
    ('tests/test_linen.py',),
  ),
  Mutant(
    'linen: the cumulative count is not incremented',
    'jaxbn/linen.py',
    'count.value = count.value + 1',
    'count.value = count.value',
    ('tests/test_linen.py',),
  ),
  Mutant(
    'workdir: a workdir of another config is reused',
    'jaxbn/workdir.py',
    '    if changed:\n',
    '    if False:\n',
    ('tests/test_training.py',),
  ),
)


def apply(mutant: Mutant, root: pathlib.Path) -> None:
  path = root / mutant.path
  text = path.read_text()
  if text.count(mutant.original) != 1:
    raise LookupError(
      f'{mutant.path} holds {text.count(mutant.original)} copies of the code of mutant '
      f'{mutant.name!r}: update the mutant in tests/mutants.py to the code as it is.'
    )
  path.write_text(text.replace(mutant.original, mutant.mutated))


def run(mutant: Mutant) -> tuple[str, float]:
  """``'killed'``, ``'survived'`` or ``'stale'`` (the code is no longer there), and seconds."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='jaxbn-mutant-') as tmp:
    root = pathlib.Path(tmp)
    for name in COPIED:
      if (ROOT / name).is_dir():
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns('__pycache__'))
      else:
        shutil.copy(ROOT / name, root / name)
    try:
      apply(mutant, root)
    except LookupError as e:
      print(f'  {e}')
      return 'stale', time.perf_counter() - start
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *mutant.tests]
    env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
  # pytest: 1 = tests failed; anything else (2-5) is an error of the run itself.
  if done.returncode not in (0, 1):
    raise RuntimeError(f'pytest could not run for {mutant.name!r}:\n{done.stdout[-2000:]}')
  return ('killed' if done.returncode == 1 else 'survived'), time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--list', action='store_true', help='print the mutants and exit')
  parser.add_argument('--only', default='', help='run the mutants whose name contains this')
  args = parser.parse_args(argv)
  mutants = [m for m in MUTANTS if args.only in m.name]
  if args.list or not mutants:
    print('\n'.join(m.name for m in mutants) or f'no mutant name contains {args.only!r}')
    return 0 if mutants else 2
  outcomes = {}
  for i, mutant in enumerate(mutants, 1):
    outcome, seconds = run(mutant)
    outcomes[mutant.name] = outcome
    print(f'[{i}/{len(mutants)}] {outcome:8s} {seconds:5.0f} s  {mutant.name}', flush=True)
  bad = [name for name, outcome in outcomes.items() if outcome != 'killed']
  print(f'\n{len(mutants) - len(bad)} of {len(mutants)} mutants killed.')
  for name in bad:
    print(f'  {outcomes[name]}: {name}')
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
