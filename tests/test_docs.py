"""The examples in jaxbn's docstrings run and print what they say."""

import doctest
import io

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
