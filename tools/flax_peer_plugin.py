"""The pytest plugin of tools/flax_peer.py: which BatchNorm, which tests, and their outcomes.

Loaded with ``-p flax_peer_plugin`` (tools/ on ``PYTHONPATH``) into a pytest
run of Flax's own tests, it reads three environment variables:

* ``FLAX_PEER_MODULE``: ``flax`` leaves Flax as it is; ``jaxbn`` puts
  `jaxbn.BatchNorm` and `jaxbn.nnx.BatchNorm` in place of Flax's linen and NNX
  ``BatchNorm`` under every name Flax exports them by, before the test modules
  import Flax.
* ``FLAX_PEER_SELECTION``: a JSON file ``{test file: [qualified names]}``; only
  tests whose function (unwrapped from absl's parameterization) has one of
  those ``__qualname__`` and was defined in that file are kept, the others
  deselected.
* ``FLAX_PEER_OUTCOMES``: the JSON file written at the end, ``{node id:
  outcome}``, the outcome being ``passed``, ``failed``, ``error`` (in set-up or
  tear-down, or a file that could not be collected), ``skipped`` or
  ``xfailed``.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib

import pytest


def substitute_jaxbn() -> None:
  """Every name under which Flax exports its linen and NNX BatchNorm now means jaxbn's."""
  import flax.linen
  import flax.linen.normalization
  import flax.nnx
  import flax.nnx.nn.normalization

  import jaxbn
  import jaxbn.nnx

  flax.linen.BatchNorm = jaxbn.BatchNorm
  flax.linen.normalization.BatchNorm = jaxbn.BatchNorm
  flax.nnx.BatchNorm = jaxbn.nnx.BatchNorm
  flax.nnx.nn.normalization.BatchNorm = jaxbn.nnx.BatchNorm


class _Peer:
  """Deselects the tests not selected and records the outcome of the others."""

  def __init__(self, selection: dict[str, list[str]] | None, outcomes_path: str | None):
    self.wanted = None
    if selection is not None:
      self.wanted = {
        (str(pathlib.Path(f).resolve()), name) for f, names in selection.items() for name in names
      }
    self.outcomes_path = outcomes_path
    self.outcomes: dict[str, str] = {}

  def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]):
    if self.wanted is None:
      return
    keep, drop = [], []
    for item in items:
      function = getattr(item, 'function', None)
      key = None
      if function is not None:
        function = inspect.unwrap(function)
        key = (str(pathlib.Path(function.__code__.co_filename).resolve()), function.__qualname__)
      (keep if key in self.wanted else drop).append(item)
    if drop:
      config.hook.pytest_deselected(items=drop)
      items[:] = keep

  def _record(self, nodeid: str, outcome: str) -> None:
    # A failure or error in any phase stands; a passing call does not undo it.
    if self.outcomes.get(nodeid) not in ('failed', 'error'):
      self.outcomes[nodeid] = outcome

  def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
    if report.failed:
      self._record(report.nodeid, 'failed' if report.when == 'call' else 'error')
    elif report.skipped:
      self._record(report.nodeid, 'xfailed' if hasattr(report, 'wasxfail') else 'skipped')
    elif report.when == 'call':
      self._record(report.nodeid, 'passed')

  def pytest_collectreport(self, report: pytest.CollectReport) -> None:
    if report.failed:
      self._record(report.nodeid, 'error')

  def pytest_sessionfinish(self, session: pytest.Session) -> None:
    # Under pytest-xdist the controller, which receives every report, writes it.
    if self.outcomes_path and not hasattr(session.config, 'workerinput'):
      text = json.dumps(self.outcomes, indent=1, sort_keys=True)
      pathlib.Path(self.outcomes_path).write_text(text)


def pytest_configure(config: pytest.Config) -> None:
  module = os.environ.get('FLAX_PEER_MODULE', 'flax')
  if module not in ('flax', 'jaxbn'):
    raise pytest.UsageError(f'FLAX_PEER_MODULE={module!r}: use flax or jaxbn.')
  if module == 'jaxbn':
    substitute_jaxbn()
  selection = os.environ.get('FLAX_PEER_SELECTION')
  if selection:
    selection = json.loads(pathlib.Path(selection).read_text())
  config.pluginmanager.register(
    _Peer(selection or None, os.environ.get('FLAX_PEER_OUTCOMES')), 'flax_peer'
  )
