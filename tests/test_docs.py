"""The examples in jaxbn's docstrings run and print what they say."""

import doctest
import io

import jaxbn.functional
import jaxbn.ghost
import jaxbn.linen
import jaxbn.nnx
import jaxbn.normalize
import jaxbn.renorm
import jaxbn.running
import jaxbn.statistics

MODULES = (
  jaxbn.functional,
  jaxbn.ghost,
  jaxbn.linen,
  jaxbn.nnx,
  jaxbn.normalize,
  jaxbn.renorm,
  jaxbn.running,
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
