"""The library's tests: the test files that exercise jaxbn/ alone (`make test-lowest`).

  python tools/library_tests.py           # prints the files, one a line
  python tools/library_tests.py --check   # exits 1 if the list is wrong

The library's requirements are jax, flax and numpy alone, so these tests must run in a
venv that holds those (at their lowest versions, say) and the test tools, and nothing of
the chapter's application: no d2l_lenet, configs/, train.py, benchmarks/ or experiments/,
no TensorFlow, tensorflow-datasets, ml_collections, orbax, matplotlib, tqdm or PyTorch.

`--check` reads each test file's imports (every `import`, also those inside functions)
and its string constants, and fails if a listed file imports a module outside `ALLOWED`
or names the application (a subprocess running train.py, say), or if a test file that
is not listed would qualify: a new library test must be added here, or it would never
run against the lowest versions.
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

LIBRARY_TESTS = (
  'tests/test_combinations.py',
  'tests/test_docs.py',
  'tests/test_extensions.py',
  'tests/test_flax_peer.py',
  'tests/test_functional.py',
  'tests/test_fuzz.py',
  'tests/test_linen.py',
  'tests/test_nnx.py',
  'tests/test_pieces.py',
  'tests/test_readme.py',
)

# jaxbn's requirements, optax (a requirement of flax), and the test tools.
ALLOWED = frozenset(
  {'jaxbn', 'jax', 'jaxlib', 'flax', 'numpy', 'optax', 'chex', 'absl', 'pytest', 'hypothesis'}
)
# Words that name the application in a string (a path, a command, a module name).
APPLICATION_WORDS = ('d2l_lenet', 'configs/', 'train.py', 'benchmarks/', 'experiments/')


def imported_modules(tree: ast.AST) -> set[str]:
  """The top-level names of every module the file imports (absolute imports)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split('.')[0])
  return names


def problems(path: pathlib.Path) -> list[str]:
  """Why `path` is not a library test; empty if it is one."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found = []
  for name in sorted(imported_modules(tree) - ALLOWED - set(sys.stdlib_module_names)):
    found.append(f'imports {name}')
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      found.extend(f'names {w!r}' for w in APPLICATION_WORDS if w in node.value)
  return sorted(set(found))


def check() -> list[str]:
  """The errors in `LIBRARY_TESTS`; empty if it lists exactly the library's tests."""
  errors = []
  for name in LIBRARY_TESTS:
    path = ROOT / name
    if not path.exists():
      errors.append(f'{name} is listed in {__file__} but does not exist')
    elif why := problems(path):
      errors.append(f'{name} is a library test but {", ".join(why)}')
  for path in sorted((ROOT / 'tests').glob('test_*.py')):
    name = path.relative_to(ROOT).as_posix()
    if name not in LIBRARY_TESTS and not problems(path):
      errors.append(f'{name} exercises jaxbn alone: add it to LIBRARY_TESTS in {__file__}')
  return errors


def main(argv: list[str]) -> int:
  if argv == ['--check']:
    errors = check()
    print('\n'.join(errors) or f'library tests: {len(LIBRARY_TESTS)} files, list complete')
    return 1 if errors else 0
  if argv:
    print(__doc__, file=sys.stderr)
    return 2
  print('\n'.join(LIBRARY_TESTS))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
