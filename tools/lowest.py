"""The lowest versions jaxbn claims, read from pyproject.toml (`make test-lowest`).

  python tools/lowest.py pins     # jax==0.8.1 jaxlib==0.8.1 flax==0.12.5 numpy==2.0.0
  python tools/lowest.py verify   # in the venv under test: exits 1 unless those are installed

`pins` turns each `name>=version` of `[project] dependencies` into `name==version`, and
adds jaxlib at jax's version (jax pins its jaxlib; naming it makes pip fail loudly if that
jaxlib was never released). Installing these pins (`make test-lowest`) and passing the
library's tests is what makes the lower bounds true: there is no second list to forget.
A dependency without a `>=` bound is an error, since nothing would test its low end.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / 'pyproject.toml'
REQUIREMENT = re.compile(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][^,;\s]*)\s*(?:,|;|$)')


def lowest() -> dict[str, str]:
  """{distribution: lowest version} for jaxbn's requirements, plus jaxlib."""
  pins = {}
  for requirement in tomllib.loads(PYPROJECT.read_text())['project']['dependencies']:
    match = REQUIREMENT.match(requirement)
    if not match:
      raise SystemExit(f'{PYPROJECT}: {requirement!r} has no ">=" lower bound to test')
    pins[match[1].lower()] = match[2]
    if match[1].lower() == 'jax':
      pins.setdefault('jaxlib', match[2])
  return pins


def _same(a: str, b: str) -> bool:
  """Whether two release numbers are equal, as pip compares them (2.0 == 2.0.0)."""
  pad = lambda v: v.split('.') + ['0'] * (8 - v.count('.'))
  return pad(a) == pad(b)


def verify() -> list[str]:
  """The differences between the installed versions and the pins."""
  errors = []
  for name, version in lowest().items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      installed = None
    if installed is None or not _same(installed, version):
      errors.append(f'{name}: {installed} installed, {version} is the lowest claimed')
  return errors


def main(argv: list[str]) -> int:
  if argv == ['pins']:
    print(' '.join(f'{name}=={version}' for name, version in lowest().items()))
    return 0
  if argv == ['verify']:
    errors = verify()
    found = ', '.join(f'{n} {importlib.metadata.version(n)}' for n in lowest() if not errors)
    python = sys.version.split()[0]
    print('\n'.join(errors) or f'lowest versions installed: {found}, Python {python}')
    return 1 if errors else 0
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
