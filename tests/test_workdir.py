"""d2l_lenet.workdir: a run's directory refuses another config and names what it cannot write."""

import json

import pytest

from configs import lenet_bn
from d2l_lenet import workdir


def tiny_config(**overrides):
  config = lenet_bn.get_config()
  config.update(overrides)
  return config


def test_workdir_refuses_another_config_but_accepts_more_epochs(tmp_path):
  workdir.prepare(tmp_path, tiny_config())
  workdir.prepare(tmp_path, tiny_config(num_epochs=20))  # resuming for longer is fine
  with pytest.raises(workdir.WorkdirError, match=r'learning_rate: 1.0 -> 0.5'):
    workdir.prepare(tmp_path, tiny_config(learning_rate=0.5))
  changed = tiny_config()
  changed.bn.momentum = None
  with pytest.raises(workdir.WorkdirError, match=r'\(bn.momentum: 0.9 -> None\)'):
    workdir.prepare(tmp_path, changed)
  assert json.loads((tmp_path / 'config.json').read_text())['num_epochs'] == 20


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(workdir.WorkdirError, match=r'Cannot write to workdir .*file/run'):
    workdir.prepare(blocker / 'run', tiny_config())
