r"""Is jaxbn a drop-in for Flax's BatchNorm? Flax's own tests, run with each (`make peer`).

  python tools/flax_peer.py [--workers 2] [--cache build/flax_peer]

1. Finds the installed Flax's version and that version's source distribution
   (``pip download flax==VERSION --no-deps --no-binary :all:``, kept under
   ``--cache``, so that a rerun downloads nothing), and unpacks its ``tests/``
   and ``pyproject.toml`` (not its ``flax/``: the tests import the installed
   Flax).
2. Selects the tests that use BatchNorm (`select_tests`): test functions and
   methods whose source mentions ``BatchNorm``, or names a module-level
   definition (a helper model, say) that does, directly or through another.
3. Runs them twice with the sdist's own pytest configuration (warnings are
   errors), each run in its own pytest process: once with Flax's modules, once
   with `jaxbn.BatchNorm` and `jaxbn.nnx.BatchNorm` in place of
   ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` (tools/flax_peer_plugin.py).
   jaxbn's `jaxbn.SingleValueWarning` (batches of one value per feature, which
   Flax normalises silently) is ignored in both runs, and nothing else is.
4. Prints how many tests were selected and passed with each, and lists the
   tests that pass with Flax but not with jaxbn: the regressions. A test in
   `EXCEPTIONS` is listed with its reason instead.

Exit status: 0 if there is no regression, 1 if there is one, 2 if no test was
selected or none passed with Flax (a broken set-up proves nothing). Both runs
take about 3 minutes on 2 CPU cores with ``--workers 0``; each pytest's log is
kept beside the sdist (``pytest-flax.log``, ``pytest-jaxbn.log``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = pathlib.Path(__file__).resolve().parent
WORD = 'BatchNorm'
# jaxbn's warning of a batch of one value per feature, which Flax normalises
# silently: not an error in either run, whatever Flax's configuration says.
IGNORED_WARNING = 'ignore::jaxbn.SingleValueWarning'
# Flax's tests that use BatchNorm but check what jaxbn cannot be without ceasing
# to be jaxbn, by node id, with the reason. Each is still run and reported.
EXCEPTIONS: dict[str, str] = {}


def _segment(lines: list[str], node: ast.AST) -> str:
  """The source of ``node``, its decorators (absl's parameters) included."""
  first = min([node.lineno, *(d.lineno for d in getattr(node, 'decorator_list', ()))])
  return '\n'.join(lines[first - 1 : node.end_lineno])


def _names(node: ast.AST) -> set[str]:
  """Every name and attribute name ``node`` refers to (``Block``, ``self.make``)."""
  found = set()
  for sub in ast.walk(node):
    if isinstance(sub, ast.Name):
      found.add(sub.id)
    elif isinstance(sub, ast.Attribute):
      found.add(sub.attr)
  return found


def _defined_names(node: ast.stmt) -> list[str]:
  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
    return [node.name]
  targets = []
  if isinstance(node, ast.Assign):
    targets = node.targets
  elif isinstance(node, ast.AnnAssign):
    targets = [node.target]
  return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _is_test(node: ast.stmt) -> bool:
  return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith('test')


def select_tests(source: str, word: str = WORD) -> list[str]:
  """The qualified names (``test_f``, ``SomeTest.test_m``) of ``source``'s tests using ``word``.

  A test is a module-level function or a method of a module-level class whose
  name starts with ``test``. It uses ``word`` if its source (decorators
  included) contains it, or refers by name to a helper that does: a
  module-level definition, or a non-test method or attribute of its class,
  whose source contains ``word`` or refers to another such helper. A class
  whose ``setUp`` or ``setUpClass`` uses ``word`` has all its tests selected.

  Returns:
    The names in the order of the source, as ``__qualname__`` spells them.
  """
  tree = ast.parse(source)
  lines = source.splitlines()
  helpers = [(name, node) for node in tree.body for name in _defined_names(node)]
  helpers += [
    (name, node)
    for cls in tree.body
    if isinstance(cls, ast.ClassDef)
    for node in cls.body
    if not _is_test(node)
    for name in _defined_names(node)
  ]
  using = set()
  while True:
    more = {
      name
      for name, node in helpers
      if name not in using and (word in _segment(lines, node) or _names(node) & using)
    }
    if not more:
      break
    using |= more
  uses = lambda node: word in _segment(lines, node) or bool(_names(node) & using)
  selected = [node.name for node in tree.body if _is_test(node) and uses(node)]
  for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
    set_up = any(uses(n) for n in cls.body if _defined_names(n) in (['setUp'], ['setUpClass']))
    selected += [f'{cls.name}.{n.name}' for n in cls.body if _is_test(n) and (set_up or uses(n))]
  return selected


@dataclasses.dataclass(frozen=True)
class Comparison:
  """What `compare` finds: test node ids, each with its outcome under jaxbn."""

  regressions: dict[str, str]  # passed with Flax, not with jaxbn (nor excepted)
  excepted: dict[str, str]  # the same, but listed in the exceptions
  gains: dict[str, str]  # passed with jaxbn, not with Flax (their Flax outcome)


def compare(
  flax: dict[str, str], jaxbn: dict[str, str], exceptions: dict[str, str] | None = None
) -> Comparison:
  """Compares two runs' outcome maps ``{node id: outcome}`` (``passed``, ``failed``, ...).

  A test that passed with Flax and, with jaxbn, had another outcome or none
  (it was not run) is a regression, unless ``exceptions`` names it.
  """
  exceptions = exceptions or {}
  lost = {t: jaxbn.get(t, 'not run') for t, o in flax.items() if o == 'passed'}
  lost = {t: o for t, o in lost.items() if o != 'passed'}
  return Comparison(
    regressions={t: o for t, o in sorted(lost.items()) if t not in exceptions},
    excepted={t: o for t, o in sorted(lost.items()) if t in exceptions},
    gains={
      t: flax.get(t, 'not run')
      for t, o in sorted(jaxbn.items())
      if o == 'passed' and flax.get(t) != 'passed'
    },
  )


def fetch_tests(version: str, cache: pathlib.Path) -> pathlib.Path:
  """The unpacked ``tests/`` and ``pyproject.toml`` of Flax ``version``'s sdist, under ``cache``."""
  root = cache / f'flax-{version}'
  if (root / 'tests').is_dir() and (root / 'pyproject.toml').is_file():
    return root
  cache.mkdir(parents=True, exist_ok=True)
  sdist = cache / f'flax-{version}.tar.gz'
  if not sdist.is_file():
    download = ['download', f'flax=={version}', '--no-deps', '--no-binary', ':all:', '--quiet']
    subprocess.run([sys.executable, '-m', 'pip', *download, '-d', str(cache)], check=True)
  prefix = f'flax-{version}/'
  with tarfile.open(sdist) as tar:
    members = [
      m
      for m in tar.getmembers()
      if m.name.startswith(prefix + 'tests/') or m.name == prefix + 'pyproject.toml'
    ]
    tar.extractall(cache, members=members, filter='data')
  return root


def selection_of(root: pathlib.Path) -> dict[str, list[str]]:
  """``{test file: selected qualified names}`` of the ``*_test.py`` files under ``root/tests``."""
  selection = {}
  for path in sorted((root / 'tests').rglob('*_test.py')):
    names = select_tests(path.read_text())
    if names:
      selection[str(path)] = names
  return selection


def run_tests(
  root: pathlib.Path, selection: dict[str, list[str]], module: str, workers: int
) -> dict[str, str]:
  """Runs the selected tests with ``module``'s BatchNorm in one pytest process; their outcomes."""
  selection_path = root / 'selection.json'
  selection_path.write_text(json.dumps(selection, indent=1))
  outcomes_path = root / f'outcomes-{module}.json'
  outcomes_path.unlink(missing_ok=True)
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.update(
    FLAX_PEER_MODULE=module,
    FLAX_PEER_SELECTION=str(selection_path),
    FLAX_PEER_OUTCOMES=str(outcomes_path),
    PYTHONPATH=os.pathsep.join([str(TOOLS), env.get('PYTHONPATH', '')]).rstrip(os.pathsep),
  )
  command = [
    sys.executable,
    '-m',
    'pytest',
    '-c',
    str(root / 'pyproject.toml'),
    '--rootdir',
    str(root),
    '-p',
    'flax_peer_plugin',
    '-p',
    'no:cacheprovider',
    '-W',
    IGNORED_WARNING,
    '-q',
    '-rfE',
    '--continue-on-collection-errors',
    '--tb=short',
    '-n',
    str(workers),
    *selection,
  ]
  with open(root / f'pytest-{module}.log', 'w') as log:
    subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
  if not outcomes_path.is_file():
    return {}
  return json.loads(outcomes_path.read_text())


def _group(nodeid: str) -> str:
  return 'NNX' if nodeid.startswith('tests/nnx/') else 'linen'


def counts(runs: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
  """``{group: {'selected', 'flax', 'jaxbn'}}``: tests selected and passed with each module."""
  tests = sorted(t for t in runs['flax'] if '::' in t)
  table = {}
  for group in ('linen', 'NNX', 'total'):
    mine = [t for t in tests if group in ('total', _group(t))]
    passed = {m: sum(runs[m].get(t) == 'passed' for t in mine) for m in ('flax', 'jaxbn')}
    table[group] = {'selected': len(mine), **passed}
  return table


def table_md(version: str, table: dict[str, dict[str, int]], regressions: int) -> str:
  """The README's table of `counts`."""
  lines = [
    f"| Flax {version}'s tests that use BatchNorm | selected | pass with Flax | pass with jaxbn |",
    '|---|---|---|---|',
  ]
  lines += [f'| {g} | {c["selected"]} | {c["flax"]} | {c["jaxbn"]} |' for g, c in table.items()]
  return '\n'.join(lines) + f'\n\nRegressions (pass with Flax, not with jaxbn): {regressions}\n'


def write_results(out: pathlib.Path, version: str, runs: dict, comparison: Comparison) -> None:
  """``out``/results.json (counts, regressions, provenance) and ``out``/table.md."""
  sys.path.insert(0, str(ROOT))
  from d2l_lenet import provenance  # the checkout's; the library does not record provenance

  table = counts(runs)
  out.mkdir(parents=True, exist_ok=True)
  results = {
    'provenance': provenance.record(),
    'flax': version,
    'counts': table,
    'regressions': comparison.regressions,
    'excepted': comparison.excepted,
  }
  (out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
  (out / 'table.md').write_text(table_md(version, table, len(comparison.regressions)))


def report(version: str, root: pathlib.Path, runs: dict[str, dict[str, str]]) -> int:
  """Prints the table and the regressions; returns the exit status."""
  flax = runs['flax']
  tests = sorted(t for t in flax if '::' in t)
  print(f"Flax {version}'s tests that use BatchNorm ({root / 'tests'}):")
  print(f'  {"":8}{"selected":>10}{"pass with Flax":>16}{"pass with jaxbn":>17}')
  for group, c in counts(runs).items():
    print(f'  {group:8}{c["selected"]:>10}{c["flax"]:>16}{c["jaxbn"]:>17}')
  errors = sorted(t for t in flax if '::' not in t)
  if errors:  # e.g. a test-only requirement of Flax's that is not installed
    print(f'Not collected with Flax, so not compared: {", ".join(errors)}')
    print(f'  (see {root / "pytest-flax.log"})')
  comparison = compare(flax, runs['jaxbn'], EXCEPTIONS)
  print(f'Regressions (pass with Flax, not with jaxbn): {len(comparison.regressions)}')
  for test, outcome in comparison.regressions.items():
    print(f'  {test}: {outcome}')
  if comparison.excepted:
    print(f'Documented exceptions: {len(comparison.excepted)}')
    for test, outcome in comparison.excepted.items():
      print(f'  {test}: {outcome}; {EXCEPTIONS[test]}')
  if comparison.regressions:
    print(f'Details: {root / "pytest-jaxbn.log"}')
  if not tests or not any(o == 'passed' for o in flax.values()):
    print(f'Nothing was selected or passed with Flax: see {root / "pytest-flax.log"}')
    return 2
  return 1 if comparison.regressions else 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--cache', type=pathlib.Path, default=ROOT / 'build' / 'flax_peer', help='sdist and logs'
  )
  parser.add_argument(
    '--workers', type=int, default=0, help='pytest-xdist workers per run (0: one process)'
  )
  parser.add_argument(
    '--out', type=pathlib.Path, help='write results.json (with provenance) and table.md here'
  )
  args = parser.parse_args(argv)
  version = importlib.metadata.version('flax')
  root = fetch_tests(version, args.cache.resolve())
  selection = selection_of(root)
  runs = {}
  for module in ('flax', 'jaxbn'):
    start = time.perf_counter()
    runs[module] = run_tests(root, selection, module, args.workers)
    print(f'ran with {module} in {time.perf_counter() - start:.0f} s', file=sys.stderr)
  if args.out:
    write_results(args.out, version, runs, compare(runs['flax'], runs['jaxbn'], EXCEPTIONS))
  return report(version, root, runs)


if __name__ == '__main__':
  sys.exit(main())
