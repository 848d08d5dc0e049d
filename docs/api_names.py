"""The public names the API reference must document, and those it lacks.

Used by conf.py (the build fails on a missing name) and tests/test_docs.py.
"""

import importlib
import inspect
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
# jaxbn.equinox needs the optional equinox package; it is documented when it imports.
MODULES = ('jaxbn.linen', 'jaxbn.nnx', 'jaxbn.folding', 'jaxbn.precise', 'jaxbn.statistics')
OPTIONAL_MODULES = ('jaxbn.equinox',)


def _defined_here(module) -> list[str]:
  """A module's public functions and classes: its __all__, or those it defines itself."""
  if hasattr(module, '__all__'):
    return list(module.__all__)
  return [
    name
    for name, obj in vars(module).items()
    if not name.startswith('_')
    and (inspect.isfunction(obj) or inspect.isclass(obj))
    and obj.__module__ == module.__name__
  ]


def public_names() -> list[str]:
  """Every fully qualified public name of jaxbn and its public modules."""
  import jaxbn

  names = [f'jaxbn.{name}' for name in jaxbn.__all__]
  modules = list(MODULES)
  for name in OPTIONAL_MODULES:
    try:
      importlib.import_module(name)
    except ImportError:
      continue
    modules.append(name)
  for name in modules:
    names += [f'{name}.{attr}' for attr in _defined_here(importlib.import_module(name))]
  return names


def documented_names() -> set[str]:
  """The names that the API pages document (`.. autofunction:: NAME` in eval-rst blocks, etc.)."""
  text = '\n'.join(p.read_text() for p in sorted((HERE / 'api').glob('*.md')))
  return set(re.findall(r'^\.\. auto(?:function|class|data|exception):: (\S+)', text, re.M))


def missing() -> list[str]:
  documented = documented_names()
  return [name for name in public_names() if name not in documented]
