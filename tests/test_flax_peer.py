"""tools/flax_peer.py: which of Flax's tests it selects, how it compares two runs, its plugin."""

import importlib.util
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('flax_peer', ROOT / 'tools' / 'flax_peer.py')
flax_peer = sys.modules['flax_peer'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flax_peer)

SAMPLE = """
import functools
from absl.testing import absltest, parameterized
from flax import linen as nn, nnx


class Block(nn.Module):
  def setup(self):
    self.bn = nn.BatchNorm()


class Outer(nn.Module):  # uses BatchNorm through Block
  def setup(self):
    self.block = Block()


NORMS = [nnx.LayerNorm, nnx.BatchNorm]
UNRELATED = 3


def test_direct():
  nnx.BatchNorm(3, rngs=nnx.Rngs(0))


def test_through_a_helper():
  Outer()


def test_unrelated():
  nn.Dense(UNRELATED)


class LayersTest(parameterized.TestCase):
  def _make(self):
    return nn.BatchNorm()

  @parameterized.parameters(nnx.BatchNorm, nnx.LayerNorm)
  def test_parameterized(self, cls):
    pass

  def test_through_a_method(self):
    self._make()

  def test_through_a_list(self):
    for norm in NORMS:
      pass

  def test_other(self):
    nn.Dense(2)


class WithSetUp(absltest.TestCase):
  def setUp(self):
    self.bn = Block()

  def test_a(self):
    pass
"""


def test_selects_the_tests_that_use_batchnorm_directly_or_through_helpers():
  assert flax_peer.select_tests(SAMPLE) == [
    'test_direct',
    'test_through_a_helper',
    'LayersTest.test_parameterized',
    'LayersTest.test_through_a_method',
    'LayersTest.test_through_a_list',
    'WithSetUp.test_a',
  ]
  assert flax_peer.select_tests(SAMPLE, word='LayerNorm') == [
    'LayersTest.test_parameterized',
    'LayersTest.test_through_a_list',
  ]
  assert flax_peer.select_tests('def test_x():\n  pass\n') == []


def test_compare_lists_what_passed_with_flax_only():
  flax = {
    'a::test_same': 'passed',
    'a::test_lost': 'passed',
    'a::test_not_run': 'passed',
    'a::test_excused': 'passed',
    'a::test_gained': 'failed',
    'a::test_both_fail': 'failed',
    'a::test_skipped': 'skipped',
  }
  jaxbn = {
    'a::test_same': 'passed',
    'a::test_lost': 'failed',
    'a::test_excused': 'error',
    'a::test_gained': 'passed',
    'a::test_both_fail': 'error',
    'a::test_skipped': 'skipped',
  }
  comparison = flax_peer.compare(flax, jaxbn, {'a::test_excused': 'checks identity'})
  assert comparison.regressions == {'a::test_lost': 'failed', 'a::test_not_run': 'not run'}
  assert comparison.excepted == {'a::test_excused': 'error'}
  assert comparison.gains == {'a::test_gained': 'failed'}
  assert flax_peer.compare(flax, flax).regressions == {}


FAKE_FLAX_TESTS = """
import warnings

import jax.numpy as jnp
from absl.testing import parameterized
from flax import linen as nn, nnx


class PeerTest(parameterized.TestCase):
  @parameterized.parameters(0, 1)
  def test_linen_batchnorm_is_flaxs(self, _):
    assert nn.BatchNorm.__module__ == 'flax.linen.normalization'

  def test_nnx_batchnorm_is_jaxbns(self):
    assert nnx.BatchNorm.__module__ == 'jaxbn.nnx'

  def test_single_value_warning_is_no_error(self):
    # A batch of one: jaxbn's layer warns, Flax's does not.
    y = nnx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.ones((1, 3)))
    assert float(abs(y).max()) == 0.0

  def test_other_warnings_are_errors(self):
    nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    warnings.warn('another', UserWarning)

  def test_not_selected(self):
    pass
"""


@pytest.mark.slow  # two pytest processes that import Flax
def test_runs_with_each_batchnorm_and_reports_the_outcomes(tmp_path):
  tests = tmp_path / 'tests'
  tests.mkdir()
  (tests / 'peer_test.py').write_text(FAKE_FLAX_TESTS)
  (tmp_path / 'pyproject.toml').write_text(
    textwrap.dedent("""\
      [tool.pytest.ini_options]
      filterwarnings = ["error"]
    """)
  )
  selection = flax_peer.selection_of(tmp_path)
  names = (
    'linen_batchnorm_is_flaxs',
    'nnx_batchnorm_is_jaxbns',
    'single_value_warning_is_no_error',
    'other_warnings_are_errors',
  )
  assert list(selection.values()) == [[f'PeerTest.test_{name}' for name in names]]
  runs = {
    module: flax_peer.run_tests(tmp_path, selection, module, 0) for module in ('flax', 'jaxbn')
  }
  node = 'tests/peer_test.py::PeerTest::test_'
  assert runs['flax'] == {
    f'{node}linen_batchnorm_is_flaxs0': 'passed',
    f'{node}linen_batchnorm_is_flaxs1': 'passed',
    f'{node}nnx_batchnorm_is_jaxbns': 'failed',
    f'{node}single_value_warning_is_no_error': 'passed',
    f'{node}other_warnings_are_errors': 'failed',
  }
  assert runs['jaxbn'] == {
    **runs['flax'],
    f'{node}linen_batchnorm_is_flaxs0': 'failed',
    f'{node}linen_batchnorm_is_flaxs1': 'failed',
    f'{node}nnx_batchnorm_is_jaxbns': 'passed',
  }
  assert list(flax_peer.compare(runs['flax'], runs['jaxbn']).regressions) == [
    f'{node}linen_batchnorm_is_flaxs0',
    f'{node}linen_batchnorm_is_flaxs1',
  ]


def test_counts_and_table_group_tests_by_linen_and_nnx():
  runs = {
    'flax': {
      'tests/linen/a_test.py::t': 'passed',
      'tests/nnx/b_test.py::t': 'passed',
      'tests/nnx/b_test.py::u': 'failed',
      'tests/nnx/c_test.py': 'error',  # a file not collected: no test of its own
    },
    'jaxbn': {'tests/linen/a_test.py::t': 'failed', 'tests/nnx/b_test.py::t': 'passed'},
  }
  table = flax_peer.counts(runs)
  assert table == {
    'linen': {'selected': 1, 'flax': 1, 'jaxbn': 0},
    'NNX': {'selected': 2, 'flax': 1, 'jaxbn': 1},
    'total': {'selected': 3, 'flax': 2, 'jaxbn': 1},
  }
  md = flax_peer.table_md('0.1', table, 1)
  assert '| NNX | 2 | 1 | 1 |' in md and '| total | 3 | 2 | 1 |' in md
  assert md.endswith('Regressions (pass with Flax, not with jaxbn): 1\n')
