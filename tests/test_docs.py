"""The examples in jaxbn's docstrings run and print what they say; the API reference lists them."""

import doctest
import importlib.util
import io
import pathlib

import jaxbn._functional
import jaxbn._ghost
import jaxbn._normalize
import jaxbn._renorm
import jaxbn._running
import jaxbn.linen
import jaxbn.nnx
import jaxbn.statistics

MODULES = (
  jaxbn._functional,
  jaxbn._ghost,
  jaxbn.linen,
  jaxbn.nnx,
  jaxbn._normalize,
  jaxbn._renorm,
  jaxbn._running,
  jaxbn.statistics,
)


def test_docstring_examples_pass():
  finder, out = doctest.DocTestFinder(), io.StringIO()
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for module in MODULES:
    for test in finder.find(module, globs={**vars(module)}):
      runner.run(test, out=out.write)
  results = runner.summarize(verbose=False)
  assert results.attempted > 0
  assert results.failed == 0, out.getvalue()


def _api_names():
  path = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'api_names.py'
  spec = importlib.util.spec_from_file_location('api_names', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_reference_has_an_entry_for_every_public_name():
  api_names = _api_names()
  names = api_names.public_names()
  assert {f'jaxbn.{name}' for name in __import__('jaxbn').__all__} <= set(names)
  assert api_names.missing() == []
