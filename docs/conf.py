"""Sphinx configuration of jaxbn's documentation (make docs)."""

import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(DOCS)]  # jaxbn and d2l_lenet from the checkout; api_names
# The notebooks' kernels start in docs/ and import d2l_lenet from the checkout too.
os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))

import api_names  # noqa: E402

import jaxbn  # noqa: E402

project = 'jaxbn'
copyright = 'the jaxbn authors'
release = version = jaxbn.__version__

extensions = [
  'myst_nb',
  'sphinx.ext.autodoc',
  'sphinx.ext.napoleon',
  'sphinx.ext.viewcode',
  'sphinx.ext.mathjax',
]
exclude_patterns = ['_build', 'api_names.py', '**.ipynb_checkpoints', 'jupyter_execute']

# Google-style docstrings (Args:, Returns:, Raises:), as optax and flax write them.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = 'description'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False}
add_module_names = False
default_role = 'py:obj'  # `name` in a docstring links to its entry

# MyST notebooks (docs/chapter.md, the how-tos) run at every build, on the CPU.
nb_execution_mode = 'cache'
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3

html_theme = 'sphinx_book_theme'
html_title = 'jaxbn'
html_theme_options = {
  'show_toc_level': 2,
}


def _escape_star_shapes(app, what, name, obj, options, lines):
  """Shapes written as (..., *F) in docstrings are text, not reST emphasis."""
  lines[:] = [re.sub(r'(?<=[(\s])\*(?=[A-Z]\w*[,)])', r'\\*', line) for line in lines]


def setup(app):
  app.connect('autodoc-process-docstring', _escape_star_shapes)


# jaxbn.equinox needs the optional equinox package (the docs extra installs it).
try:
  import jaxbn.equinox
except ImportError:
  exclude_patterns.append('api/equinox.md')

# The API reference documents every public name, or the build fails.
_missing = api_names.missing()
if _missing:
  raise RuntimeError(f'docs/api/*.md has no autodoc entry for: {", ".join(_missing)}')
